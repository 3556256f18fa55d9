#!/usr/bin/env bash
# Build model.plan on THIS device from the bundle's ONNX with the device's own TensorRT (trtexec).
# A TensorRT engine runs only on the GPU model and TensorRT version that built it, so it is built where it runs.
#
# Usage: ./build_engine.sh [fp32|fp16|int8]            (default: @PRECISION@)
# Environment: TRTEXEC (path of trtexec), MIN_BATCH / OPT_BATCH / MAX_BATCH (default @MIN_BATCH@ / @OPT_BATCH@ /
#   @MAX_BATCH@), WORKSPACE_MIB (default @WORKSPACE_MIB@), OUT (default model.plan), EXTRA_FLAGS (passed to trtexec).
#
# TensorRT 8.6 / 10.x: precision from builder flags (--fp16; --int8 with the Q/DQ ONNX, whose scales come from
# edgeopt's calibration). TensorRT 11.x is strongly typed only: no precision flags; the precision is in the ONNX
# (model.fp16.onnx for fp16, the Q/DQ model.onnx for int8).
set -euo pipefail
cd "$(dirname "$0")"

PRECISION=${1:-@PRECISION@}
MIN_BATCH=${MIN_BATCH:-@MIN_BATCH@}
OPT_BATCH=${OPT_BATCH:-@OPT_BATCH@}
MAX_BATCH=${MAX_BATCH:-@MAX_BATCH@}
WORKSPACE_MIB=${WORKSPACE_MIB:-@WORKSPACE_MIB@}
OUT=${OUT:-model.plan}
INPUT='@INPUT_NAME@'
CHW=3x@IMAGE_SIZE@x@IMAGE_SIZE@
# 1: model.onnx is explicitly quantized (Q/DQ nodes), so int8 can be built from it
QDQ=@QDQ@
# the Triton repository's model.plan, replaced by each engine built here (empty: the repository runs the ONNX)
TRITON_PLAN='@TRITON_PLAN@'

die() { echo "error: $*" >&2; exit 2; }

TRTEXEC=${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}
[ -x "$TRTEXEC" ] || die "trtexec not found: on a Jetson it is /usr/src/tensorrt/bin/trtexec (JetPack); elsewhere \
install TensorRT, or set TRTEXEC=/path/to/trtexec"

# the banner reads "[TensorRT v8601]" for 8.6.1 and "[TensorRT v100300]" for 10.3.0
code=$("$TRTEXEC" --help 2>&1 | sed -n 's/.*TensorRT v\([0-9][0-9]*\).*/\1/p' | head -n 1)
[ -n "$code" ] || die "cannot read the TensorRT version from '$TRTEXEC --help'"
if [ "$code" -ge 100000 ]; then major=$((code / 10000)); else major=$((code / 1000)); fi
[ "$major" -ge 8 ] || die "TensorRT $major found; 8.6 or later is needed"

onnx=model.onnx
flags=()
case "$PRECISION" in
  fp32) ;;
  fp16) if [ "$major" -ge 11 ]; then onnx=model.fp16.onnx; else flags+=(--fp16); fi ;;
  int8) [ "$QDQ" = 1 ] || die "int8 needs the Q/DQ ONNX from 'cli.py calibrate --target tensorrt'; package that model"
        if [ "$major" -lt 11 ]; then flags+=(--int8 --fp16); fi ;;  # fp16 for the layers left unquantized
  *) die "precision must be fp32, fp16 or int8, not '$PRECISION'" ;;
esac
if [ "$major" -ge 11 ]; then flags+=(--stronglyTyped); fi
[ -f "$onnx" ] || die "$onnx is not in this bundle; package the model again with --precision $PRECISION"
flags+=(@DEVICE_FLAGS@)

echo "building $OUT from $onnx with TensorRT $major ($PRECISION, batch $MIN_BATCH/$OPT_BATCH/$MAX_BATCH)"
# shellcheck disable=SC2086  # EXTRA_FLAGS is split on purpose
"$TRTEXEC" --onnx="$onnx" --saveEngine="$OUT" \
  --minShapes="$INPUT:${MIN_BATCH}x$CHW" --optShapes="$INPUT:${OPT_BATCH}x$CHW" --maxShapes="$INPUT:${MAX_BATCH}x$CHW" \
  --memPoolSize=workspace:"$WORKSPACE_MIB" --timingCacheFile=timing.cache ${flags[@]+"${flags[@]}"} ${EXTRA_FLAGS:-}

if [ -n "$TRITON_PLAN" ] && [ "$OUT" != "$TRITON_PLAN" ]; then
  cp "$OUT" "$TRITON_PLAN"
  echo "copied $OUT to $TRITON_PLAN"
fi
echo "wrote $OUT"
