#!/usr/bin/env bash
# The device check (benchmarks/device_check.py) on a GPU machine that can fetch nothing, with its own Python
# (the lent H200: Python 3.12, PyTorch 2.11+cu130, onnx, CPU onnxruntime, cuda-bindings 13, no TensorRT).
#
#   make device-check-prepare         # here, online: wheels it lacks into .whl/, Fashion-MNIST into .devdata/
#   bash benchmarks/device_check.sh   # there (the device tool: carry .whl and .devdata); --dry-run: wiring only
#
# Installs only the carried wheels, with --no-index, into a folder of its own (PYTHONPATH), points edgeopt at the
# carried data, names any module still missing, then runs the check: about 5 minutes on an H200. Reports go to
# runs/device-check/ and, when $OUT is set, to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/edgeopt-site}
dry=()
if [ "${1:-}" = --dry-run ]; then dry=(--dry-run); shift; fi

shopt -s nullglob
wheels=(.whl/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
  if [ ${#dry[@]} -gt 0 ]; then
    echo "would install ${#wheels[@]} wheel(s) with --no-index: ${wheels[*]}"
  else
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check \
      --target "$SITE" "${wheels[@]}"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
else
  echo "note: no .whl/ here: using the packages $PYTHON has"
fi
if [ -f .devdata/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  export EDGEOPT_FASHION_MNIST="$PWD/.devdata/fashion-mnist"
fi
export EDGEOPT_OFFLINE=1 PYTHONUNBUFFERED=1

# what edgeopt's pipeline imports; the device image has all but torch-pruning (make device-check-prepare's wheel)
missing=$("$PYTHON" - <<'PY'
import importlib.util
names = ["torch", "torchvision", "onnx", "onnxruntime", "onnxscript", "numpy", "tqdm", "yaml", "PIL",
         "matplotlib", "torch_pruning"]
print(" ".join(n for n in names if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
  if [ ${#dry[@]} -gt 0 ]; then
    echo "note: missing here: $missing (a real run needs them: make device-check-prepare carries torch-pruning)"
  else
    echo "error: $PYTHON lacks: $missing; run 'make device-check-prepare' where there is a network and carry .whl" >&2
    exit 2
  fi
fi
exec "$PYTHON" -m benchmarks.device_check ${dry[@]+"${dry[@]}"} "$@"
