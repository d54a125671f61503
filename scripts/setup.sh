#!/usr/bin/env bash
# Install kdrl-kernels in editable mode with the given extras (default: bench,eval,train), torch first and pinned.
# An unpinned torch can pull a multi-GB CUDA build; override the pin with KDRL_TORCH_VERSION (e.g. a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-bench,eval,train}"
python3 -m pip install -q "torch==${KDRL_TORCH_VERSION:-2.13.0}"
python3 -m pip install -q -e ".[${extras}]"
