# Two entry points a new user needs: `make demo` (the main job) and `make test`.
# Both create .venv on first use; nothing else needs installing by hand.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-deps test-slow bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/loomlens demo --out runs/demo

test: $(STAMP) test-deps
	$(PY) -m pytest -q

# System packages the tests need: Debian's chromium for the serve page's browser test
# (Playwright drives /usr/bin/chromium; `playwright install` cannot download browsers here).
# Quick when present; installs with apt-get when missing and we are root (CI); otherwise warns,
# and the browser test skips (or fails under CI=true).
CHROMIUM ?= /usr/bin/chromium
test-deps:
	@if [ -x "$(CHROMIUM)" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "test-deps: installing Debian chromium for the browser test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	    || echo "test-deps: WARNING: apt-get could not install chromium; the browser test will fail under CI"; \
	else \
	  echo "test-deps: WARNING: $(CHROMIUM) is missing and this user cannot apt-get install chromium;"; \
	  echo "test-deps: the browser test will skip (fail under CI=true). As root: apt-get install chromium"; \
	fi

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) -m bench.all

clean:
	rm -rf runs .pytest_cache
