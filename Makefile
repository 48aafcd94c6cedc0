# eDIF mesh. Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test lint format proto bench clean chromium shellcheck test-dashboard

install: $(STAMP)

# torch is pinned in constraints.txt so pip takes the CPU wheel on this machine's disk
# rather than resolving a multi-GB CUDA build through nnsight.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt torch
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/edif demo

test: install lint
	$(VENV)/bin/pytest -q -ra

# Debian's Chromium for the dashboard's browser tests (Playwright drives /usr/bin/chromium;
# `playwright install` downloads a browser build and cannot work here). Needs root; idempotent.
chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
		apt-get update && apt-get install -y --no-install-recommends chromium; \
	fi

# shellcheck for the FAU Slurm batch script (tests/site_agent/test_fau_deploy.py). Needs root.
shellcheck:
	@if [ ! -x /usr/bin/shellcheck ]; then \
		apt-get update && apt-get install -y --no-install-recommends shellcheck; \
	fi

test-dashboard: install chromium
	$(VENV)/bin/pytest -q -ra tests/dashboard

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Regenerate the committed gRPC stubs (tests/test_proto_stubs.py fails when they are stale).
proto: install
	$(PY) -m edif.protogen proto

bench: install
	$(PY) bench/overhead.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
