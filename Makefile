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

.PHONY: help setup data test demo clean

help:
	@echo "make demo   set up, then train + evaluate on Fashion-MNIST (writes $(RUNS)/)"
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
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup data
	$(PY) cli.py train --arch resnet18 --data fashion-mnist --epochs 1 --out $(RUNS)/teacher.pth
	$(PY) cli.py evaluate --model $(RUNS)/teacher.pth --data fashion-mnist --plot $(RUNS)/teacher.confusion.png

clean:
	rm -rf $(RUNS) .pytest_cache
