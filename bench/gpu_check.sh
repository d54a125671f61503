#!/usr/bin/env bash
# One-command GPU proof (accuracy vs float64, KDRL step speed and memory, tile configs); see bench/gpu_check.py.
#   bash bench/gpu_check.sh --device-run           on the GPU machine: report under $OUT/gpu_check, < 8 minutes
#   bash bench/gpu_check.sh --device-run --smoke   dry run on CPU (tiny shapes, TRITON_INTERPRET=1)
# Needs nothing installed beyond torch (and triton): the project is imported from this checkout.
# PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m bench.gpu_check "$@"
