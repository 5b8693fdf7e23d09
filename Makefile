# Each target sets up the virtual environment on first use, so on a fresh machine
# `make train` and `make test` are the only two commands needed.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

.PHONY: setup train test
setup: $(VENV)/.installed

train: $(VENV)/.installed
	$(PY) run.py train --pipeline pipelines/synthetic.yaml

test: $(VENV)/.installed
	$(PY) -m pytest -q tests
