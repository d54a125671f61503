#!/usr/bin/env bash
# Set up a fresh machine and run the default test suite (the README's test command; CI runs this too).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh --run-slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "test,bench,eval,train,lm-eval"
python3 -m pytest -q "$@"
