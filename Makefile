# softswitch: developer entry points (GNU make).
#   make run     run the switch with config/switch.yaml (loopback, in-memory state)
#   make test    run the whole test suite (installs what it needs first)
#   make bench   run the benchmarks under tests/bench
SHELL := /bin/bash

VENV ?= .venv
PY = $(VENV)/bin/python
PYTHON3 ?= python3
CONFIG ?= config/switch.yaml
PYTEST_ARGS ?=

# Stamp inside the venv: redone whenever pyproject.toml changes.
VENV_STAMP = $(VENV)/.installed-softswitch
# Stamp inside node_modules: the softphone page's JavaScript (JsSIP from npm, bundled for
# the browser by esbuild), redone whenever package.json changes. Installed, never vendored.
NPM = npm
NODE_STAMP = node_modules/.stamp

# Debian packages the tests need, as command:package pairs.
DEBIAN_DEPS = sipp:sip-tester redis-server:redis-server ip:iproute2 unshare:util-linux openssl:openssl rtpengine:rtpengine-daemon baresip:baresip chromium:chromium node:nodejs npm:npm
SUDO = $(if $(filter 0,$(shell id -u)),,sudo)
APT_ENV = DEBIAN_FRONTEND=noninteractive

.PHONY: venv debian-deps run test bench check-config lint clean

venv: $(VENV_STAMP)

$(VENV_STAMP): pyproject.toml
	@if [ ! -x "$(PY)" ]; then \
	  rm -rf "$(VENV)"; \
	  if ! $(PYTHON3) -m venv "$(VENV)"; then \
	    echo "python3 -m venv failed: installing python3-venv"; \
	    rm -rf "$(VENV)"; \
	    $(SUDO) env $(APT_ENV) apt-get update -qq && \
	    $(SUDO) env $(APT_ENV) apt-get install -y -qq --no-install-recommends python3-venv && \
	    $(PYTHON3) -m venv "$(VENV)"; \
	  fi; \
	fi
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch "$@"

$(NODE_STAMP): package.json $(wildcard package-lock.json)
	@$(MAKE) --no-print-directory debian-deps DEBIAN_DEPS="node:nodejs npm:npm"
	$(NPM) install --no-audit --no-fund
	$(NPM) run --silent build:softphone
	@touch "$@"

debian-deps:
	@missing=""; \
	for pair in $(DEBIAN_DEPS); do \
	  command -v "$${pair%%:*}" >/dev/null 2>&1 || \
	    [ -x "/usr/sbin/$${pair%%:*}" ] || [ -x "/sbin/$${pair%%:*}" ] || \
	    missing="$$missing $${pair#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) env $(APT_ENV) apt-get update -qq && \
	  $(SUDO) env $(APT_ENV) apt-get install -y -qq --no-install-recommends $$missing; \
	fi

run: venv $(NODE_STAMP)
	$(PY) -m switch run --config $(CONFIG)

test: venv debian-deps $(NODE_STAMP)
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

bench: venv debian-deps
	$(VENV)/bin/pip install --quiet -e '.[bench]'
	$(PY) -m tests.bench $(BENCH_ARGS)

check-config: venv
	$(PY) -m switch check-config $(CONFIG)

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf "$(VENV)" build .pytest_cache .ruff_cache bench-results *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
