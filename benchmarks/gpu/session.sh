#!/usr/bin/env bash
# One session on a lent CUDA machine, sized for ~9 minutes on an H100: install ispc from this
# checkout (that machine reaches no package registry: --no-index --no-deps, on its own torch and
# triton), run the CUDA tests, then benchmarks/gpu/run.py (correctness against float64, per-layer
# and whole-model timings under CUDA graphs).
#
#   bash benchmarks/gpu/session.sh [OUT]      # OUT defaults to $OUT (the device tool's folder)
#
# OUT receives session.log, install.log, pytest.log and gpu_results.json (the last written after
# every unit of work: a run stopped by its time limit keeps what it finished).
set -uo pipefail
OUT=${1:-${OUT:-/tmp/ispc_gpu_out}}
RUN_BUDGET=${RUN_BUDGET:-330}   # run.py starts no new unit after this many seconds
RUN_LIMIT=${RUN_LIMIT:-420}     # ... and is stopped after this many
mkdir -p "$OUT"
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/session.log"; }
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/ispc_triton_cache ISPC_CACHE_DIR=/tmp/ispc_cache
export TRITON_DEFAULT_FP_FUSION=1

python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
    || { log "install failed:"; tail -20 "$OUT/install.log" | tee -a "$OUT/session.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
    --format=csv 2>&1 | tee -a "$OUT/session.log"
python3 -c "import torch, triton, ispc; from ispc.ops import triton_gated_conv as t; \
print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(), \
'float32 as', t.float32_precision())" 2>&1 | tee -a "$OUT/session.log"
log "installed"

# the tests that run the kernels on the GPU (Triton, CUDA graphs; the interpreter cases too)
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/ispc/ops/test_triton_gated_conv.py \
    tests/ispc/backends/test_cuda_graphs.py >"$OUT/pytest.log" 2>&1
echo "pytest exit $?" >>"$OUT/pytest.log"
tail -3 "$OUT/pytest.log" | tee -a "$OUT/session.log"
log "tests done"

timeout "$RUN_LIMIT" python3 benchmarks/gpu/run.py --out "$OUT" --budget-s "$RUN_BUDGET" 2>&1 \
    | tee -a "$OUT/session.log"
log "end (run.py exit ${PIPESTATUS[0]})"
