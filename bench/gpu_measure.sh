#!/usr/bin/env bash
# Issue 13's GPU figures in one call on the lent machine (JAX, no TensorFlow or Prefect there): each run a
# process of its own, so the second of a pair finds JAX's persistent compilation cache warm, as a second
# `train-cifar` on the machine would. Prepare here (bench/RESULTS.md): the wheels in .whl/, the pack in .devdata/.
#
#   bash bench/gpu_measure.sh              # on the GPU machine; lines go to $OUT/runs.jsonl
#   bash bench/gpu_measure.sh short        # only the first four: default and gpu, cold then warm (about 4 min)
#   bash bench/gpu_measure.sh crop         # a second call, if time is left: the CPU's crop lever over three seeds
#   SMOKE=1 bash bench/gpu_measure.sh      # the same script on this CPU, on a small slice for one epoch
set -uo pipefail
MODE=${1:-main}
case $MODE in
  main | short | crop) ;;
  *) echo "bench/gpu_measure.sh: unknown measurement '$MODE'; choose main, short or crop" >&2; exit 2 ;;
esac
OUT=${OUT:-/tmp/gpu_measure}
DATA=${DATA:-/tmp/cifar10}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null && ! $PYTHON -c "import keras" 2> /dev/null; then
  $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jax-cache}
[ "$MODE" != crop ] && rm -rf "$JAX_COMPILATION_CACHE_DIR"  # the first run of each recipe compiles cold
[ -d "$DATA" ] || $PYTHON bench/unpack_image_folder.py .devdata/cifar10.npz "$DATA" || exit 1
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; $PYTHON -c "import jax, keras; print(jax.__version__, keras.__version__, jax.devices())") > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
SLICE=()
[ -n "${SMOKE:-}" ] && SLICE=(--set max_train_images=1000 --set max_test_images=500 --set epochs=1)

run() {  # a label, then train_jax.py's arguments
  local label=$1; shift
  local started=$SECONDS
  $PYTHON bench/train_jax.py --cifar "$DATA" --artifacts /tmp/gpu-artifacts --out "$OUT/runs.jsonl" "${SLICE[@]}" "$@" \
    2>> "$OUT/stderr.log" | sed "s/^/$label: /"
  echo "$label: process $((SECONDS - started)) s"
}

if [ "$MODE" = crop ]; then
  # On the CPU, 10 epochs with the first 6 on 24-pixel windows scored 90.68% over two seeds against 90.80%
  # for default's 8 on whole images, in about the same time (bench/RESULTS.md); seeds cost seconds here.
  for seed in 0 1 2; do
    run "default-fit-s$seed" --mode fit --set seed=$seed --runs cifar:default:auto:1e-3
    run "default-crop6of10-s$seed" --mode fit --set seed=$seed --crops 6:24 --runs cifar:default:auto:1e-3:10
  done
  exit 0
fi

# In order of need, so a call cut short still brings back the first ones.
run default-cold --mode train --runs cifar:default:auto:1e-3
run default-warm --mode train --runs cifar:default:auto:1e-3
run gpu-cold --mode train --runs cifar:gpu:auto:1e-3
run gpu-warm --mode train --runs cifar:gpu:auto:1e-3
[ "$MODE" = short ] && exit 0
run airbench94-cold --mode train --runs cifar:airbench94:auto:1e-3
run airbench94-warm --mode train --runs cifar:airbench94:auto:1e-3
run default-w1.5-e12-cold --mode train --set network_width=1.5 --runs cifar:default:auto:1e-3:12
run airbench94-warm-per-step-sync --mode train --per-step-sync --runs cifar:airbench94:auto:1e-3
run airbench94-w1.5-e15-tta6-cold --mode train --set network_width=1.5 --set tta_translate=true --runs cifar:airbench94:auto:1e-3:15
run airbench94-warm-bare-fit --mode fit --runs cifar:airbench94:auto:1e-3
