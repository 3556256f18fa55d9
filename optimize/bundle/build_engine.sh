#!/usr/bin/env bash
# Build model.plan on THIS device from the bundle's ONNX with the device's own TensorRT (trtexec, 8.5 or later).
# A TensorRT engine runs only on the GPU model and TensorRT version that built it, so it is built where it runs.
#
# Usage: ./build_engine.sh [fp32|fp16|int8]            (default: @PRECISION@)
# Environment: TRTEXEC (path of trtexec), MIN_BATCH / OPT_BATCH / MAX_BATCH (default @MIN_BATCH@ / @OPT_BATCH@ /
#   @MAX_BATCH@), WORKSPACE_MIB (default @WORKSPACE_MIB@), OUT (default model.plan), DLA_CORE (the Jetson DLA core
#   to build for; default '@DLA_CORE@', empty meaning the GPU), NVIDIA_SMI (path of nvidia-smi, which names the timing
#   cache; empty: no cache), EXTRA_FLAGS (passed to trtexec).
#
# Precision by TensorRT version (the same rules as 'cli.py build-engine'):
# - 8.5 to 10.11: builder flags. fp16: --fp16; int8: --int8 alone with the Q/DQ model.onnx (whose scales come from
#   edgeopt's calibration), so the few unquantized layers stay FP32 as on the strongly typed versions. TensorRT
#   refuses a network with Q/DQ nodes without --int8, so fp32 and fp16 builds of a Q/DQ model.onnx pass it too:
#   its Q/DQ layers run INT8 anyway.
# - 10.12 and later: strongly typed (the flags are deprecated on 10.12+ and gone in 11; --stronglyTyped is needed
#   on 10.x and a no-op on 11, so it is passed on 10.x only): the precision is in the ONNX, model.fp16.onnx for fp16
#   (made by 'package' from an FP32 model), the Q/DQ model.onnx for int8.
# DLA (Jetson) runs fp16 or int8 only, with a static batch (MIN_BATCH = OPT_BATCH = MAX_BATCH).
set -euo pipefail
cd "$(dirname "$0")"

PRECISION=${1:-@PRECISION@}
MIN_BATCH=${MIN_BATCH:-@MIN_BATCH@}
OPT_BATCH=${OPT_BATCH:-@OPT_BATCH@}
MAX_BATCH=${MAX_BATCH:-@MAX_BATCH@}
WORKSPACE_MIB=${WORKSPACE_MIB:-@WORKSPACE_MIB@}
DLA_CORE=${DLA_CORE-@DLA_CORE@}
OUT=${OUT:-model.plan}
INPUT='@INPUT_NAME@'
CHW=3x@IMAGE_SIZE@x@IMAGE_SIZE@
# 1: model.onnx is explicitly quantized (Q/DQ nodes)
QDQ=@QDQ@
# the Triton repository's model.plan, replaced by each engine built here (empty: the repository runs the ONNX)
TRITON_PLAN='@TRITON_PLAN@'

die() { echo "error: $*" >&2; exit 2; }

case "$PRECISION" in
  fp32 | fp16) ;;
  int8) [ "$QDQ" = 1 ] || die "int8 needs the Q/DQ ONNX from 'cli.py calibrate --target tensorrt'; package \
that model" ;;
  *) die "precision must be fp32, fp16 or int8, not '$PRECISION'" ;;
esac
if [ -n "$DLA_CORE" ]; then
  [[ "$DLA_CORE" =~ ^[0-9]+$ ]] || die "DLA_CORE must be a DLA core number (0 or 1 on Xavier and Orin), not '$DLA_CORE'"
  [ "$PRECISION" != fp32 ] || die "DLA has no FP32: build fp16 or int8 for DLA_CORE=$DLA_CORE, or set DLA_CORE= \
(empty) to build fp32 for the GPU"
  if [ "$MIN_BATCH" != "$OPT_BATCH" ] || [ "$OPT_BATCH" != "$MAX_BATCH" ]; then
    die "DLA needs a static batch: MIN_BATCH, OPT_BATCH and MAX_BATCH equal (got $MIN_BATCH/$OPT_BATCH/$MAX_BATCH), \
e.g. MIN_BATCH=$MAX_BATCH OPT_BATCH=$MAX_BATCH; or set DLA_CORE= (empty) to build for the GPU"
  fi
fi

TRTEXEC=${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}
[ -x "$TRTEXEC" ] || die "trtexec not found: on a Jetson it is /usr/src/tensorrt/bin/trtexec (JetPack); elsewhere \
install TensorRT, or set TRTEXEC=/path/to/trtexec"

