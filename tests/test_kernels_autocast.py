"""Every public op inside ``torch.autocast("cpu", dtype=torch.bfloat16)`` works as ``nn.Linear`` does there.

bf16 hidden states with fp32 lm_head weights (what a model trained under bf16 autocast with fp32 parameters hands
the loss): the weights are used in bf16, their gradient reaches the fp32 parameters in fp32; the results equal the
same call outside autocast with the weights cast by hand, and are held to float64 by the kernel tests' rule. Matching
bf16 dtypes inside autocast work too (they once failed in ``scatter_``). Outside autocast mixed dtypes stay errors.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdrl_kernels import KDRLConfig, KDRLLoss, fused_linear_kl, fused_linear_logprobs
from kdrl_kernels import heads
from kdrl_kernels.backend import triton_available
from kdrl_kernels.reference import reference_kl, reference_logprobs
from tolerance import assert_close_to_gt, bf16_grad_tol

ROOT = Path(__file__).resolve().parent.parent
N, D, DT, V = 29, 40, 24, 311
TOL = 5e-5


def autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.fixture(params=["single", "compensated"])
def method(request, monkeypatch):
    if request.param == "single" and not heads.single_gemm_available():
        pytest.skip("this torch has no oneDNN bf16 fpmath flag")
    monkeypatch.setenv(heads.BF16_GEMM_ENV, request.param)
    return request.param


def make(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=g).bfloat16().requires_grad_()
    weight = (torch.randn(V, D, generator=g) / D ** 0.5 * 3).requires_grad_()       # an fp32 parameter
    t_hidden = torch.randn(N, DT, generator=g).bfloat16()
    t_weight = torch.randn(V, DT, generator=g) / DT ** 0.5 * 3
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::6] = -100
    return hidden, weight, t_hidden, t_weight, targets


def leaf(x):
    return x.detach().clone().requires_grad_()


def test_matching_bf16_dtypes_inside_autocast(method):
    hidden, weight, _, _, targets = make()
    w16 = weight.detach().bfloat16().requires_grad_()
    with autocast():
        inside = fused_linear_logprobs(hidden, w16, targets, temperature=0.7, chunk_size=8)
        grads_in = torch.autograd.grad(inside.sum(), (hidden, w16))
    outside = fused_linear_logprobs(hidden, w16, targets, temperature=0.7, chunk_size=8)
    grads_out = torch.autograd.grad(outside.sum(), (hidden, w16))
    assert torch.equal(inside, outside)
    assert all(torch.equal(a, b) for a, b in zip(grads_in, grads_out))
    gt = reference_logprobs(hidden, w16, targets, temperature=0.7)[0]
    fp32 = reference_logprobs(hidden, w16, targets, temperature=0.7, dtype=torch.float32)[0]
    assert_close_to_gt(inside, gt, fp32, TOL * max(1.0, float(gt.detach().abs().max())), "logp")


def test_logprobs_bf16_hidden_fp32_weight_as_linear(method):
    hidden, weight, _, _, targets = make(1)
    bias = torch.randn(V).requires_grad_()
    with autocast():
        logp, ent = fused_linear_logprobs(hidden, weight, targets, bias=bias, return_entropy=True, chunk_size=8)
        (logp.sum() + 0.3 * ent.sum()).backward()
        linear = torch.nn.functional.linear(hidden, leaf(weight))
    assert linear.dtype == torch.bfloat16                     # what nn.Linear does here: bf16 operands
    assert weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.bfloat16
    assert bias.grad.dtype == torch.float32
    # the same as casting the weight by hand outside autocast
    h2, w2, b2 = leaf(hidden), weight.detach().bfloat16().requires_grad_(), leaf(bias)
    logp2, ent2 = fused_linear_logprobs(h2, w2, targets, bias=b2, return_entropy=True, chunk_size=8)
    (logp2.sum() + 0.3 * ent2.sum()).backward()
    assert torch.equal(logp, logp2) and torch.equal(ent, ent2)
    assert torch.equal(weight.grad, w2.grad.float()) and torch.equal(hidden.grad, h2.grad)
    assert torch.equal(bias.grad, b2.grad)
    # and against float64 of the bf16 weight
    gt = reference_logprobs(h2, w2, targets, b2)
    fp32 = reference_logprobs(h2, w2, targets, b2, dtype=torch.float32)
    for name, o, g_, f in zip(("logp", "entropy"), (logp, ent), gt, fp32):
        assert_close_to_gt(o, g_, f, TOL * max(1.0, float(g_.detach().abs().max())), name)
    ref = torch.autograd.grad((gt[0].sum() + 0.3 * gt[1].sum()), (h2, w2))
    low = reference_logprobs(h2, w2, targets, b2, dtype=None)
    lowg = torch.autograd.grad((low[0].float().sum() + 0.3 * low[1].float().sum()), (h2, w2))
    for name, o, r, l_ in zip(("grad_hidden", "grad_weight"), (hidden.grad, weight.grad), ref, lowg):
        assert_close_to_gt(o, r, l_, bf16_grad_tol(r), name)


def test_fp32_inputs_inside_autocast_run_in_bf16():
    hidden, weight, _, _, targets = make(2)
    h32 = hidden.detach().float()
    with autocast():
        inside = fused_linear_logprobs(h32, weight.detach(), targets)
    outside = fused_linear_logprobs(h32.bfloat16(), weight.detach().bfloat16(), targets)
    assert torch.equal(inside, outside)


@pytest.mark.parametrize("kind", ["reverse", "forward", "jsd"])
def test_kl_bf16_hidden_fp32_weights(method, kind):
    hidden, weight, t_hidden, t_weight, _ = make(3)
    with autocast():
        kl = fused_linear_kl(hidden, weight, t_hidden, t_weight, kind=kind, chunk_size=7)
        kl.sum().backward()
    assert weight.grad.dtype == torch.float32
    h2, w2 = leaf(hidden), weight.detach().bfloat16().requires_grad_()
    kl2 = fused_linear_kl(h2, w2, t_hidden, t_weight.bfloat16(), kind=kind, chunk_size=7)
    kl2.sum().backward()
    assert torch.equal(kl, kl2) and torch.equal(weight.grad, w2.grad.float())
    gt = reference_kl(h2, w2, t_hidden, t_weight.bfloat16(), kind=kind)
    fp32 = reference_kl(h2, w2, t_hidden, t_weight.bfloat16(), kind=kind, dtype=torch.float32)
    assert_close_to_gt(kl, gt, fp32, TOL * max(1.0, float(gt.detach().abs().max())), f"{kind} KL")


@pytest.mark.parametrize("single_pass", [True, False])
def test_kdrlloss_bf16_hidden_fp32_weights(method, single_pass):
    hidden, weight, t_hidden, t_weight, targets = make(4)
    b, t = 1, N
    mask = targets != -100
    kw = dict(advantages=torch.zeros(1))
    cfg = KDRLConfig(objective="kdrl", kl_estimator="exact", beta=0.5, single_pass=single_pass, chunk_size=8,
                     backend="torch")
    shape = lambda x: x.reshape(b, t, -1) if x.dim() == 2 else x.reshape(b, t)  # noqa: E731
    with autocast():
        loss, metrics = KDRLLoss(cfg)(shape(hidden), weight, shape(targets), shape(mask),
                                      teacher_hidden=shape(t_hidden), teacher_weight=t_weight, **kw)
        loss.backward()
    assert weight.grad.dtype == torch.float32 and hidden.grad.dtype == torch.bfloat16
    h2, w2 = leaf(hidden), weight.detach().bfloat16().requires_grad_()
    loss2, metrics2 = KDRLLoss(cfg)(shape(h2), w2, shape(targets), shape(mask), teacher_hidden=shape(t_hidden),
                                    teacher_weight=t_weight.bfloat16(), **kw)
    loss2.backward()
    assert torch.equal(loss, loss2) and metrics == metrics2
    assert torch.equal(weight.grad, w2.grad.float()) and torch.equal(hidden.grad, h2.grad)
    # float64: on-policy GRPO term (ratio 1, one sequence: advantage 0) + beta * mean exact KL
    rows = mask
    gt_kl = reference_kl(h2[rows], w2, t_hidden[rows], t_weight.bfloat16())
    f_kl = reference_kl(h2[rows], w2, t_hidden[rows], t_weight.bfloat16(), dtype=torch.float32)
    assert_close_to_gt(loss.reshape(1), 0.5 * gt_kl.mean().reshape(1), 0.5 * f_kl.mean().reshape(1), TOL, "loss")


def test_mixed_dtypes_outside_autocast_are_errors():
    hidden, weight, t_hidden, t_weight, targets = make(5)
    with pytest.raises(TypeError, match="hidden and weight must have the same dtype"):
        fused_linear_logprobs(hidden, weight, targets)
    with pytest.raises(TypeError, match="student_hidden and student_weight must have the same dtype"):
        fused_linear_kl(hidden, weight, t_hidden, t_weight.bfloat16())
    with pytest.raises(TypeError, match="hidden and weight must have the same dtype"):
        KDRLLoss(objective="grpo")(hidden[None], weight, targets.clamp(min=0)[None], torch.ones(1, N, dtype=bool),
                                   advantages=torch.ones(1))


_TRITON_SCRIPT = r"""
import json, torch
from kdrl_kernels import KDRLLoss, fused_linear_kl, fused_linear_logprobs
g = torch.Generator().manual_seed(0)
n, d, dt, v = 19, 40, 24, 203
h = torch.randn(n, d, generator=g).bfloat16().requires_grad_()
w = (torch.randn(v, d, generator=g) / d ** 0.5 * 3).requires_grad_()
th = torch.randn(n, dt, generator=g).bfloat16()
tw = torch.randn(v, dt, generator=g) / dt ** 0.5 * 3
y = torch.randint(0, v, (n,), generator=g)
out = {}
for backend in ("triton", "torch"):
    hb, wb = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = fused_linear_logprobs(hb, wb, y, backend=backend)
        kl = fused_linear_kl(hb, wb, th, tw, backend=backend)
        loss, _ = KDRLLoss(objective="kdrl", kl_estimator="exact", backend=backend)(
            hb[None], wb, y[None], torch.ones(1, n, dtype=torch.bool), advantages=torch.ones(1),
            teacher_hidden=th[None], teacher_weight=tw)
        (lp.sum() + kl.sum() + loss).backward()
    out[backend] = dict(lp=lp.tolist(), kl=kl.tolist(), loss=float(loss), gw_dtype=str(wb.grad.dtype),
                        gw=wb.grad.double().norm().item())
print(json.dumps(out))
"""


@pytest.mark.skipif(not triton_available(), reason="needs triton")
def test_triton_interpreter_inside_autocast():
    """The Triton path (interpreted on CPU, 4 s) inside autocast: the same casts, the same results as the PyTorch
    path. A fresh process: TRITON_INTERPRET only acts on kernels decorated after it is set."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    tri, ref = res["triton"], res["torch"]
    assert tri["gw_dtype"] == "torch.float32" == ref["gw_dtype"]
    assert max(abs(a - b) for a, b in zip(tri["lp"], ref["lp"])) < 1e-4
    assert max(abs(a - b) for a, b in zip(tri["kl"], ref["kl"])) < 1e-4
    assert abs(tri["loss"] - ref["loss"]) < 1e-4 and abs(tri["gw"] - ref["gw"]) < 1e-2 * ref["gw"]
