# Two entry points (see README): `make demo` runs the main job, `make test` the tests.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test test-slow zoo bench

venv:
	@bash scripts/venv.sh

demo: venv
	$(VENV)/bin/evomerge zoo build

test: venv
	$(PY) -m pytest -q

test-slow: venv
	$(PY) -m pytest -q -m slow