# the banner reads "[TensorRT v8502]" for 8.5.2, "[TensorRT v100300]" for 10.3.0, "[TensorRT v110400]" for 11.4
code=$("$TRTEXEC" --help 2>&1 | sed -n 's/.*TensorRT v\([0-9][0-9]*\).*/\1/p' | sed -n 1p)
[ -n "$code" ] || die "cannot read the TensorRT version from '$TRTEXEC --help'"
if [ "$code" -ge 100000 ]; then
  major=$((code / 10000)) minor=$((code / 100 % 100))
else
  major=$((code / 1000)) minor=$((code / 100 % 10))
fi
# 8.5 (JetPack 5.1) is the first with every name runner.py uses
if [ "$major" -lt 8 ] || { [ "$major" = 8 ] && [ "$minor" -lt 5 ]; }; then
  die "TensorRT $major.$minor found; 8.5 or later is needed: JetPack 5.1 or later on a Jetson, TensorRT 8.5 or \
later elsewhere"
fi

onnx=model.onnx
flags=()
if [ "$major" -ge 11 ] || { [ "$major" = 10 ] && [ "$minor" -ge 12 ]; }; then
  if [ "$major" = 10 ]; then flags+=(--stronglyTyped); fi
  if [ "$PRECISION" = fp16 ] && [ "$QDQ" != 1 ]; then onnx=model.fp16.onnx; fi
  if [ "$PRECISION" = fp16 ] && [ "$QDQ" = 1 ]; then
    echo "note: model.onnx has Q/DQ nodes: strongly typed, its Q/DQ layers run INT8 and the rest FP32 (no FP16 copy)"
  fi
else
  if [ "$QDQ" = 1 ]; then flags+=(--int8); fi
  if [ "$PRECISION" = fp16 ]; then flags+=(--fp16); fi
fi
if [ "$QDQ" = 1 ] && [ "$PRECISION" != int8 ]; then
  echo "note: model.onnx has Q/DQ nodes: those layers run INT8 in this $PRECISION build too"
fi
[ -f "$onnx" ] || die "$onnx is not in this bundle; package the model again with --precision $PRECISION"
if [ -n "$DLA_CORE" ]; then flags+=(--useDLACore="$DLA_CORE" --allowGPUFallback); fi
flags+=(@SPARSITY_FLAG@)  # --sparsity=enable when the packaged engine was built with sparse weights

# A timing cache holds one GPU's measurements and must not be reused on another device (NvInfer.h): name it after
# this GPU and TensorRT; without nvidia-smi (e.g. a Jetson before JetPack 6) build without one.
NVIDIA_SMI=${NVIDIA_SMI-$(command -v nvidia-smi || true)}
if [ -n "$NVIDIA_SMI" ] && gpu=$("$NVIDIA_SMI" --query-gpu=name,compute_cap --format=csv,noheader 2>/dev/null \
    | sed -n 1p) && [ -n "$gpu" ]; then
  flags+=(--timingCacheFile="timing.$(printf '%s' "$gpu" | tr -cs 'A-Za-z0-9.' '_').trt$code.cache")
fi

echo "building $OUT from $onnx with TensorRT $major.$minor ($PRECISION, batch $MIN_BATCH/$OPT_BATCH/$MAX_BATCH)"
# shellcheck disable=SC2086  # EXTRA_FLAGS is split on purpose
"$TRTEXEC" --onnx="$onnx" --saveEngine="$OUT" \
  --minShapes="$INPUT:${MIN_BATCH}x$CHW" --optShapes="$INPUT:${OPT_BATCH}x$CHW" --maxShapes="$INPUT:${MAX_BATCH}x$CHW" \
  --memPoolSize=workspace:"$WORKSPACE_MIB" ${flags[@]+"${flags[@]}"} ${EXTRA_FLAGS:-}

if [ -n "$TRITON_PLAN" ] && [ "$OUT" != "$TRITON_PLAN" ]; then
  if [ "$MIN_BATCH" = 1 ]; then
    cp "$OUT" "$TRITON_PLAN"
    echo "copied $OUT to $TRITON_PLAN (Triton loads it only if its own TensorRT is $major.$minor)"
  else
    echo "note: $TRITON_PLAN left as it was: Triton sends any batch from 1 up, and this engine starts at $MIN_BATCH"
  fi
fi
echo "wrote $OUT"
