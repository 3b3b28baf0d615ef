# k5serve: `make serve` runs the whole stack locally, `make test` runs the test suite.
# Both install what they need first: a .venv with every extra, and the Debian packages that are missing (redis-server
# for both, chromium for the tests only).

# torch's CPU wheel on our machines is built for CPython 3.11: prefer it, accept any 3.11+.
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system-deps redis-server chromium serve test test-fast lint openapi tiny-model clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "k5serve needs Python 3.11+")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	# torch first and pinned: an unpinned torch would pull several GB of CUDA packages.
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[worker,dev]'
	@touch $@

# Debian packages, each installed when its command is missing: redis-server (the local stack and the tests), and
# chromium for the playground's browser test only (driven through Playwright by path: Playwright's own browser
# download cannot work here).
system-deps: redis-server chromium

redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "installing redis-server (apt)"; \
		$(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; }

# After redis-server: two apt-get runs at once (make -j) would fight over dpkg's lock.
chromium: redis-server
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing chromium (apt)"; \
		$(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# Keeps its data in .k5 across restarts (`make clean` starts fresh).
serve: install redis-server
	$(BIN)/k5serve dev

test: install system-deps
	$(BIN)/python -m pytest -q

# The quick lane while working: everything but the tests on real worker and gateway processes (marked `slow`).
test-fast: install redis-server
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/python -m ruff check service worker tests bench
	$(BIN)/python -m mypy

openapi: install
	$(BIN)/k5serve openapi openapi.yaml

clean:
	rm -rf .k5 .pytest_cache
