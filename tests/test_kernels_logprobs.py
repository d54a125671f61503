"""fused_linear_logprobs on the PyTorch path against the float64 full-logits reference."""
import pytest
import torch

from kdrl_kernels import fused_linear_logprobs
from kdrl_kernels.reference import reference_logprobs
from tolerance import assert_close_to_gt, bf16_grad_tol

SHAPES = [(37, 24, 203), (5, 7, 1000), (64, 33, 129)]


def make(n, d, v, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g) / d ** 0.5 * 3).to(dtype).requires_grad_()
    b = (torch.randn(v, generator=g)).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = -100
    return hidden, weight, b, targets


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_grads_match_reference(shape, dtype, bias, temperature):
    hidden, weight, b, targets = make(*shape, dtype, bias)
    inputs = [x for x in (hidden, weight, b) if x is not None]
    logp, ent, lse = fused_linear_logprobs(hidden, weight, targets, bias=b, temperature=temperature,
                                           return_entropy=True, return_lse=True, chunk_size=16)
    gt = reference_logprobs(hidden, weight, targets, b, temperature)
    low = reference_logprobs(hidden, weight, targets, b, temperature, dtype=None)
    # bf16 inputs are held to fp32 quality: the baseline for values is the fp32 computation, not bf16 logits.
    fp32 = reference_logprobs(hidden, weight, targets, b, temperature, dtype=torch.float32)
    tol = 1e-5 if dtype == torch.float32 else 5e-5
    for name, o, g_, l_ in zip(("logp", "entropy", "lse"), (logp, ent, lse), gt, fp32):
        assert o.dtype == torch.float32
        assert_close_to_gt(o, g_, l_, tol * max(1.0, float(g_.detach().abs().max())), name)
    assert (logp <= 0).all()
    assert (logp[targets == -100] == 0).all() and (ent[targets == -100] == 0).all()

    gen = torch.Generator().manual_seed(1)
    up_lp, up_ent = torch.randn(shape[0], generator=gen), torch.randn(shape[0], generator=gen)
    ours = torch.autograd.grad((logp * up_lp + ent * up_ent).sum(), inputs)
    ref = torch.autograd.grad((gt[0] * up_lp + gt[1] * up_ent).sum(), inputs)
    lowg = torch.autograd.grad((low[0].float() * up_lp + low[1].float() * up_ent).sum(), inputs)
    for name, o, g_, l_ in zip(("grad_hidden", "grad_weight", "grad_bias"), ours, ref, lowg):
        assert o.dtype == dtype
        grad_tol = (10 * tol * max(1.0, float(g_.abs().max())) if dtype == torch.float32 else bf16_grad_tol(g_))
        assert_close_to_gt(o, g_, l_, grad_tol, name)


def test_real_vocab_size_151936():
    hidden, weight, b, targets = make(6, 16, 151936, torch.float32, bias=False)
    logp, lse = fused_linear_logprobs(hidden, weight, targets, return_lse=True)
    gt = reference_logprobs(hidden, weight, targets)
    low = reference_logprobs(hidden, weight, targets, dtype=None)
    assert_close_to_gt(logp, gt[0], low[0], 2e-5, "logp")
    assert_close_to_gt(lse, gt[2], low[2], 2e-5, "lse")
    up = torch.randn(6)
    ours = torch.autograd.grad((logp * up).sum(), (hidden, weight))
    ref = torch.autograd.grad((gt[0] * up).sum(), (hidden, weight))
    lowg = torch.autograd.grad((low[0] * up).sum(), (hidden, weight))
    for o, r, l_ in zip(ours, ref, lowg):
        assert_close_to_gt(o, r, l_, 1e-5, "grad")


def test_leading_dims_are_flattened_and_restored():
    hidden, weight, _, targets = make(12, 8, 50, torch.float32, bias=False)
    flat = fused_linear_logprobs(hidden, weight, targets)
    shaped = fused_linear_logprobs(hidden.reshape(3, 4, 8), weight, targets.reshape(3, 4))
    assert shaped.shape == (3, 4)
    torch.testing.assert_close(shaped.reshape(-1), flat)


def test_all_rows_ignored_gives_zeros_and_zero_grads():
    hidden, weight, _, targets = make(7, 8, 50, torch.float32, bias=False)
    targets[:] = -100
    logp = fused_linear_logprobs(hidden, weight, targets)
    assert (logp == 0).all()
    gh, gw = torch.autograd.grad(logp.sum(), (hidden, weight))
    assert (gh == 0).all() and (gw == 0).all()


def test_chunk_size_does_not_change_results():
    hidden, weight, b, targets = make(37, 24, 203, torch.float32, bias=True)
    a = fused_linear_logprobs(hidden, weight, targets, bias=b, chunk_size=1)
    c = fused_linear_logprobs(hidden, weight, targets, bias=b, chunk_size=1000)
    torch.testing.assert_close(a, c)
