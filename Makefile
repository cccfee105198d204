# Two commands a user needs: `make demo` and `make test`. Both set everything up first and are
# idempotent: a second run skips what is already done.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = "0" ] || echo sudo)
APT_PACKAGES := libturbojpeg0-dev libopencv-dev pkg-config
DEMO ?= demo

.PHONY: setup sysdeps test demo lint clean

setup: sysdeps $(VENV)/.installed

# FFCV compiles against libjpeg-turbo and OpenCV: pip's opencv-python lacks the C++ headers.
sysdeps:
	@if pkg-config --exists libturbojpeg opencv4 2>/dev/null && $(PYTHON) -c 'import venv, ensurepip' 2>/dev/null; then \
		echo "system libraries present"; \
	else \
		$(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(APT_PACKAGES) python3-venv; \
	fi

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

demo: setup
	$(BIN)/cornpipe synth $(DEMO)/raw --per-source 40 --image-size 512 --seed 0 --force
	$(BIN)/cornpipe convert $(DEMO)/raw $(DEMO)/shards --force
	$(BIN)/cornpipe inspect $(DEMO)/shards

clean:
	rm -rf $(DEMO) .pytest_cache
