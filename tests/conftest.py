"""Shared test helpers: loading the worked solutions that live beside the notebooks."""

import importlib.util
from pathlib import Path
from types import ModuleType

SOLUTIONS_DIR = Path(__file__).resolve().parent.parent / "notebooks" / "solutions"


def load_solutions(chapter: str) -> ModuleType:
    """Import `notebooks/solutions/<chapter>.py` by path (it is not a package module)."""
    path = SOLUTIONS_DIR / f"{chapter}.py"
    spec = importlib.util.spec_from_file_location(f"solutions_{chapter}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
