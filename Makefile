# Two entry points for a fresh machine (Python 3.10+ and make):
#   make serve   create .venv, install embedsvc, serve the bundled default model on :8080
#   make test    create .venv, install embedsvc with test tools, run lint, types and tests
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
ARGS ?=

.PHONY: install install-test install-bench serve test lint bench

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

install: $(PY)
	$(PIP) install -q -c constraints.txt -e .

install-test: $(PY)
	$(PIP) install -q -c constraints.txt -e '.[test]'

install-bench: $(PY)
	$(PIP) install -q -c constraints.txt -e '.[bench]'

serve: install
	$(VENV)/bin/embedsvc serve $(ARGS)

lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy embedsvc

test: lint
	$(VENV)/bin/pytest -q $(ARGS)

bench: install-bench
	$(PY) bench/throughput.py $(ARGS)
