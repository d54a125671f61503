"""Import hygiene and argument checks of the Triton launchers (no kernel runs, no GPU needed)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_import_does_not_import_triton():
    code = ("import sys, kdrl_kernels, kdrl_kernels.triton; "
            "assert 'triton' not in sys.modules, 'kdrl_kernels imported triton at import time'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def _logprob_args(n=5, d=8, v=11):
    return torch.randn(n, d), torch.randn(v, d), None, torch.randint(0, v, (n,))


@needs_triton
@pytest.mark.parametrize("change, match", [
    (dict(hidden=torch.randn(5)), "hidden must be 2-D"),
    (dict(weight=torch.randn(11, 9)), r"weight must be 2-D with shape \(any, 8\)"),
    (dict(bias=torch.randn(10)), r"bias must have shape \(11,\)"),
    (dict(targets=torch.zeros(5, dtype=torch.int32)), "targets must be torch.int64"),
    (dict(weight=torch.randn(11, 8, dtype=torch.bfloat16)), "weight dtype"),
])
def test_logprobs_rejects_bad_input(change, match):
    from kdrl_kernels.triton.logprobs import logprobs_forward
    args = dict(zip(("hidden", "weight", "bias", "targets"), _logprob_args()))
    args.update(change)
    with pytest.raises(ValueError, match=match):
        logprobs_forward(args["hidden"], args["weight"], args["bias"], args["targets"])


@needs_triton
def test_logprobs_rejects_bad_temperature():
    from kdrl_kernels.triton.logprobs import logprobs_forward
    with pytest.raises(ValueError, match="temperature must be > 0"):
        logprobs_forward(*_logprob_args(), temperature=0.0)


@needs_triton
@pytest.mark.parametrize("change, match", [
    (dict(kind="kl"), "kind must be one of"),
    (dict(kind="jsd", beta=1.0), r"beta must be in \(0.0, 1.0\)"),
    (dict(t_weight=torch.randn(12, 6)), r"t_weight must be 2-D with shape \(11, 6\)"),
    (dict(t_hidden=torch.randn(4, 6)), r"t_hidden must be 2-D with shape \(5, any\)"),
    (dict(mask=torch.ones(5)), "mask must be torch.bool"),
])
def test_kl_rejects_bad_input(change, match):
    from kdrl_kernels.triton.kl import kl_forward
    args = dict(s_hidden=torch.randn(5, 8), s_weight=torch.randn(11, 8), s_bias=None, t_hidden=torch.randn(5, 6),
                t_weight=torch.randn(11, 6), t_bias=None, mask=None, kind="reverse", beta=0.5)
    args.update(change)
    kind, beta = args.pop("kind"), args.pop("beta")
    with pytest.raises(ValueError, match=match):
        kl_forward(*args.values(), kind=kind, beta=beta)


@needs_triton
def test_config_rejects_small_blocks():
    from kdrl_kernels.triton._common import KernelConfig
    with pytest.raises(ValueError, match="BLOCK_D must be a power of two >= 16"):
        KernelConfig(BLOCK_D=8)
