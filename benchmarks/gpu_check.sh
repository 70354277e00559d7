#!/usr/bin/env bash
# One command for a fresh GPU machine (torch + triton preinstalled, no package registry), <= 10 min:
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]        # default results/gpu-<UTC time>
#
# 1. pytest -m gpu (tests/test_gpu.py: float64 reference, N*V > 2**31, strided in-place views, fp16
#    with a loss scale, bitwise determinism, no host sync under set_sync_debug_mode("error"), ...)
# 2. the fused_loss table (copy floor, dense, torch.compile, Liger, fastfuse: ms, extra MiB, of floor)
# 3. the fused_linear_loss table (matmul floor, naive, Liger, CCE where importable, fastfuse)
# 4. each divergence x tail's time relative to "ce" and to the copy floor (bench_divergences.py)
# 5. registers / spills of every kernel launch under this machine's Triton
# 6. the vocabulary-parallel loss on a one-rank NCCL group against the one-GPU loss (gpu_tp_loss.py --quick)
# Everything goes to OUT_DIR (one log per step, CSVs, junit XML); a summary prints at the end.
# Pure-Python extras (liger-kernel, cut-cross-entropy) are installed from ./.whl/*.whl if present.
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${1:-$ROOT/results/gpu-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export OUT
PY=${PYTHON:-python}
declare -a SUMMARY=()

if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install --no-index --no-deps --find-links .whl .whl/*.whl > "$OUT/pip.log" 2>&1 \
        || echo "(some wheels in .whl/ did not install: see pip.log)"
fi

# fastfuse.kernels is kernels/ mapped by the wheel build; without an installed fastfuse (the C++ core
# may be missing: the loss does not need it) link the source folders into a scratch path instead.
if ! $PY -c "import fastfuse.loss, fastfuse.kernels.fused_ce" > /dev/null 2>&1; then
    SHIM=$(mktemp -d)
    mkdir "$SHIM/fastfuse"
    for f in fastfuse/*; do ln -s "$ROOT/$f" "$SHIM/fastfuse/"; done
    ln -s "$ROOT/kernels" "$SHIM/fastfuse/kernels"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    trap 'rm -rf "$SHIM"' EXIT
    echo "(fastfuse not installed: using $SHIM, fastfuse/ + kernels/ as fastfuse.kernels)"
fi

step() {   # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "== $name"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    tail -n 40 "$OUT/$name.log"
    SUMMARY+=("$(printf '%-16s %s (%ss)' "$name" "$([ $rc -eq 0 ] && echo ok || echo "FAILED rc=$rc")" $((SECONDS - t0)))")
}

$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
    | tee "$OUT/versions.txt"
# (from tests/: "python -m" puts the working directory first on the path, and the source tree's
# fastfuse/ -- no kernels/ inside -- must not shadow the installed or linked package)
step gpu_tests 210 bash -c "cd tests && $PY -m pytest test_gpu.py -m gpu -q -p no:cacheprovider -rfs \
    --junitxml='$OUT/gpu_tests.xml'"
step loss_table 120 $PY benchmarks/gpu_loss.py --no-check --quick
step linear_table 90 $PY benchmarks/gpu_linear_loss.py --no-check --no-sweep --csv "$OUT/bench_linear_loss.csv"
step divergence_table 60 $PY benchmarks/bench_divergences.py --csv "$OUT/bench_divergences.csv"
step kernel_resources 45 $PY benchmarks/kernel_resources.py
step tp_loss 60 $PY benchmarks/gpu_tp_loss.py --quick --csv "$OUT/gpu_tp_loss.csv"

echo
echo "== summary ($OUT)"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
grep -hE "passed|failed|skipped|error" "$OUT/gpu_tests.log" | tail -n 1 | tee -a "$OUT/summary.txt"
! grep -q FAILED "$OUT/summary.txt"
