# Two entry points for a fresh machine (Python 3.11-3.13 and make):
#   make serve   create .venv, install embedsvc, serve the bundled default model on :8080
#   make test    create .venv, install embedsvc with test tools, run lint, types and tests
#                (make test-unit: the unit tests alone, under a minute)
# Both install from the locks in requirements/ (exact versions, sha256 checked); `make lock`
# writes them anew from pyproject.toml with the newest releases.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PIP_VERSION := 26.3
UV_VERSION := 0.13.9
ARGS ?=

.PHONY: install install-test install-bench serve test test-unit lint bench lock

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q pip==$(PIP_VERSION)

# torch first, at the version requirements/torch.txt pins (a CPU build here; the GPU image installs
# a CUDA build), then every other package from the lock with its hash, then embedsvc itself
# with no dependency resolution left to chance; `pip check` proves the set is complete.
define install_lock
	$(PIP) install -q --no-deps -r requirements/torch.txt
	$(PIP) install -q --require-hashes --no-deps -r requirements/$(1)
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PIP) check
endef

install: $(PY)
	$(call install_lock,cpu.lock)

install-test: $(PY)
	$(call install_lock,dev.lock)

install-bench: install-test

lock: $(PY)
	$(PIP) install -q uv==$(UV_VERSION)
	$(PY) requirements/lock.py $(VENV)/bin/uv $(ARGS)

serve: install
	$(VENV)/bin/embedsvc serve $(ARGS)

lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy embedsvc

test: lint
	$(VENV)/bin/pytest -q $(ARGS)

# tests/unit alone (no sockets, no processes): under a minute.
test-unit: install-test
	$(VENV)/bin/pytest -q -m unit $(ARGS)

bench: install-bench
	$(PY) bench/throughput.py $(ARGS)
