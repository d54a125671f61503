"""Both CPU methods for bf16 lm_heads (kdrl_kernels/heads.py) on the same inputs, whichever this machine picks.

``single``: one fp32-output GEMM under oneDNN's bf16 fpmath flag, the weight upcast block by block; ``compensated``:
two bf16 GEMMs hi + lo. Values against float64 by the kernel tests' rule with the fp32 computation as baseline,
gradients by the bf16 gradient rule. The flag must be back to its value after every call, also across threads.
"""
import threading

import pytest
import torch

from kdrl_kernels import fused_linear_kl, fused_linear_logprobs
from kdrl_kernels import heads
from kdrl_kernels.fused_loss import FusedLossParams, FusedPolicyLoss, TeacherInputs
from kdrl_kernels.reference import reference_kl, reference_logprobs
from tolerance import assert_close_to_gt, bf16_grad_tol

METHODS = ["single", "compensated"]
TOL = 5e-5


@pytest.fixture(params=METHODS)
def method(request, monkeypatch):
    if request.param == "single" and not heads.single_gemm_available():
        pytest.skip("this torch has no oneDNN bf16 fpmath flag")
    monkeypatch.setenv(heads.BF16_GEMM_ENV, request.param)
    assert heads.head_method(torch.zeros(1, 1, dtype=torch.bfloat16)) == request.param
    return request.param


def make(n, d, v, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(v, d, generator=g) / d ** 0.5 * scale).bfloat16().requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, targets


