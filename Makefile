# Two commands set everything up on a fresh machine with Python 3.11 and pip:
#   make lab    install into .venv and open the course in JupyterLab
#   make test   install into .venv and run every test: unit tests plus the notebooks under nbval
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: lab test install
lab: install
	$(BIN)/jupyter lab notebooks/

test: install
	$(BIN)/python -m pytest tests notebooks --nbval-lax --nbval-current-env -p no:cacheprovider

install: $(VENV)/installed.stamp

$(VENV)/installed.stamp: requirements.txt pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "minigpt needs Python 3.11 or newer"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@
