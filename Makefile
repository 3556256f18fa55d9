# edgeopt: `make demo` sets up and runs the pipeline on the default data; `make test` runs the test suite.
# Both create .venv, install the project with its test dependencies, and install Debian's
# dataset-fashion-mnist when it is missing and we are root.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
RUNS ?= runs/demo
PYTEST_ARGS ?=
# one worker per core, a test file per worker (module fixtures stay shared): 8 min instead of 12 on 2 cores
PYTEST_PARALLEL ?= -n auto --dist loadfile

.PHONY: help setup data test demo clean

help:
	@echo "make demo   set up, then the whole pipeline on Fashion-MNIST (PRESET=standard|quick; writes $(RUNS)/)"
	@echo "make test   set up, then run the test suite"

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

data:
	@if [ -f $(FMNIST_DIR)/train-images-idx3-ubyte.gz ] || [ -n "$$EDGEOPT_FASHION_MNIST" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's dataset-fashion-mnist"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
		echo "note: $(FMNIST_DIR) is missing and this is not root with apt-get;" \
		     "edgeopt will try to download Fashion-MNIST with torchvision"; \
	fi

test: setup data
	$(PY) -m pytest $(PYTEST_PARALLEL) $(PYTEST_ARGS)

# The demo: the whole pipeline on the default data (Fashion-MNIST from Debian's package): a ResNet-50 teacher,
# distilled into a ResNet-18, channel-pruned, exported, INT8-calibrated, ONNX Runtime engines built, and the
# benchmark report against the teacher (runs/demo/report/report.md). PRESET=standard takes about 25 minutes on
# 2 CPU cores; PRESET=quick about 3. A second `make demo` skips every unchanged stage; a killed one resumes.
PRESET ?= standard
demo: setup data
	$(PY) cli.py pipeline --preset $(PRESET) --data fashion-mnist --out $(RUNS)

clean:
	rm -rf $(RUNS) .pytest_cache