# (n, d, V, chunk): several weight blocks per GEMM (chunk * V // d < V), one block, and a scratch smaller than one
# weight row (chunk * V < d: the one-row buffer)
@pytest.mark.parametrize("n,d,v,chunk", [(37, 64, 1000, 2), (21, 24, 203, 16), (9, 80, 7, 1)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_values_and_grads(method, n, d, v, chunk, temperature):
    hidden, weight, targets = make(n, d, v)
    bias = torch.randn(v, generator=torch.Generator().manual_seed(3)).requires_grad_()
    logp, ent, lse = fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                           return_entropy=True, return_lse=True, chunk_size=chunk)
    gt = reference_logprobs(hidden, weight, targets, bias, temperature)
    fp32 = reference_logprobs(hidden, weight, targets, bias, temperature, dtype=torch.float32)
    for name, o, g_, f in zip(("logp", "entropy", "lse"), (logp, ent, lse), gt, fp32):
        assert_close_to_gt(o, g_, f, TOL * max(1.0, float(g_.detach().abs().max())), name)
    up = torch.randn(n, 2, generator=torch.Generator().manual_seed(1))
    inputs = (hidden, weight, bias)
    ours = torch.autograd.grad((logp * up[:, 0] + ent * up[:, 1]).sum(), inputs)
    ref = torch.autograd.grad((gt[0] * up[:, 0] + gt[1] * up[:, 1]).sum(), inputs)
    low = reference_logprobs(hidden, weight, targets, bias, temperature, dtype=None)
    lowg = torch.autograd.grad((low[0].float() * up[:, 0] + low[1].float() * up[:, 1]).sum(), inputs)
    for name, o, r, l_ in zip(("grad_hidden", "grad_weight", "grad_bias"), ours, ref, lowg):
        assert_close_to_gt(o, r, l_, bf16_grad_tol(r), name)


@pytest.mark.parametrize("kind", ["reverse", "jsd"])
def test_kl_values_and_grads(method, kind):
    hidden, weight, _ = make(23, 40, 517, seed=4)
    t_hidden, t_weight, _ = make(23, 56, 517, seed=5)
    t_hidden, t_weight = t_hidden.detach(), t_weight.detach()
    kl = fused_linear_kl(hidden, weight, t_hidden, t_weight, kind=kind, temperature=0.8, chunk_size=5)
    gt = reference_kl(hidden, weight, t_hidden, t_weight, kind=kind, temperature=0.8)
    fp32 = reference_kl(hidden, weight, t_hidden, t_weight, kind=kind, temperature=0.8, dtype=torch.float32)
    assert_close_to_gt(kl, gt, fp32, TOL * max(1.0, float(gt.detach().abs().max())), "kl")
    ours = torch.autograd.grad(kl.sum(), (hidden, weight))
    ref = torch.autograd.grad(gt.sum(), (hidden, weight))
    lowg = torch.autograd.grad(reference_kl(hidden, weight, t_hidden, t_weight, kind=kind, temperature=0.8,
                                            dtype=None).float().sum(), (hidden, weight))
    for name, o, r, l_ in zip(("grad_hidden", "grad_weight"), ours, ref, lowg):
        assert_close_to_gt(o, r, l_, bf16_grad_tol(r), name)


def test_single_pass_loss(method):
    # logits of unit scale, as a model's are: at scale 3 the compensated pair's KL error (8e-5) exceeds this rule
    hidden, weight, targets = make(30, 48, 700, seed=6, scale=1.0)
    t_hidden, t_weight, _ = make(30, 32, 700, seed=7, scale=1.0)
    t_hidden, t_weight = t_hidden.detach(), t_weight.detach()
    coef = torch.randn(30, 2, generator=torch.Generator().manual_seed(8))

    def objective(rows, s, t, kl):
        return (coef[rows, 0] * s + coef[rows, 1] * kl).sum()

    params = FusedLossParams(objective, 1.0, 7, need_exact_kl=True, kl_has_grad=True, need_entropy=True)
    loss, stats = FusedPolicyLoss.apply(hidden, weight, None, targets, TeacherInputs(t_hidden, t_weight), params)
    gt_s = reference_logprobs(hidden, weight, targets)[0]
    gt_kl = reference_kl(hidden, weight, t_hidden, t_weight)
    f_s = reference_logprobs(hidden, weight, targets, dtype=torch.float32)[0]
    f_kl = reference_kl(hidden, weight, t_hidden, t_weight, dtype=torch.float32)
    assert_close_to_gt(stats[0], gt_s, f_s, TOL * max(1.0, float(gt_s.detach().abs().max())), "logp")
    assert_close_to_gt(stats[2], gt_kl, f_kl, TOL, "exact_kl")
    ours = torch.autograd.grad(loss, (hidden, weight))
    ref = torch.autograd.grad(objective(slice(None), gt_s, None, gt_kl), (hidden, weight))
    b_s = reference_logprobs(hidden, weight, targets, dtype=None)[0].float()
    b_kl = reference_kl(hidden, weight, t_hidden, t_weight, dtype=None).float()
    low = torch.autograd.grad(objective(slice(None), b_s, None, b_kl), (hidden, weight))
    for name, o, r, l_ in zip(("grad_hidden", "grad_weight"), ours, ref, low):
        assert o.dtype == torch.bfloat16
        assert_close_to_gt(o, r, l_, bf16_grad_tol(r), name)


@pytest.mark.skipif(not heads.single_gemm_available(), reason="this torch has no oneDNN bf16 fpmath flag")
def test_flag_restored_after_calls_and_across_threads(monkeypatch):
    """Whatever the flag was (the user's choice), it is that again after our GEMMs, also when several threads
    run them at once and when one of them fails."""
    monkeypatch.setenv(heads.BF16_GEMM_ENV, "single")
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    hidden, weight, targets = make(16, 32, 300)
    try:
        for user_value in ("none", "bf16"):
            matmul.fp32_precision = user_value
            fused_linear_logprobs(hidden, weight, targets, chunk_size=3).sum().backward()
            assert matmul.fp32_precision == user_value
        matmul.fp32_precision = "none"
        errors = []

        def work():
            try:
                for _ in range(5):
                    fused_linear_logprobs(hidden.detach(), weight.detach(), targets, chunk_size=2)
            except Exception as exc:  # noqa: BLE001 -- reported below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and matmul.fp32_precision == "none"
        with pytest.raises(RuntimeError, match="cannot be multiplied"):   # an error inside still restores the flag
            with heads._bf16_fpmath():
                assert matmul.fp32_precision == "bf16"
                torch.mm(torch.ones(2, 3), torch.ones(4, 4))
        assert matmul.fp32_precision == "none"
    finally:
        matmul.fp32_precision = before


def test_method_choice(monkeypatch):
    bf16 = torch.zeros(2, 2, dtype=torch.bfloat16)
    assert heads.head_method(bf16.float()) == "fp32" and heads.head_method(bf16.half()) == "fp32"
    monkeypatch.setenv(heads.BF16_GEMM_ENV, "compensated")
    assert heads.head_method(bf16) == "compensated"
    monkeypatch.setenv(heads.BF16_GEMM_ENV, "auto")
    expect = "single" if heads._has_amx() and heads.single_gemm_available() else "compensated"
    assert heads.head_method(bf16) == expect    # the README's rule: AMX and a weight <= 128 MiB -> single
    big = torch.empty(65536, 1025, dtype=torch.bfloat16)   # 134.3 MB > 128 MiB (never touched: no memory used)
    assert heads.head_method(big) == "compensated"
    monkeypatch.setenv(heads.BF16_GEMM_ENV, "single")
    assert heads.head_method(big) == ("single" if heads.single_gemm_available() else "compensated")
    monkeypatch.setenv(heads.BF16_GEMM_ENV, "fast")
    with pytest.raises(ValueError, match="KDRL_KERNELS_BF16_GEMM must be one of"):
        heads.head_method(bf16)


def test_out_dtype_method_logic_on_cpu(monkeypatch):
    """The CUDA method (one bf16 GEMM with an fp32 output, ``torch.mm(..., out_dtype=torch.float32)``) cannot run
    here: CPU torch has no kernel for it. Its logic around the GEMM (bias, temperature, the bf16 gradient matmuls
    shared with the CPU methods) runs with that one call emulated exactly (fp32 products of bf16 values)."""
    real_mm = torch.mm
    calls = []

    def mm(a, b, *args, out_dtype=None, **kwargs):
        if out_dtype is None:
            return real_mm(a, b, *args, **kwargs)
        assert a.dtype == b.dtype == torch.bfloat16 and out_dtype == torch.float32
        calls.append(a.shape)
        exact = real_mm(a.double(), b.double()).float()   # fp32 accumulation would differ by ~1e-7 relative
        return kwargs["out"].copy_(exact) if "out" in kwargs else exact

    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(heads, "head_method", lambda w: "out_dtype" if w.dtype == torch.bfloat16 else "fp32")
    hidden, weight, targets = make(19, 32, 300, seed=9)
    bias = torch.randn(300, generator=torch.Generator().manual_seed(10)).requires_grad_()
    logp, ent = fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=0.7, return_entropy=True,
                                      chunk_size=6)
    assert calls, "the out_dtype GEMM was not used"
    gt = reference_logprobs(hidden, weight, targets, bias, 0.7)
    fp32 = reference_logprobs(hidden, weight, targets, bias, 0.7, dtype=torch.float32)
    for name, o, g_, f in zip(("logp", "entropy"), (logp, ent), gt, fp32):
        assert_close_to_gt(o, g_, f, TOL * max(1.0, float(g_.detach().abs().max())), name)
    inputs = (hidden, weight, bias)
    ours = torch.autograd.grad((logp + ent).sum(), inputs)
    ref = torch.autograd.grad((gt[0] + gt[1]).sum(), inputs)
    low = reference_logprobs(hidden, weight, targets, bias, 0.7, dtype=None)
    lowg = torch.autograd.grad((low[0].float() + low[1].float()).sum(), inputs)
    for name, o, r, l_ in zip(("grad_hidden", "grad_weight", "grad_bias"), ours, ref, lowg):
        assert_close_to_gt(o, r, l_, bf16_grad_tol(r), name)
