# Two set-up commands: `make demo` and `make test`. Both create the virtual environment,
# install what is missing (Debian EGL packages when run as root, the CPU torch build, the
# project) and then do their job. `make bench` writes bench/results/*.json.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
SAMPLE_DIR ?= data/sample
SAMPLE_VIDEOS ?= 4
APT_PACKAGES := libegl1 libegl-mesa0 libgl1-mesa-dri libgl1 libglib2.0-0

export PYOPENGL_PLATFORM ?= egl
export ANNY_CACHE_DIR ?= $(HOME)/.cache/avatarize/anny
export HF_HUB_OFFLINE := 1

.PHONY: setup system-packages demo test bench lint clean

setup: $(VENV)/.installed

system-packages:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    echo "installing system packages: $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else \
	    echo "missing system packages (EGL rendering): $$missing"; \
	    echo "install them with: sudo apt-get install $$missing"; exit 1; \
	  fi; \
	fi

$(VENV)/.installed: pyproject.toml | system-packages
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found; run make PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build first, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

$(SAMPLE_DIR)/manifest.csv: | setup
	$(BIN)/avatarize sample-data $(SAMPLE_DIR) --videos $(SAMPLE_VIDEOS)

demo: setup $(SAMPLE_DIR)/manifest.csv
	$(BIN)/avatarize doctor
	$(BIN)/avatarize run --config pipeline.yaml --set export.preview=true

test: setup
	$(BIN)/ruff check pipeline stages training privacy assets tests
	$(BIN)/python -m pytest -q -ra

bench: setup
	$(BIN)/python -m pipeline.bench --out bench/results
	$(BIN)/python -m pipeline.bench_bodies --out bench/results
	$(BIN)/python -m training.bench --out bench/results
	$(BIN)/python -m pipeline.bench_sd --out bench/results
	$(BIN)/python -m pipeline.bench_memory --out bench/results

lint: setup
	$(BIN)/ruff check pipeline stages training privacy assets tests

clean:
	rm -rf work out
