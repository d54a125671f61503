#!/usr/bin/env bash
# One-command GPU proof (accuracy vs float64, speed, memory, tile configs); see bench/gpu_check.py.
# On a machine with an NVIDIA GPU and a CUDA torch: bash bench/gpu_check.sh   (--smoke: tiny, CPU, interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m bench.gpu_check "$@"
