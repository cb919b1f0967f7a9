# Two entry points (see README): `make demo` runs the main job, `make test` the tests.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test test-slow

venv:
	@bash scripts/venv.sh

# The zoo is the one shipped in zoo/ (`evomerge zoo build` rebuilds it and compares).
demo: venv
	$(VENV)/bin/evomerge datagen safety recipes/datagen-zoo.yaml
	$(VENV)/bin/evomerge datagen domain recipes/datagen-zoo.yaml
	$(VENV)/bin/evomerge report recipes/table1-demo.yaml

test: venv
	$(PY) -m pytest -q

test-slow: venv
	$(PY) -m pytest -q -m slow
