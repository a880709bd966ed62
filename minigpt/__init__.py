"""minigpt: a small replica of GPT-4.1 mini, rebuilt from scratch one mechanism at a time.

Each module holds one concept and is small enough to read in one sitting; the course notebooks
build every mechanism step by step and then check their version against the one here.
"""
