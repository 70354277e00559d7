#!/usr/bin/env bash
# The GPU window's one command (a fresh machine: torch + triton preinstalled, no network):
#
#     bash benchmarks/gpu_check.sh [OUT_DIR] [--deadline S] [--pack DIR] [--only a,b] [--dry-run]
#
# runs benchmarks/gpu_check.py with python3 (or $PYTHON): the gpu tests, the loss / candidates /
# divergence / linear / TP tables under ONE deadline (default 8 min) that kills each step's process
# group, a summary of every target and its ratio, RESULTS.md with its GPU section filled in.
# Pure-Python extras (liger-kernel, cut-cross-entropy) are installed from ./.whl/*.whl if present.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --target /tmp/gpu_check_site .whl/*.whl > /tmp/gpu_check_pip.log 2>&1 \
        && export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH} \
        || echo "(some wheels in .whl/ did not install: see /tmp/gpu_check_pip.log)"
fi
exec "$PY" benchmarks/gpu_check.py "$@"
