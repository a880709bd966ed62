# Two commands set everything up on a fresh machine with Python 3.11 and pip:
#   make lab    install into .venv and open the course in JupyterLab
#   make test   install into .venv and run every test: unit tests plus the notebooks under nbval
# Also:
#   make unit        the unit tests alone (about 4 minutes; no notebooks)
#   make wheelhouse  (a teacher, once, online) download every package into wheelhouse/ for a classroom
#   make lab WHEELHOUSE=wheelhouse   (a student, offline) install from that folder alone, then open the course
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WHEELHOUSE ?=
# With WHEELHOUSE set, pip reads that folder and nothing else: no index, no network.
PIP_SOURCE := $(if $(WHEELHOUSE),--no-index --find-links $(WHEELHOUSE))
# Jupyter refuses to start as root (common in classroom containers) unless told it is meant.
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: lab test unit install wheelhouse
lab: install
	$(BIN)/jupyter lab $(ALLOW_ROOT) notebooks/

test: install
	$(BIN)/python -m pytest tests notebooks --nbval-lax --nbval-current-env -p no:cacheprovider

unit: install
	$(BIN)/python -m pytest tests -p no:cacheprovider

install: $(VENV)/installed.stamp

$(VENV)/installed.stamp: requirements.txt pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "minigpt needs Python 3.11 or newer"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(PIP_SOURCE) --upgrade pip
	$(BIN)/python -m pip install --quiet $(PIP_SOURCE) -r requirements.txt
	$(BIN)/python -m pip install --quiet $(PIP_SOURCE) --no-deps -e .
	touch $@

# Everything `make install` needs, as files: the requirements, pip itself, and setuptools to build
# the course package. Build it on the same operating system, processor and Python as the students.
wheelhouse:
	$(PYTHON) -m pip download --quiet --dest $(or $(WHEELHOUSE),wheelhouse) -r requirements.txt pip "setuptools>=64" wheel
