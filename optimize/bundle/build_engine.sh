#!/usr/bin/env bash
# Build model.plan on THIS device from the bundle's ONNX with the device's own TensorRT (trtexec, 8.5 or later).
# A TensorRT engine runs only on the GPU model and TensorRT version that built it, so it is built where it runs.
#
# Usage: ./build_engine.sh [fp32|fp16|int8]            (default: @PRECISION@)
# Environment: TRTEXEC (path of trtexec), MIN_BATCH / OPT_BATCH / MAX_BATCH (default @MIN_BATCH@ / @OPT_BATCH@ /
#   @MAX_BATCH@), WORKSPACE_MIB (default @WORKSPACE_MIB@), OUT (default model.plan), DLA_CORE (the Jetson DLA core
#   to build for; default '@DLA_CORE@', empty meaning the GPU), INT8_HIGH_PRECISION (fp16 or fp32: what an INT8
#   engine runs its unquantized layers in; default @INT8_HIGH_PRECISION@), NVIDIA_SMI (path of nvidia-smi, which
#   names the timing cache and the GPU in the manifest; empty: neither), EXTRA_FLAGS (passed to trtexec), CHECK
#   (0: skip the acceptance check), CHECK_PYTHON (the Python running runner.py --check; default python3).
#
# Precision by TensorRT version (the same rules as 'cli.py build-engine'):
# - 8.5 to 10.11: builder flags. fp16: --fp16; int8: --int8 with the Q/DQ model.onnx (whose scales come from
#   edgeopt's calibration), plus --fp16 so the unquantized layers (residual Adds, pooling, the head's input) run
#   FP16, as NVIDIA Model Optimizer's INT8 models do (INT8_HIGH_PRECISION=fp32: --int8 alone, those layers FP32).
#   TensorRT refuses a network with Q/DQ nodes without --int8, so fp32 and fp16 builds of a Q/DQ model.onnx pass
#   it too: its Q/DQ layers run INT8 anyway.
# - 10.12 and later: strongly typed (the flags are deprecated on 10.12+ and gone in 11; --stronglyTyped is needed
#   on 10.x and a no-op on 11, so it is passed on 10.x only): the precision is in the ONNX. model.fp16.onnx (made
#   by 'package') is the FP16 copy: of an FP32 model for fp16; of the Q/DQ model for int8 with FP16 unquantized
#   layers (opset 19, float16 scales); model.onnx otherwise.
# DLA (Jetson) runs fp16 or int8 only, with a static batch (MIN_BATCH = OPT_BATCH = MAX_BATCH); Q/DQ INT8 on DLA
# needs TensorRT 10.0 or later (JetPack 6.1) and FP16 for the unquantized layers.
# After the build, $OUT.json records the TensorRT version, GPU, precision and profile: runner.py refuses a plan
# whose manifest names another TensorRT or GPU (the one 'package' shipped was built on the host). Then
# 'runner.py --check' holds the new plan to the host's accuracy on the bundle's acceptance set; a plan that fails
# is kept as $OUT.rejected (reason in $OUT.rejected.reason) and neither runner.py nor Triton gets it (exit 1).
set -euo pipefail
cd "$(dirname "$0")"

PRECISION=${1:-@PRECISION@}
MIN_BATCH=${MIN_BATCH:-@MIN_BATCH@}
OPT_BATCH=${OPT_BATCH:-@OPT_BATCH@}
MAX_BATCH=${MAX_BATCH:-@MAX_BATCH@}
WORKSPACE_MIB=${WORKSPACE_MIB:-@WORKSPACE_MIB@}
DLA_CORE=${DLA_CORE-@DLA_CORE@}
INT8_HIGH_PRECISION=${INT8_HIGH_PRECISION:-@INT8_HIGH_PRECISION@}
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
case "$INT8_HIGH_PRECISION" in
  fp16 | fp32) ;;
  *) die "INT8_HIGH_PRECISION must be fp16 or fp32, not '$INT8_HIGH_PRECISION'" ;;
esac
for var in MIN_BATCH OPT_BATCH MAX_BATCH WORKSPACE_MIB; do
  [[ "${!var}" =~ ^[1-9][0-9]*$ ]] || die "$var must be a positive whole number, not '${!var}'"
