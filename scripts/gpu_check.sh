#!/usr/bin/env bash
# The CUDA path, checked and timed in one go on a GPU machine, from a plain checkout (no install):
#
#   mkdir -p .data/mnist && cp ~/.cache/mnist-cloud/mnist/*.gz .data/mnist/     # beforehand (.data/ is git-ignored)
#   scripts/gpu_check.sh OUT                                                      # on the GPU machine
#
# Needs python3 with torch, tqdm and pytest; no boto3, fabric or moto. Writes into OUT: gpu_check.log
# (everything printed), gpu_bench.json and gpu_bench.md (every variant of the default recipe, the
# winner on seeds 1-5), launches.json (kernels per step). Steps, cheapest first, so that a cut-short
# run still leaves the most: the kernel count, the variants, torchrun, a GPU run resumed on the CPU,
# then the `cuda` tests. QUICK=1 shrinks everything to a smoke test of this script (on the CPU too).
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUT}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 MNIST_DATA_DIR=${MNIST_DATA_DIR:-$PWD/.data/mnist}
RUNS=${RUNS:-$(mktemp -d /tmp/gpu-check-runs.XXXX)}
DEVICE=${DEVICE:-cuda}
failed=()
step() { echo; echo "== $1 ($(date +%T))"; shift; "$@" || { echo "!! failed (exit $?): $*"; failed+=("$*"); }; }

echo "== machine"
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
python3 -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| GPU', torch.cuda.get_device_name() if torch.cuda.is_available() else None, torch.cuda.get_device_capability() if torch.cuda.is_available() else '')"

if [[ ${QUICK:-0} == 1 ]]; then
  BENCH=(--quick --variants fp32,graph --seeds 1 --winner-seeds "" --bar 0)
  SHORT=(--train-limit 4096 --eval-limit 500 --epochs 1)
else
  BENCH=()
  SHORT=()
  step "kernel launches per step" python3 scripts/step_launches.py --json "$OUT/launches.json" --out "$RUNS/launches"
fi

step "variants of the default recipe (2 seeds each, the winner on seeds 1-5)" \
  python3 scripts/gpu_bench.py --device "$DEVICE" --out "$OUT" --runs "$RUNS/bench" "${BENCH[@]}"

TRAIN=(python3 -m trainer train --no-progress --no-report --out-dir "$RUNS" "${SHORT[@]}")
step "torchrun, one process, one epoch" \
  python3 -m torch.distributed.run --standalone --nproc_per_node 1 -m trainer train --no-progress --no-report \
    --out-dir "$RUNS" --run-id torchrun-1 --epochs 1 --device "$DEVICE" "${SHORT[@]}"
for kind in default graph; do
  flags=(); [[ $kind == graph ]] && flags=(--cuda-graph)
  step "a $kind run: epoch 1 on $DEVICE, resumed on the CPU for epoch 2" \
    "${TRAIN[@]}" --device "$DEVICE" --epochs 2 --stop-after 1 --run-id "moved-$kind" --train-limit 8192 \
      --eval-limit 1000 "${flags[@]}"
  step "... resumed on the CPU" python3 -m trainer train --no-progress --resume "$RUNS/moved-$kind" --device cpu
done

step "the cuda tests" python3 -m pytest -q -m cuda tests/test_accelerators.py -p no:cacheprovider

echo
echo "== gpu_bench.md"
cat "$OUT/gpu_bench.md" 2>/dev/null
echo "== failed steps: ${#failed[@]}"
for f in "${failed[@]}"; do echo "  $f"; done
[[ ${#failed[@]} == 0 ]]
