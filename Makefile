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
	@echo "make demo   set up, then teacher -> distill -> prune -> export on Fashion-MNIST (writes $(RUNS)/)"
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

# The demo pipeline on the default data, about 12 minutes on 2 CPU cores: a ResNet-50 teacher, distilled into
# a ResNet-18, channel-pruned and fine-tuned with the teacher, exported to ONNX, every step evaluated.
DEMO_DATA ?= --data fashion-mnist --train-limit 10000
demo: setup data
	$(PY) cli.py train --arch resnet50 $(DEMO_DATA) --epochs 2 --out $(RUNS)/teacher.pth
	$(PY) cli.py distill --teacher $(RUNS)/teacher.pth --student resnet18 $(DEMO_DATA) --epochs 2 \
		--out $(RUNS)/student.pth
	$(PY) cli.py prune --model $(RUNS)/student.pth --method l1-channel --amount 0.5 --finetune-epochs 1 \
		--teacher $(RUNS)/teacher.pth $(DEMO_DATA) --out $(RUNS)/pruned.pth
	$(PY) cli.py export --model $(RUNS)/pruned.pth --out $(RUNS)/model.onnx
	$(PY) cli.py evaluate --model $(RUNS)/teacher.pth --plot $(RUNS)/teacher.confusion.png
	$(PY) cli.py evaluate --model $(RUNS)/pruned.pth --plot $(RUNS)/pruned.confusion.png

clean:
	rm -rf $(RUNS) .pytest_cache
