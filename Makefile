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
# one worker per core, a test file per worker (module fixtures stay shared), each worker pinned to its core
# (tests/conftest.py): 9:45 for 647 tests on 2 cores instead of 13:40 for 418 unpinned
PYTEST_PARALLEL ?= -n auto --dist loadfile

.PHONY: help setup data test test-modelopt gpu-check device-check device-check-prepare demo clean

help:
	@echo "make demo   set up, then the whole pipeline on Fashion-MNIST (PRESET=standard|quick|full; writes $(RUNS)/)"
	@echo "make test   set up, then run the test suite"
	@echo "make test-modelopt   opt-in: our TensorRT Q/DQ placement against NVIDIA Model Optimizer's (own venv, ~6 GB)"
	@echo "make gpu-check       on a GPU machine: every GPU backend over $(RUNS) (run make demo first), context check"
	@echo "make device-check    on a GPU machine that fetches nothing (after make device-check-prepare here)"

setup: $(STAMP)

VENV_FLAGS ?=
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
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

# Opt-in (not part of `make test`): our `calibrate --target tensorrt` placement against NVIDIA Model Optimizer's
# INT8 ONNX PTQ on a trained ResNet-18 and ResNet-50 (tests/modelopt/, about 10 minutes on 2 cores). Model
# Optimizer gets a venv of its own: its [onnx] extra pins onnx / onnxruntime-gpu versions that clash with ours
# and pulls CUDA wheels, so it is installed without the extra, plus the CPU packages its ONNX INT8 path imports
# (its base requirements still bring torch). Files of the last run stay in $(MODELOPT_RUNS).
MODELOPT_VERSION := 0.47.0
MODELOPT_VENV ?= .venv-modelopt
MODELOPT_STAMP := $(MODELOPT_VENV)/.installed-$(MODELOPT_VERSION)
MODELOPT_RUNS ?= runs/test-modelopt

$(MODELOPT_STAMP):
	$(PYTHON) -m venv $(MODELOPT_VENV)
	$(MODELOPT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(MODELOPT_VENV)/bin/python -m pip install --quiet 'nvidia-modelopt==$(MODELOPT_VERSION)' 'onnx~=1.21.0' \
		'onnxruntime~=1.24.2' 'onnx-graphsurgeon>=0.6.1' 'onnxconverter-common~=1.16.0' ml_dtypes \
		'onnxslim>=0.1.76' onnxscript lief
	touch $@

test-modelopt: setup data $(MODELOPT_STAMP)
	mkdir -p $(dir $(MODELOPT_RUNS))  # pytest makes --basetemp itself, not its parent (a clean checkout has no runs/)
	EDGEOPT_MODELOPT_PYTHON=$(abspath $(MODELOPT_VENV))/bin/python $(PY) -m pytest -s tests/modelopt \
		--basetemp=$(MODELOPT_RUNS) $(PYTEST_ARGS)

# The demo: the whole pipeline on the default data (Fashion-MNIST from Debian's package): a ResNet-50 teacher,
# distilled into a ResNet-18, channel-pruned, exported, INT8-calibrated, ONNX Runtime engines built, and the
# benchmark report against the teacher (runs/demo/report/report.md). PRESET=standard takes about 30 minutes on
# 2 CPU cores; PRESET=quick about 3; PRESET=full is the GPU recipe. A second `make demo` skips every unchanged
# stage; a killed one resumes.
PRESET ?= standard
demo: setup data
	$(PY) cli.py pipeline --preset $(PRESET) --data fashion-mnist --out $(RUNS)

# On a GPU machine, after `make demo` (or `make demo PRESET=quick`): nvidia-smi facts and clocks, TensorRT
# fp32/fp16/int8 engines, the benchmark on --device cuda (torch FP32/TF32/FP16/BF16, ONNX Runtime CUDA, TensorRT)
# and the CUDA context check. It first installs what the GPU path needs into the venv: TensorRT + cuda-python for
# the driver's CUDA major (GPU_EXTRA, read from nvidia-smi: tensorrt-cu12 or tensorrt-cu13; on a Jetson set
# GPU_EXTRA=jetpack5 or jetpack6 and make the venv with VENV_FLAGS=--system-site-packages for JetPack's TensorRT)
# and onnxruntime-gpu in place of onnxruntime. Without TensorRT it fails, naming what is missing, unless
# ALLOW_NO_TENSORRT=1.
CUDA_MAJOR = $(shell nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\).*/\1/p' | head -n 1)
GPU_EXTRA ?= $(if $(filter 12 13,$(CUDA_MAJOR)),tensorrt-cu$(CUDA_MAJOR))
GPU_STAMP := $(VENV)/.gpu-installed
ALLOW_NO_TENSORRT ?= 0
ifeq ($(ALLOW_NO_TENSORRT),1)
GPU_CHECK_FLAGS := --allow-no-tensorrt
endif

# onnxruntime-gpu is installed first and then replaces onnxruntime (installed together, the CPU package shadows the
# CUDA provider), so a failed download leaves the CPU one in place. With ALLOW_NO_TENSORRT=1 a TensorRT that does
# not install is reported by gpu-check instead of stopping here.
$(GPU_STAMP): $(STAMP)
	@if [ -z "$(GPU_EXTRA)" ]; then \
		echo "gpu-check: no TensorRT extra for this driver (nvidia-smi's CUDA Version: '$(CUDA_MAJOR)'); set" \
		     "GPU_EXTRA=tensorrt-cu12, tensorrt-cu13, jetpack5 or jetpack6"; [ "$(ALLOW_NO_TENSORRT)" = 1 ] || exit 2; \
	else \
		$(PY) -m pip install --quiet -e '.[test,$(GPU_EXTRA)]' || [ "$(ALLOW_NO_TENSORRT)" = 1 ] || exit 2; \
	fi
	$(PY) -m pip install --quiet 'onnxruntime-gpu>=1.27' && $(PY) -m pip uninstall --quiet -y onnxruntime && \
		$(PY) -m pip install --quiet --force-reinstall --no-deps 'onnxruntime-gpu>=1.27' || \
		echo "note: onnxruntime-gpu did not install: ONNX Runtime's CUDA rows will be skipped, with the reason"
	touch $@

gpu-check: setup data $(GPU_STAMP)
	$(PY) cli.py gpu-check --runs $(RUNS) $(GPU_CHECK_FLAGS)

# The device check: a GPU machine lent for minutes that can fetch nothing runs benchmarks/device_check.sh with its
# own Python. Prepare here, online: the wheels that machine's image lacks (torch-pruning; Python 3.12) into .whl/
# and Fashion-MNIST into .devdata/ (both git-ignored: the device tool carries them).
DEVICE_PYTHON_VERSION ?= 3.12
device-check-prepare: setup data
	mkdir -p .whl .devdata/fashion-mnist
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(DEVICE_PYTHON_VERSION) -d .whl \
		"torch-pruning==$$($(PY) -c 'import importlib.metadata as m; print(m.version("torch-pruning"))')"
	cp $${EDGEOPT_FASHION_MNIST:-$(FMNIST_DIR)}/*-ubyte.gz .devdata/fashion-mnist/
	@du -sh .whl .devdata

device-check:
	bash benchmarks/device_check.sh

clean:
	rm -rf $(RUNS) .pytest_cache
