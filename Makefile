# Satchel developer / CI entry points.
#
#   make venv         create .venv (python3 >= 3.11) and `pip install -e '.[dev]'`
#   make deps-system  make sure redis-server, redis-cli and Debian chromium exist
#   make test         venv + deps-system, then ruff, mypy, node tests (if any), pytest
#   make lint         ruff check . and mypy (the package is typed)
#   make demo         run the example chat app (PORT=8000 by default)
#   make bench        satchel bench codec
#   make clean        remove caches and build/test artifacts (keeps .venv)
#   make distclean    clean + remove .venv
#
# CI calls `.ci/run`, which is `CI=true make test`.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test
MAKEFLAGS += --no-print-directory

# First interpreter found that is >= 3.11; override with `make PYTHON=/path/to/python3.12`.
PYTHON ?= $(shell for p in python3 python3.13 python3.12 python3.11; do \
	  command -v $$p >/dev/null 2>&1 && \
	  $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && \
	  { echo $$p; break; }; done)

VENV      := .venv
VPY       := $(VENV)/bin/python
STAMP     := $(VENV)/.satchel-dev-installed
PORT      ?= 8000
# Loopback only: the demo is never exposed beyond this machine.
HOST      ?= 127.0.0.1
SYSTEM_BINARIES := redis-server redis-cli chromium

.PHONY: venv deps-system test lint demo bench clean distclean

# --------------------------------------------------------------------------- venv

venv: $(STAMP)

$(VPY):
	@if [ -z "$(PYTHON)" ]; then \
	  echo "error: no python3 >= 3.11 found on PATH (set PYTHON=...)" >&2; exit 1; fi
	@echo "creating $(VENV) with $(PYTHON) ($$($(PYTHON) -V 2>&1))"
	$(PYTHON) -m venv $(VENV)

# Re-installs whenever pyproject.toml changes (or the venv was recreated).
$(STAMP): pyproject.toml | $(VPY)
	@$(VPY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
	  echo "error: $(VPY) is older than Python 3.11; run 'make distclean venv'" >&2; exit 1; }
	$(VPY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $@

# ------------------------------------------------------------------ system deps

# Browsers come from Debian's chromium package, never from `playwright install`.
deps-system:
	@missing=""; \
	for b in $(SYSTEM_BINARIES); do \
	  command -v $$b >/dev/null 2>&1 || missing="$$missing $$b"; \
	done; \
	if [ -z "$$missing" ]; then echo "deps-system: redis-server, redis-cli, chromium present"; exit 0; fi; \
	echo "deps-system: missing:$$missing"; \
	if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -q || echo "deps-system: apt-get update reported errors, trying the install anyway"; \
	  apt-get install -y -q redis-server chromium; \
	  for b in $(SYSTEM_BINARIES); do \
	    command -v $$b >/dev/null 2>&1 || { echo "deps-system: $$b still missing after apt-get" >&2; exit 1; }; \
	  done; \
	else \
	  echo "deps-system: not root (or no apt-get), cannot install:$$missing"; \
	  echo "  install them with:  sudo apt-get install -y redis-server chromium"; \
	  echo "  tests needing them are skipped locally and FAIL when CI is set."; \
	fi

# ------------------------------------------------------------------------- test

test: venv deps-system
	$(VENV)/bin/ruff check .
	$(VPY) -m mypy
	@if [ -d client_js/test ] && command -v node >/dev/null 2>&1; then \
	  echo "node --test client_js/test/"; node --test client_js/test/; \
	elif [ -d client_js/test ]; then \
	  echo "node not found: skipping client_js tests"; \
	  if [ -n "$${CI:-}" ] && [ "$${CI:-}" != "0" ] && [ "$${CI,,}" != "false" ]; then exit 1; fi; \
	fi
	$(VPY) -m pytest -q -p no:cacheprovider

lint: venv
	$(VENV)/bin/ruff check .
	$(VPY) -m mypy

# ------------------------------------------------------------------------- demo

demo: venv
	@echo "Satchel demo on http://$(HOST):$(PORT)/  (Ctrl-C to stop)"
	@export PORT=$(PORT) HOST=$(HOST) PYTHONPATH="$(CURDIR):$(CURDIR)/server$${PYTHONPATH:+:$$PYTHONPATH}"; \
	if [ -f examples/chat/__main__.py ]; then \
	  exec $(VPY) -m examples.chat; \
	else \
	  exec $(VPY) examples/chat/app.py; \
	fi

bench: venv
	$(VENV)/bin/satchel bench codec

# ------------------------------------------------------------------------ clean

clean:
	rm -rf build dist test-artifacts .pytest_cache .ruff_cache .mypy_cache .hypothesis
	find . -path ./$(VENV) -prune -o -name '*.egg-info' -prune -exec rm -rf {} + 2>/dev/null || true
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} + 2>/dev/null || true

distclean: clean
	rm -rf $(VENV)
