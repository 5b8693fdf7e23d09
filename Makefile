# Each target sets up the virtual environment on first use, so on a fresh machine
# `make tune` and `make test` are the only two commands needed.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

.PHONY: setup tune train test bench-smoke
setup: $(VENV)/.installed

tune: $(VENV)/.installed
	$(PY) run.py tune --space tune_spaces/synthetic.yaml

train: $(VENV)/.installed
	$(PY) run.py train --pipeline pipelines/synthetic.yaml

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

# Every harness in benchmarks/ with --smoke: checks they run and print their JSON, not their numbers.
bench-smoke: $(VENV)/.installed
	$(PY) benchmarks/smoke.py
