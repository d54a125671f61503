"""Bad input gets a clear error naming the argument; backend selection; import without Triton; N*V > 2^31."""
import subprocess
import sys

import pytest
import torch

from kdrl_kernels import KDRLLoss, fused_linear_kl, fused_linear_logprobs
from kdrl_kernels.backend import resolve_backend
from kdrl_kernels.reference import reference_logprobs


def ok_inputs(n=5, d=8, v=30):
    # Fixed targets 0..n-1: the out-of-range cases below (t - 10, t + 100) must leave [0, v) on every run.
    return torch.randn(n, d), torch.randn(v, d), torch.arange(n) % v


@pytest.mark.parametrize("mutate,match", [
    (lambda h, w, t: (h[:, :3], w, t), "weight must have 3 columns"),
    (lambda h, w, t: (h, w, t[:4]), r"targets must have shape \(5,\)"),
    (lambda h, w, t: (h, w, t.float()), "targets must be an int64"),
    (lambda h, w, t: (h.long(), w, t), "hidden must be a floating"),
    (lambda h, w, t: (h, w, t + 100), r"targets must be in \[0, 30\)"),
    (lambda h, w, t: (h, w, t - 10), r"targets must be in \[0, 30\)"),
    (lambda h, w, t: (h.index_fill(0, torch.tensor([1]), float("nan")), w, t), "hidden contains NaN or inf"),
    (lambda h, w, t: (h, w.index_fill(0, torch.tensor([1]), float("inf")), t), "weight contains NaN or inf"),
    (lambda h, w, t: (h, w.to("meta"), t), "one device"),
])
def test_logprobs_bad_input(mutate, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fused_linear_logprobs(*mutate(*ok_inputs()))


def test_logprobs_bad_options():
    h, w, t = ok_inputs()
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_logprobs(h, w, t, temperature=0.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_linear_logprobs(h, w, t, backend="cuda")
    with pytest.raises(ValueError, match=r"bias must have shape \(30,\)"):
        fused_linear_logprobs(h, w, t, bias=torch.zeros(29))


def test_kl_bad_input():
    h, w, _ = ok_inputs()
    with pytest.raises(ValueError, match="teacher_hidden must have 5 rows"):
        fused_linear_kl(h, w, torch.randn(4, 6), torch.randn(30, 6))
    with pytest.raises(ValueError, match="kind must be one of"):
        fused_linear_kl(h, w, torch.randn(5, 6), torch.randn(30, 6), kind="tv")
    with pytest.raises(ValueError, match=r"beta must be in \(0, 1\)"):
        fused_linear_kl(h, w, torch.randn(5, 6), torch.randn(30, 6), kind="jsd", beta=1.0)
    with pytest.raises(ValueError, match=r"mask must have shape \(5,\)"):
        fused_linear_kl(h, w, torch.randn(5, 6), torch.randn(30, 6), mask=torch.ones(4, dtype=torch.bool))


def test_loss_bad_input():
    h, w = torch.randn(2, 3, 8), torch.randn(30, 8)
    t, m = torch.randint(0, 30, (2, 3)), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="needs teacher_hidden"):
        KDRLLoss(objective="kdrl")(h, w, t, m, advantages=torch.ones(2))
    with pytest.raises(ValueError, match="pass advantages"):
        KDRLLoss(objective="grpo")(h, w, t, m)
    with pytest.raises(ValueError, match=r"advantages must have shape \(2,\) or \(2, 3\)"):
        KDRLLoss(objective="grpo")(h, w, t, m, advantages=torch.ones(3))
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 3\)"):
        KDRLLoss(objective="grpo")(h, w, t, m[:, :2], advantages=torch.ones(2))
    bad = t.clone()
    bad[1, 2] = -1  # a padding id left under the mask
    with pytest.raises(ValueError, match=r"targets must be in \[0, 30\), got values in \[-1,"):
        KDRLLoss(objective="grpo")(h, w, bad, m, advantages=torch.ones(2))
    with pytest.raises(ValueError, match="hidden must be"):
        KDRLLoss(objective="grpo")(h[0], w, t, m, advantages=torch.ones(2))
    with pytest.raises(ValueError, match="exact KL needs teacher_hidden"):
        KDRLLoss(objective="kd", kl_estimator="exact")(h, w, t, m, teacher_logprobs=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="objective must be one of"):
        KDRLLoss(objective="ppo")
    with pytest.raises(ValueError, match="eps_high must be >= 0"):
        KDRLLoss(eps_high=-0.1)


def test_backend_selection(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("KDRL_KERNELS_BACKEND", raising=False)
    assert resolve_backend("auto", cpu) == "torch"
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        resolve_backend("triton", cpu)
    monkeypatch.setenv("KDRL_KERNELS_BACKEND", "torch")
    assert resolve_backend("auto", torch.device("cuda")) == "torch"  # the environment overrides auto
    monkeypatch.setenv("KDRL_KERNELS_BACKEND", "gpu")
    with pytest.raises(ValueError, match="KDRL_KERNELS_BACKEND must be one of"):
        resolve_backend("auto", cpu)
    monkeypatch.setenv("KDRL_KERNELS_BACKEND", "triton")
    assert resolve_backend("torch", cpu) == "torch"  # an explicit argument wins over the environment


def test_import_works_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, kdrl_kernels\n"
            "from kdrl_kernels.backend import triton_available\n"
            "h, w = torch.randn(3, 4), torch.randn(7, 4)\n"
            "print(float(kdrl_kernels.fused_linear_logprobs(h, w, torch.tensor([1, 2, 3])).sum()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 0


def test_more_than_2_pow_31_logits_are_handled():
    """N * V = 16,400 * 131,072 > 2^31: chunking keeps every index in range; compare sampled rows to full logits."""
    n, d, v = 16_400, 4, 131_072
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    assert n * v > 2 ** 31
    logp = fused_linear_logprobs(hidden, weight, targets, chunk_size=4096)
    rows = torch.tensor([0, 1, 8191, 8192, n - 2, n - 1])
    ref = reference_logprobs(hidden[rows], weight, targets[rows])[0]
    torch.testing.assert_close(logp[rows].double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(logp).all() and (logp <= 0).all()
