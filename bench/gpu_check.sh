#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): one table, under 8 minutes on one GPU.
#
#   bash bench/gpu_check.sh                 # on the lent GPU machine
#   bash bench/gpu_check.sh --device cpu --shapes 32,48,48 --no-pipeline   # dry run
#
# Uses .venv when it travels with the tree, else python3 (torch present there;
# ray, nibabel and isal only if their wheels were carried: ../shared/GPU.md). Runs
# from the source tree (PYTHONPATH=.), installs nothing. Without CUDA it stops
# at once with exit 2 and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null || true
exec "$PY" -m bench.gpu_check "$@"
