# Two entry points a new user needs: `make demo` (the main job) and `make test`.
# Both create .venv on first use; nothing else needs installing by hand.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# loomlens itself (what `make demo` needs), and with every extra the tests and benchmarks use
# (serving, video, ONNX, the browser test): the demo does not wait for those on a new machine.
STAMP  := $(VENV)/.installed
DEV    := $(VENV)/.installed-dev

.PHONY: demo test test-deps test-slow bench clean
# The two install rules share one .venv: `make -j demo test` must not run them at once.
.NOTPARALLEL:

define install
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e "$(1)"
endef

$(STAMP): pyproject.toml
	$(call install,.)
	touch $(STAMP)

$(DEV): pyproject.toml
	$(call install,.[dev])
	touch $(STAMP) $(DEV)

demo: $(STAMP)
	$(VENV)/bin/loomlens demo --out runs/demo

test: $(DEV) test-deps
	$(PY) -m pytest -q

# System packages the tests need: Debian's chromium for the serve page's browser test
# (Playwright drives /usr/bin/chromium; `playwright install` cannot download browsers here) and
# Debian's postgresql for the events store's PostgreSQL test (a throwaway cluster on 127.0.0.1).
# Quick when present; installs with apt-get when missing and we are root (CI); otherwise warns,
# and those tests skip (or fail under CI=true).
CHROMIUM ?= /usr/bin/chromium
INITDB   ?= $(firstword $(wildcard /usr/lib/postgresql/*/bin/initdb))
test-deps:
	@missing=""; \
	[ -x "$(CHROMIUM)" ] || missing="$$missing chromium"; \
	[ -n "$(INITDB)" ] || missing="$$missing postgresql"; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "test-deps: installing Debian$$missing for the browser and PostgreSQL tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
	    || echo "test-deps: WARNING: apt-get could not install$$missing; their tests will fail under CI"; \
	else \
	  echo "test-deps: WARNING:$$missing missing and this user cannot apt-get install them;"; \
	  echo "test-deps: their tests will skip (fail under CI=true). As root: apt-get install$$missing"; \
	fi

test-slow: $(DEV)
	$(PY) -m pytest -q -m slow

bench: $(DEV)
	$(PY) -m bench.all

clean:
	rm -rf runs .pytest_cache
