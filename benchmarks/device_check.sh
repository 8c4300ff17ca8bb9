#!/usr/bin/env bash
# Device check on a lent GPU: every paper config's models at their real size on random weights,
# through convert, sampling (full, early exit, DuoDiff, cache; bf16 and fp32), decoding, scoring,
# FLOPs and the sampling benchmarks, one table at the end (benchmarks/README.md, "Device check").
# The logic is benchmarks/device_check.py; this wrapper sets the environment and a hard time limit.
#   benchmarks/device_check.sh                   # on the GPU machine, from the repository root
#   benchmarks/device_check.sh --tiny --device cpu   # the same code paths at toy size, on a CPU
# Extra arguments go to device_check.py (--configs, --steps, --batch, --no-bench, --output ...).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
# 8 minutes at most on one H100: configs (and the benchmark) still waiting at 6.5 minutes are reported as not run,
# each finished config's rows are printed as it ends, and the whole check is stopped at 8.
exec timeout --signal=TERM --kill-after=10 480 "$PYTHON" benchmarks/device_check.py --budget-s 390 "$@"
