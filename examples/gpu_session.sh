#!/usr/bin/env bash
# One session on a lent CUDA machine, sized to fit ~10 minutes: install ispc from this checkout
# (that machine reaches no package registry: --no-index --no-deps, its own torch), decode CIFAR-10
# once, then at the same time
#   - the test suite on the CPU cores (CUDA tests included: the Triton kernel runs for real), and
#   - a feature-decay sweep of ResNet-20s trained from scratch (examples/cifar_sweep.py: the runs
#     share the GPU and get the same number of epochs, as many as fit TRAIN_BUDGET seconds),
# then examples/gpu_check.py (Triton kernel vs reference, layer and model timings, and the trained
# checkpoints gated on the GPU and, once, on the CPU).
#
#   bash examples/gpu_session.sh CIFAR_TAR_GZ OUT [TRAIN_BUDGET_SECONDS]
#
# OUT receives session.log, pytest.log, gpu_check.json, sweep.json and runs.tar.gz (each run's
# final.pt, log and console output).
#
# As run on 2026-12-04 (README, "On a GPU"): the four feature-decay runs below died in their first
# epoch (the regularizer at full weight from the first step; add --feature-decay-ramp), and the
# five processes sharing the GPU got 24 epochs each in 300 s, where one run alone gets ~100 in a
# 15-minute lease: for a training run that matters, give it the GPU alone.
set -uo pipefail
DATA=$1
OUT=$2
BUDGET=${3:-300}
WORK=/tmp/ispc_session
mkdir -p "$OUT" "$WORK"
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/session.log"; }

python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$WORK/install.log" 2>&1 \
    || { log "install failed:"; tail -20 "$WORK/install.log" | tee -a "$OUT/session.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv \
    2>&1 | tee -a "$OUT/session.log"
python3 -c "import torch, triton, ispc, ispc.passes; from ispc.ops import native; \
print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(), \
'native kernel:', native.available() or native.unavailable_reason())" 2>&1 | tee -a "$OUT/session.log"
export ISPC_CACHE_DIR=$WORK/cache
python3 -c "from ispc.datasets import CIFAR10; d = CIFAR10('$DATA', progress=False); \
d.arrays('train'); d.arrays('test')" 2>&1 | tee -a "$OUT/session.log"
log "installed, data decoded"

(OMP_NUM_THREADS=1 timeout 420 python3 -m pytest -q -n 6 -p no:cacheprovider >"$OUT/pytest.log" 2>&1
 echo "pytest exit $?" >>"$OUT/pytest.log") &
TESTS=$!

KD="--distill-from checkpoints/resnet20_dense.pt checkpoints/resnet20_dense_e50.pt --distill-weight 0.5"
python3 examples/cifar_sweep.py --budget "$BUDGET" --grace 20 --probe-timeout 120 --out "$WORK/sweep" \
    --common "--data $DATA --device cuda --threads 2 --no-progress --batch-size 256 --lr 0.2" \
    --run "dense=train --model resnet20" \
    --run "fd3=train --model resnet20 --feature-decay 3e-4" \
    --run "fd6=train --model resnet20 --feature-decay 6e-4" \
    --run "fd10=train --model resnet20 --feature-decay 1e-3" \
    --run "fd6kd=train --model resnet20 --feature-decay 6e-4 $KD" 2>&1 | tee -a "$OUT/session.log"
cp "$WORK/sweep/summary.json" "$OUT/sweep.json" 2>/dev/null
log "sweep done"

CKPTS=$(ls "$WORK"/sweep/*/final.pt 2>/dev/null)
[ -z "$CKPTS" ] && CKPTS=$(ls "$WORK"/sweep/*/best.pt 2>/dev/null)  # the budget ran out: best so far
timeout 170 python3 examples/gpu_check.py --json "$OUT/gpu_check.json" --data "$DATA" \
    --sections kernel cifar layers models --checkpoints $CKPTS 2>&1 | tee -a "$OUT/session.log"
log "gpu_check done"

(cd "$WORK/sweep" && tar czf "$OUT/runs.tar.gz" ./*.out ./*/log.jsonl ./*/final.pt ./*/best.pt 2>/dev/null)
kill "$TESTS" 2>/dev/null
wait "$TESTS" 2>/dev/null
log "end"
