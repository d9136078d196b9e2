# `make demo` and `make test` each do the whole set-up on a fresh machine: system packages FFCV builds
# against (apt, when root and missing), a .venv in the repo root, the project and its pinned dependencies.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
APT_PACKAGES := libopencv-dev libturbojpeg0-dev pkg-config

.PHONY: demo test test-fast test-slow bench system-packages clean

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory system-packages
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel setuptools
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

system-packages:
	@if [ "$$(id -u)" = 0 ] && ! dpkg -s $(APT_PACKAGES) >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); \
	elif ! pkg-config --exists opencv4 2>/dev/null; then \
		echo "note: FFCV needs $(APT_PACKAGES); install them (as root: make system-packages)"; \
	fi

demo: $(STAMP)
	$(BIN)/python -m vpn_dist.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m 'not slow and not integration'

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/vpn-dist bench ray

clean:
	rm -rf $(VENV) demo *.egg-info
