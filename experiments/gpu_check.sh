#!/usr/bin/env bash
# The GPU measurements of the speed work in one run (about 6 minutes on an H200; the default
# parts' limits add up to 570 s), for a machine that has JAX with CUDA, flax, optax, orbax and
# torch but neither TensorFlow nor tfds nor a package registry (the device machine this project
# borrows):
#
#   OUT=/some/folder PSA_ROOT=.psa bash experiments/gpu_check.sh PEAK_TFLOPS
#
# PEAK_TFLOPS: the GPU's dense bfloat16 peak, for the FLOPs utilisation (H100/H200 SXM: 989).
# PSA_ROOT: a checkout of github.com/jiwoon-ahn/psa inside the copied tree (e.g. `.psa`, carried
# along as an ignored path); without it only our side runs. PYTHON: the interpreter (default
# python3). The walk's stage measurement needs ml_collections; where it is missing, put its
# wheel on PYTHONPATH first.
#
# Writes to $OUT, most important first, each part under its own time limit so that a slow part
# cannot take the others down with it, and its output unbuffered so that a part stopped at its
# limit still leaves what it printed:
#   env.txt          the GPU, driver, versions, and each part's exit status
#   cam_train.*      the CAM network's train step at the original's settings (batch 16, crop
#                    448), float32 and bfloat16, ours vs the original (float32, as it ships)
#   train200.*       200 back-to-back CAM training steps, batch 16, crop 448, bfloat16 vs the
#                    original's float32
#   models.*         AffinityNet's train step, CAM / AffinityNet / segmentation inference at the
#                    original's settings, float32 and bfloat16
#   walk.txt         the random-walk benchmark (stride 8 and stride 4, present classes, the
#                    stage's per-batch work at ResNet-38's width: one compile per channel count)
#   irn_walk.txt     IRN's walk at stride 4 (our sparse walk; its dense one is not run here)
#   vgg16.*          (only when named in GPU_CHECK_PARTS) VGG-16: AffinityNet's train step and
#                    CAM inference at the original's settings, float32 and bfloat16, ours vs
#                    the original; 1-2 minutes more, best run alone (GPU_CHECK_PARTS=vgg16):
#                    with the default parts its limit would pass a 10-minute command
# GPU_CHECK_PARTS=cam_train,models runs only the parts named (default: all but vgg16, so that
# the default run fits in a 10-minute command).
# GPU_CHECK_SMALL=1 shrinks every size and count, to try the script on a CPU (3 minutes on 2
# cores here, the networks still at full width).
set -u
PARTS="cam_train,train200,models,vgg16,walk,irn_walk"
DEFAULT_PARTS="cam_train,train200,models,walk,irn_walk"
PEAK=${1:-989}
OUT=${OUT:-/tmp/affinity_jax_gpu}
PY=${PYTHON:-python3}
SELECTED=${GPU_CHECK_PARTS:-$DEFAULT_PARTS}
SELECTED=${SELECTED// /}
for name in ${SELECTED//,/ }; do
  case ",$PARTS," in *",$name,"*) ;; *)
    echo "GPU_CHECK_PARTS: unknown part '$name' (parts: $PARTS)" >&2; exit 2;; esac
done
mkdir -p "$OUT"
# Paths given relative to where the script starts: made absolute, the parts run in experiments/.
OUT=$(cd "$OUT" && pwd)
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")";; esac
PSA=()
if [ -n "${PSA_ROOT:-}" ] && [ -d "$PSA_ROOT/network" ]; then
  PSA=(--psa-root "$(cd "$PSA_ROOT" && pwd)")
fi
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TF_CPP_MIN_LOG_LEVEL=2 XLA_PYTHON_CLIENT_PREALLOCATE=false
SIZES=(--settings original)
STEPS=200 REPEATS=5 WARMUP=2 WALK=() LIMIT=1
if [ -n "${GPU_CHECK_SMALL:-}" ]; then
  SIZES=(--settings small --cam-batch 2 --cam-crop 96 --aff-batch 2 --aff-crop 96
         --infer-size 96x96)
  STEPS=2 REPEATS=1 WARMUP=1 WALK=(--quick --stage-width 0.125) LIMIT=4
fi

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv 2>&1;
  "$PY" -c "import sys, jax, flax, optax; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__)";
  "$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0), 'cudnn', torch.backends.cudnn.version())";
  "$PY" -c "import ml_collections; print('ml_collections', ml_collections.__version__)"; } \
  > "$OUT/env.txt" 2>&1

part() {  # part NAME SECONDS COMMAND...: run COMMAND under a limit, output to $OUT/NAME.txt
  local name=$1 limit=$(( $2 * LIMIT )) t0=$SECONDS
  shift 2
  case ",$SELECTED," in *",$name,"*) ;; *) return;; esac
  (cd experiments && timeout "$limit" "$PY" "$@") > "$OUT/$name.txt" 2>&1
  echo "$name: exit $? after $(( SECONDS - t0 )) s (limit $limit s)" | tee -a "$OUT/env.txt"
}

part cam_train 130 benchmark_models.py ${PSA[@]+"${PSA[@]}"} "${SIZES[@]}" --parts cam_train \
  --dtypes float32,bfloat16 --peak-tflops "$PEAK" --repeats "$REPEATS" --warmup "$WARMUP" \
  --json "$OUT/cam_train.json"
part train200 80 benchmark_models.py ${PSA[@]+"${PSA[@]}"} "${SIZES[@]}" --parts cam_train \
  --dtypes bfloat16 --steps "$STEPS" --repeats 1 --warmup 1 --peak-tflops "$PEAK" \
  --json "$OUT/train200.json"
part models 200 benchmark_models.py ${PSA[@]+"${PSA[@]}"} "${SIZES[@]}" \
  --parts aff_train,cam_infer,aff_infer,seg_infer --dtypes float32,bfloat16 \
  --peak-tflops "$PEAK" --repeats "$REPEATS" --warmup "$WARMUP" --json "$OUT/models.json"
part vgg16 150 benchmark_models.py ${PSA[@]+"${PSA[@]}"} "${SIZES[@]}" --backbone vgg16 \
  --parts aff_train,cam_infer --dtypes float32,bfloat16 --peak-tflops "$PEAK" \
  --repeats "$REPEATS" --warmup "$WARMUP" --json "$OUT/vgg16.json"
part walk 120 benchmark_random_walk.py ${WALK[@]+"${WALK[@]}"}
part irn_walk 40 benchmark_random_walk.py --irn
# The tables, or for a part stopped at its limit the rows it printed as it went.
for f in ${SELECTED//,/ }; do
  [ -f "$OUT/$f.txt" ] && { grep -h '^|' "$OUT/$f.txt" || grep -h '\]: JAX ' "$OUT/$f.txt"; }
done
cat "$OUT/env.txt"
