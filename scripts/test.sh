#!/usr/bin/env bash
# Set up a fresh machine and run the default test suite (the README's test command; CI runs this too).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh --run-slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first and pinned: an unpinned torch can pull a multi-GB CUDA build.
python3 -m pip install -q "torch==${KDRL_TORCH_VERSION:-2.13.0}"
python3 -m pip install -q -e ".[test,bench,eval,train,lm-eval]"
python3 -m pytest -q "$@"