done
if [ -n "$DLA_CORE" ]; then
  [[ "$DLA_CORE" =~ ^(0|[1-9][0-9]*)$ ]] || die "DLA_CORE must be a DLA core number (0 or 1 on Xavier and Orin), \
not '$DLA_CORE'"
  [ "$PRECISION" != fp32 ] || die "DLA has no FP32: build fp16 or int8 for DLA_CORE=$DLA_CORE, or set DLA_CORE= \
(empty) to build fp32 for the GPU"
  if [ "$MIN_BATCH" != "$OPT_BATCH" ] || [ "$OPT_BATCH" != "$MAX_BATCH" ]; then
    die "DLA needs a static batch: MIN_BATCH, OPT_BATCH and MAX_BATCH equal (got $MIN_BATCH/$OPT_BATCH/$MAX_BATCH), \
e.g. MIN_BATCH=$MAX_BATCH OPT_BATCH=$MAX_BATCH; or set DLA_CORE= (empty) to build for the GPU"
  fi
  if [ "$QDQ" = 1 ] && [ "$PRECISION" = int8 ] && [ "$INT8_HIGH_PRECISION" = fp32 ]; then
    die "DLA has no FP32 for the unquantized layers of an INT8 engine: set INT8_HIGH_PRECISION=fp16, or DLA_CORE= \
(empty) to build for the GPU"
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
# @TRT_MIN_MAJOR@.@TRT_MIN_MINOR@ (JetPack 5.1) is the first with every name runner.py uses (package fills it in from
# optimize/tensorrt_backend.MIN_VERSION)
if [ "$major" -lt @TRT_MIN_MAJOR@ ] || { [ "$major" = @TRT_MIN_MAJOR@ ] && [ "$minor" -lt @TRT_MIN_MINOR@ ]; }; then
  die "TensorRT $major.$minor found; @TRT_MIN_MAJOR@.@TRT_MIN_MINOR@ or later is needed: JetPack 5.1 or later on a \
Jetson, TensorRT @TRT_MIN_MAJOR@.@TRT_MIN_MINOR@ or later elsewhere"
fi

if [ -n "$DLA_CORE" ] && [ "$QDQ" = 1 ] && [ "$major" -lt 10 ]; then
  die "TensorRT $major.$minor runs Q/DQ (explicitly quantized) INT8 on the GPU only; DLA takes it from TensorRT 10.0 \
(JetPack 6.1): set DLA_CORE= (empty) to build for the GPU, or package the FP32 ONNX and build fp16 for DLA"
fi

# the layers a Q/DQ model leaves unquantized run FP16 for an fp16 build, and for an int8 one unless told fp32
half=0
if [ "$PRECISION" = fp16 ] || { [ "$QDQ" = 1 ] && [ "$PRECISION" = int8 ] && [ "$INT8_HIGH_PRECISION" = fp16 ]; }; then
  half=1
fi
onnx=model.onnx
flags=()
if [ "$major" -ge 11 ] || { [ "$major" = 10 ] && [ "$minor" -ge 12 ]; }; then
  if [ "$major" = 10 ]; then flags+=(--stronglyTyped); fi
  if [ "$half" = 1 ]; then onnx=model.fp16.onnx; fi
else
  if [ "$QDQ" = 1 ]; then flags+=(--int8); fi
  if [ "$half" = 1 ]; then flags+=(--fp16); fi
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
gpu=
smi_device=()  # the GPU trtexec builds for: the first CUDA_VISIBLE_DEVICES entry, when it names one by index
if [[ "${CUDA_VISIBLE_DEVICES:-}" =~ ^([0-9]+) ]]; then smi_device=(-i "${BASH_REMATCH[1]}"); fi
if [ -n "$NVIDIA_SMI" ] && gpu=$("$NVIDIA_SMI" ${smi_device[@]+"${smi_device[@]}"} \
    --query-gpu=name,compute_cap --format=csv,noheader 2>/dev/null | sed -n 1p) && [ -n "$gpu" ]; then
  flags+=(--timingCacheFile="timing.$(printf '%s' "$gpu" | tr -cs 'A-Za-z0-9.' '_').trt$code.cache")
fi

