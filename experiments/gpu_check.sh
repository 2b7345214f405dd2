#!/usr/bin/env bash
# Every GPU measurement of the speed work in one run of at most ~8 minutes, for a machine that
# has JAX with CUDA, flax, optax, orbax and torch but neither TensorFlow nor tfds nor a package
# registry (the device machine this project borrows). From the repository root:
#
#   OUT=/some/folder PSA_ROOT=.psa bash experiments/gpu_check.sh PEAK_TFLOPS
#
# PEAK_TFLOPS: the GPU's dense bfloat16 peak, for the FLOPs utilisation (H100/H200 SXM: 989).
# PSA_ROOT: a checkout of github.com/jiwoon-ahn/psa inside the copied tree (e.g. `.psa`, carried
# along as an ignored path); without it only our side runs.
# Writes to $OUT: env.txt, models.{txt,json} (both networks' train steps and inference at the
# original's settings, float32 and bfloat16, ours vs the original), walk.txt (the random walk
# at stride 8 and stride 4), train200.{txt,json} (200 back-to-back CAM training steps at batch
# 16, crop 448, bfloat16, ours vs the original's float32). Each part has its own time limit, so
# a slow part cannot take the others down with it.
set -u
PEAK=${1:-989}
OUT=${OUT:-/tmp/affinity_jax_gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=2 XLA_PYTHON_CLIENT_PREALLOCATE=false
PSA=()
if [ -n "${PSA_ROOT:-}" ] && [ -d "$PSA_ROOT/network" ]; then PSA=(--psa-root "$PSA_ROOT"); fi

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
  python -c "import jax, flax, optax; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__)";
  python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"; } \
  > "$OUT/env.txt" 2>&1

cd experiments
timeout 270 python benchmark_models.py "${PSA[@]}" --settings original \
  --parts cam_train,aff_train,cam_infer,aff_infer,seg_infer --dtypes float32,bfloat16 \
  --peak-tflops "$PEAK" --repeats 5 --warmup 2 --json "$OUT/models.json" > "$OUT/models.txt" 2>&1
echo "models: exit $?" >> "$OUT/env.txt"
timeout 90 python benchmark_random_walk.py > "$OUT/walk.txt" 2>&1
echo "walk: exit $?" >> "$OUT/env.txt"
timeout 120 python benchmark_models.py "${PSA[@]}" --settings original --parts cam_train \
  --dtypes bfloat16 --steps 200 --repeats 1 --warmup 1 --peak-tflops "$PEAK" \
  --json "$OUT/train200.json" > "$OUT/train200.txt" 2>&1
echo "train200: exit $?" >> "$OUT/env.txt"
tail -n 30 "$OUT"/models.txt "$OUT"/walk.txt "$OUT"/train200.txt
