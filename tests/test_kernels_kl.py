"""fused_linear_kl (exact full-vocabulary divergences) against the float64 reference."""
import pytest
import torch

from kdrl_kernels import fused_linear_kl
from kdrl_kernels.reference import reference_kl
from tolerance import assert_close_to_gt, bf16_grad_tol


def make(n, d, d_t, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    sw = (torch.randn(v, d, generator=g) * 2 / d ** 0.5).to(dtype).requires_grad_()
    sb = torch.randn(v, generator=g).to(dtype).requires_grad_()
    th = torch.randn(n, d_t, generator=g).to(dtype)
    tw = (torch.randn(v, d_t, generator=g) * 2 / d_t ** 0.5).to(dtype)
    mask = torch.rand(n, generator=g) > 0.2
    return sh, sw, sb, th, tw, mask


@pytest.mark.parametrize("kind,beta", [("reverse", 0.5), ("forward", 0.5), ("jsd", 0.5), ("jsd", 0.1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 24, 40, 203), (9, 16, 8, 1001)])
@pytest.mark.parametrize("temperature", [1.0, 1.3])
def test_divergences_and_student_grads_match_reference(kind, beta, dtype, shape, temperature):
    sh, sw, sb, th, tw, mask = make(*shape, dtype)
    kw = dict(kind=kind, beta=beta, temperature=temperature, mask=mask)
    kl = fused_linear_kl(sh, sw, th, tw, student_bias=sb, chunk_size=8, **kw)
    gt = reference_kl(sh, sw, th, tw, s_bias=sb, **kw)
    low = reference_kl(sh, sw, th, tw, s_bias=sb, dtype=None, **kw)
    # bf16 inputs are held to fp32 quality: the baseline for values is the fp32 computation, not bf16 logits.
    fp32 = reference_kl(sh, sw, th, tw, s_bias=sb, dtype=torch.float32, **kw)
    tol = 1e-5 if dtype == torch.float32 else 5e-5
    assert kl.dtype == torch.float32
    assert_close_to_gt(kl, gt, fp32, tol, f"{kind} value")
    assert (kl >= -1e-6).all()
    assert (kl[~mask] == 0).all()
    up = torch.randn(shape[0], generator=torch.Generator().manual_seed(3))
    ours = torch.autograd.grad((kl * up).sum(), (sh, sw, sb))
    ref = torch.autograd.grad((gt * up).sum(), (sh, sw, sb))
    lowg = torch.autograd.grad((low.float() * up).sum(), (sh, sw, sb))
    for name, o, r, l_ in zip(("grad_hidden", "grad_weight", "grad_bias"), ours, ref, lowg):
        assert o.dtype == dtype
        assert_close_to_gt(o, r, l_, tol if dtype == torch.float32 else bf16_grad_tol(r), name)


def test_teacher_gets_no_gradient():
    sh, sw, _, th, tw, _ = make(5, 8, 6, 30, torch.float32)
    th.requires_grad_(), tw.requires_grad_()
    kl = fused_linear_kl(sh, sw, th, tw)
    kl.sum().backward()
    assert th.grad is None and tw.grad is None and sh.grad is not None


def test_identical_models_have_zero_divergence():
    sh, sw, _, _, _, _ = make(11, 8, 8, 64, torch.float32)
    for kind in ("reverse", "forward", "jsd"):
        kl = fused_linear_kl(sh, sw, sh.detach(), sw.detach(), kind=kind)
        assert kl.abs().max() < 1e-5


def test_padded_teacher_vocab_is_truncated_only_when_asked():
    sh, sw, _, th, tw, _ = make(7, 8, 6, 30, torch.float32)
    padded = torch.cat([tw, torch.randn(5, 6)])
    with pytest.raises(ValueError, match="truncate_teacher_vocab"):
        fused_linear_kl(sh, sw, th, padded)
    kl = fused_linear_kl(sh, sw, th, padded, truncate_teacher_vocab=True)
    torch.testing.assert_close(kl, fused_linear_kl(sh, sw, th, tw))
    with pytest.raises(ValueError, match="teacher_weight has 25"):
        fused_linear_kl(sh, sw, th, tw[:25], truncate_teacher_vocab=True)


def test_real_vocab_size_151936_reverse_kl():
    sh, sw, _, th, tw, _ = make(4, 16, 24, 151936, torch.float32)
    kl = fused_linear_kl(sh, sw, th, tw)
    gt = reference_kl(sh, sw, th, tw)
    low = reference_kl(sh, sw, th, tw, dtype=None)
    assert_close_to_gt(kl, gt, low, 1e-5, "kl")
    up = torch.randn(4)
    ours = torch.autograd.grad((kl * up).sum(), (sh, sw))
    ref = torch.autograd.grad((gt * up).sum(), (sh, sw))
    lowg = torch.autograd.grad((low * up).sum(), (sh, sw))
    for o, r, l_ in zip(ours, ref, lowg):
        assert_close_to_gt(o, r, l_, 1e-6, "grad")
