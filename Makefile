# One command per chore. `make run` and `make test` work on a fresh Debian machine with Python 3.11+ and pip.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: run test test-pg15 lint format bench install system-packages clean

# Debian splits venv support into python3-venv; install it when we can rather than fail on a fresh machine.
$(BIN)/python:
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { rm -rf $(VENV); \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && $(PYTHON) -m venv $(VENV); \
		else echo "python3 -m venv failed: install python3-venv (Debian/Ubuntu) and retry" >&2; exit 1; fi; }

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

## Start the service with its demo page on http://127.0.0.1:8000 (embedded PostgreSQL unless DATABASE_URL is set).
run: $(STAMP)
	$(BIN)/realtime serve

## Debian packages the tests drive: Chromium (the browser tests) and HAProxy (the load-balancer test). Each is
## installed once, when its program is missing; one apt-get run installs whatever is.
SYSTEM_PACKAGES := chromium:/usr/bin/chromium haproxy:/usr/sbin/haproxy
system-packages:
	@missing=$$(for entry in $(SYSTEM_PACKAGES); do [ -x "$${entry#*:}" ] || printf '%s ' "$${entry%%:*}"; done); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then sudo=; else sudo=sudo; fi; \
		echo "installing $$missing(apt-get)"; \
		$$sudo apt-get update -qq && $$sudo apt-get install -y -qq $$missing >/dev/null; \
	fi

## The whole test suite (embedded PostgreSQL 18; set REALTIME_TEST_ADMIN_URL to use another server).
test: $(STAMP) system-packages
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## The same suite against the system PostgreSQL on 127.0.0.1:5432.
test-pg15:
	REALTIME_TEST_ADMIN_URL=postgresql://postgres@127.0.0.1:5432/postgres $(MAKE) test

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict realtime tests bench

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## Benchmarks against the peers; prints tables and writes bench/results/*.json (not part of the tests).
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .realtime .pytest_cache .mypy_cache .ruff_cache