echo "building $OUT from $onnx with TensorRT $major.$minor ($PRECISION, batch $MIN_BATCH/$OPT_BATCH/$MAX_BATCH)"
# shellcheck disable=SC2086  # EXTRA_FLAGS is split on purpose
"$TRTEXEC" --onnx="$onnx" --saveEngine="$OUT" \
  --minShapes="$INPUT:${MIN_BATCH}x$CHW" --optShapes="$INPUT:${OPT_BATCH}x$CHW" --maxShapes="$INPUT:${MAX_BATCH}x$CHW" \
  --memPoolSize=workspace:"$WORKSPACE_MIB" ${flags[@]+"${flags[@]}"} ${EXTRA_FLAGS:-}

# the manifest of what was just built (runner.py checks it before loading the plan), with the acceptance check's
# outcome: write_manifest FILE CHECK, CHECK a JSON value
json_text() { if [ -n "$1" ]; then printf '"%s"' "$(printf '%s' "$1" | tr -d '"\\')"; else printf null; fi; }
gpu_name=${gpu%,*} compute_cap=${gpu##*, }
[ -n "$gpu" ] || compute_cap=
if [ "$QDQ" = 1 ] && [ "$PRECISION" = int8 ]; then high=$(json_text "$INT8_HIGH_PRECISION"); else high=null; fi
write_manifest() {
  local fmt='{"stage": "build_engine.sh", "onnx": "%s", "engine": {"backend": "tensorrt", "tensorrt": "%s", '
  fmt+='"gpu": %s, "compute_capability": %s, "precision": "%s", "profile": {"min_batch": %s, "opt_batch": %s, '
  fmt+='"max_batch": %s}, "flags": {"dla_core": %s, "int8_high_precision": %s}}, "check": %s}\n'
  # shellcheck disable=SC2059  # the format is ours
  printf "$fmt" "$onnx" "$major.$minor.$((code % 100))" "$(json_text "$gpu_name")" "$(json_text "$compute_cap")" \
    "$PRECISION" "$MIN_BATCH" "$OPT_BATCH" "$MAX_BATCH" "${DLA_CORE:-null}" "$high" "$2" > "$1.tmp"
  mv "$1.tmp" "$1"
}
write_manifest "$OUT.json" '"pending"'

# the acceptance check (runner.py --check against the host's reference in check/): a plan that fails it is not
# installed: it stays beside as $OUT.rejected, with the check's report as $OUT.rejected.reason, and Triton's plan
# is left as it was. CHECK=0 skips it; CHECK_PYTHON is the Python that runs runner.py.
CHECK=${CHECK:-1}
CHECK_PYTHON=${CHECK_PYTHON:-python3}
checked='"not run"'
if [ "$CHECK" = 1 ] && [ -f check/reference.json ]; then
  echo "checking $OUT against the host's reference (runner.py --check)"
  rc=0
  rm -f check.json
  "$CHECK_PYTHON" runner.py --check --model "$OUT" --out . || rc=$?
  # exit 1 with a verdict written is a failed check; a Python that could not run runner.py also exits 1
  if [ "$rc" = 1 ] && grep -q '"passed": false' check.json 2>/dev/null; then
    mv "$OUT" "$OUT.rejected"
    write_manifest "$OUT.rejected.json" '"failed"'
    rm -f "$OUT.json"
    cp check.md "$OUT.rejected.reason" 2>/dev/null ||
      echo "runner.py --check failed (it wrote no check.md)" > "$OUT.rejected.reason"
    echo "error: $OUT failed the acceptance check and was not installed: kept as $OUT.rejected, the reason in" \
         "$OUT.rejected.reason" >&2
    exit 1
  elif [ "$rc" = 0 ]; then
    checked='"passed"'
  else
    echo "warning: the acceptance check could not run (runner.py --check exit $rc, no verdict; it needs numpy," \
         "Pillow, TensorRT and a CUDA binding): $OUT is installed unchecked" >&2
  fi
elif [ "$CHECK" = 1 ]; then
  echo "note: this bundle has no acceptance set (check/): $OUT is installed unchecked"
fi
write_manifest "$OUT.json" "$checked"

if [ -n "$TRITON_PLAN" ] && [ "$OUT" != "$TRITON_PLAN" ]; then
  if [ "$MIN_BATCH" = 1 ]; then
    cp "$OUT" "$TRITON_PLAN"
    echo "copied $OUT to $TRITON_PLAN (Triton loads it only if its own TensorRT is $major.$minor)"
  else
    echo "note: $TRITON_PLAN left as it was: Triton sends any batch from 1 up, and this engine starts at $MIN_BATCH"
  fi
fi
echo "wrote $OUT"
