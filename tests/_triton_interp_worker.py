"""Runs the Triton kernels under the interpreter on CPU and compares them with float64 ground truth.

Used by tests/test_triton_interpreter.py in a fresh subprocess: ``TRITON_INTERPRET=1`` only takes effect for
kernels decorated after it is set, and other test modules may already have imported the kernels in JIT mode (the
ahead-of-time test needs that mode). Prints one JSON document ``{case: result}`` as its last stdout line.

Tolerance rule (as in Apple's CCE tests): ``|ours - gt| <= |torch_lowprec - gt| + tol`` elementwise, where gt is
the float64 reference and torch_lowprec is the same full-logits computation in the input dtype. Each result holds
the worst ``excess = |ours - gt| - |torch_lowprec - gt| - tol`` per quantity (the test requires <= 0).
"""
import json
import os
import sys
import time
import zlib

# Kept importable without triton (the test module reads the case names).
LOGPROB_CASES = {
    # prompt_rows: the first 20 rows ignored, so whole 16-row blocks take the kernels' skip path
    "fp32_bias_t1_prompt": dict(dtype="fp32", bias=True, temperature=1.0, entropy_grad=True, prompt_rows=20),
    "fp32_nobias_t07_noentgrad_strided": dict(dtype="fp32", bias=False, temperature=0.7, entropy_grad=False,
                                              strided=True),
    "bf16_bias_t07": dict(dtype="bf16", bias=True, temperature=0.7, entropy_grad=True),
    "bf16_nobias_t1_noentgrad": dict(dtype="bf16", bias=False, temperature=1.0, entropy_grad=False),
    "fp32_default_config": dict(dtype="fp32", bias=True, temperature=0.7, entropy_grad=True, default_config=True),
    "bf16_all_ignored": dict(dtype="bf16", bias=True, temperature=1.0, entropy_grad=True, all_ignored=True),
}
KL_CASES = {
    "reverse_fp32_bias_mask_t07": dict(kind="reverse", dtype="fp32", bias=True, mask=True, temperature=0.7),
    "forward_fp32_nobias_nomask": dict(kind="forward", dtype="fp32", bias=False, mask=False, temperature=1.0),
    "jsd_fp32_bias_mask_t07_prompt": dict(kind="jsd", beta=0.3, dtype="fp32", bias=True, mask=True,
                                          temperature=0.7, prompt_rows=20),
    "reverse_bf16_nobias_mask_prompt": dict(kind="reverse", dtype="bf16", bias=False, mask=True, temperature=1.0,
                                            prompt_rows=20),
    "forward_bf16_bias_mask_t07": dict(kind="forward", dtype="bf16", bias=True, mask=True, temperature=0.7),
    "jsd_bf16_nobias_nomask": dict(kind="jsd", beta=0.5, dtype="bf16", bias=False, mask=False, temperature=1.0),
    "reverse_bf16_close_teacher": dict(kind="reverse", dtype="bf16", bias=False, mask=True, temperature=1.0,
                                       close=True),
    "reverse_bf16_student_fp32_teacher": dict(kind="reverse", dtype="bf16", t_dtype="fp32", bias=True, mask=True,
                                              temperature=0.7),
    "jsd_fp32_default_config": dict(kind="jsd", beta=0.7, dtype="fp32", bias=True, mask=True, temperature=0.7,
                                    default_config=True),
}
API_CASES = {"logprobs_entropy_3d": dict(op="logprobs"), "kl_jsd_3d": dict(op="kl"),
             "kdrl_loss_exact": dict(op="loss", objective="kdrl", estimator="exact"),
             "trrd_loss_k2": dict(op="loss", objective="trrd", estimator="k2")}
N, D, D_T, V = 37, 40, 24, 203  # odd sizes: no dimension is a multiple of any block size
# tol = ATOL * max|gt| + RTOL * |gt| per element; bf16 outputs are rounded once (2**-9 relative) at the end.
TOLS = {"fp32": (1e-5, 1e-5), "bf16": (4e-3, 8e-3)}
KL_FLOOR = 1e-5  # KL >= -KL_FLOOR


def _excess(ours, gt, low, dtype_name):
    atol, rtol = TOLS[dtype_name]
    ours, gt, low = (x.detach().double() for x in (ours, gt, low))
    tol = atol * gt.abs().max().clamp_min(1e-30) + rtol * gt.abs()
    return float(((ours - gt).abs() - (low - gt).abs() - tol).max())


def _inputs(torch, gen, dtype, n, d, bias, strided=False):
    hidden = torch.randn(n, d + 7 if strided else d, generator=gen)[:, :d].to(dtype)
    weight = (torch.randn(V, d, generator=gen) / d ** 0.5 * 2.0).to(dtype)  # logits of std ~2
    b = (torch.randn(V, generator=gen) * 0.5).to(dtype) if bias else None
    return hidden, weight, b


def _leaf(x, dtype):
    return None if x is None else x.detach().to(dtype).requires_grad_()


def run_logprobs(torch, name, spec):
    from kdrl_kernels.reference import reference_logprobs
    from kdrl_kernels.triton._common import KernelConfig
    from kdrl_kernels.triton.logprobs import logprobs_backward, logprobs_forward
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    dtype = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
    hidden, weight, bias = _inputs(torch, gen, dtype, N, D, spec["bias"], spec.get("strided", False))
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[torch.rand(N, generator=gen) < 0.2] = -100
    targets[:spec.get("prompt_rows", 0)] = -100
    if spec.get("all_ignored"):
        targets[:] = -100
    g_logp = torch.randn(N, generator=gen)
    g_ent = torch.randn(N, generator=gen) if spec["entropy_grad"] else None
    config = None if spec.get("default_config") else KernelConfig(BLOCK_N=16, BLOCK_V=32, BLOCK_D=16,
                                                                   num_warps=4, num_stages=1)
    kw = dict(temperature=spec["temperature"], ignore_index=-100)
    logp, lse, ent = logprobs_forward(hidden, weight, bias, targets, config=config, **kw)
    grads = logprobs_backward(hidden, weight, bias, targets, lse, g_logp, g_ent, ent, config=config, **kw)

    out = {}
    refs = {}
    for label, ref_dtype in (("gt", torch.float64), ("low", None)):
        leaves = [_leaf(x, ref_dtype or dtype) for x in (hidden, weight, bias)]
        r_logp, r_ent, r_lse = reference_logprobs(leaves[0], leaves[1], targets, leaves[2], dtype=ref_dtype, **kw)
        loss = (r_logp * g_logp.to(r_logp.dtype)).sum()
        if g_ent is not None:
            loss = loss + (r_ent * g_ent.to(r_ent.dtype)).sum()
        loss.backward()
        refs[label] = [r_logp, r_ent, r_lse] + [x.grad if x is not None else None for x in leaves]
    ours = [logp, ent, lse, *grads]
    names = ["logp", "entropy", "lse", "grad_hidden", "grad_weight", "grad_bias"]
    for i, qty in enumerate(names):
        if ours[i] is None:
            continue
        out[qty] = _excess(ours[i], refs["gt"][i], refs["low"][i], spec["dtype"])
    ignored = targets == -100
    zero_rows = all(float(x[ignored].abs().max()) == 0.0 for x in (logp, ent, lse, grads[0].float())) \
        if bool(ignored.any()) else True
    dtypes_ok = (logp.dtype == ent.dtype == lse.dtype == torch.float32 and grads[0].dtype == dtype
                 and grads[1].dtype == dtype and (grads[2] is None or grads[2].dtype == dtype))
    return dict(excess=out, logp_max=float(logp.max()), ignored_rows_zero=zero_rows, dtypes_ok=dtypes_ok,
                n_ignored=int(ignored.sum()))


def run_kl(torch, name, spec):
    from kdrl_kernels.reference import reference_kl
    from kdrl_kernels.triton._common import KernelConfig
    from kdrl_kernels.triton.kl import kl_backward, kl_forward
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    dtype = torch.bfloat16 if spec["dtype"] == "bf16" else torch.float32
    s_h, s_w, s_b = _inputs(torch, gen, dtype, N, D, spec["bias"])
    if spec.get("close"):  # teacher = student + small noise: KL ~ 1e-3, where low-precision logits fall apart
        t_h, t_b = s_h, s_b
        t_w = (s_w.float() + 0.02 * torch.randn(s_w.shape, generator=gen) * s_w.float().std()).to(dtype)
    else:
        t_dtype = torch.float32 if spec.get("t_dtype") == "fp32" else dtype
        t_h, t_w, t_b = _inputs(torch, gen, t_dtype, N, D_T, spec["bias"])
    mask = (torch.rand(N, generator=gen) > 0.25) if spec["mask"] else None
    if mask is not None:
        mask[:spec.get("prompt_rows", 0)] = False
    g = torch.randn(N, generator=gen)
    config = None if spec.get("default_config") else KernelConfig(BLOCK_N=16, BLOCK_V=32, BLOCK_D=16,
                                                                   num_warps=4, num_stages=1)
    kw = dict(kind=spec["kind"], beta=spec.get("beta", 0.5), temperature=spec["temperature"])
    kl, s_lse, t_lse = kl_forward(s_h, s_w, s_b, t_h, t_w, t_b, mask, config=config, **kw)
    grads = kl_backward(s_h, s_w, s_b, t_h, t_w, t_b, mask, s_lse, t_lse, kl, g, config=config, **kw)
    refs = {}
    for label, ref_dtype in (("gt", torch.float64), ("low", None)):
        leaves = [_leaf(x, ref_dtype or dtype) for x in (s_h, s_w, s_b)]
        t_args = [None if x is None else x.to(ref_dtype or x.dtype) for x in (t_h, t_w, t_b)]
        r = reference_kl(leaves[0], leaves[1], t_args[0], t_args[1], mask=mask, s_bias=leaves[2],
                         t_bias=t_args[2], dtype=ref_dtype, **kw)
        (r * g.to(r.dtype)).sum().backward()
        refs[label] = [r] + [x.grad if x is not None else None for x in leaves]
    out = {}
    for i, qty in enumerate(["kl", "grad_s_hidden", "grad_s_weight", "grad_s_bias"]):
        ours = kl if i == 0 else grads[i - 1]
        if ours is not None:
            out[qty] = _excess(ours, refs["gt"][i], refs["low"][i], spec["dtype"])
    masked = ~mask if mask is not None else torch.zeros(N, dtype=torch.bool)
    zero_rows = all(float(x[masked].abs().max()) == 0.0 for x in (kl, s_lse, t_lse, grads[0].float())) \
        if bool(masked.any()) else True
    kl_valid = kl[~masked]
    rel = float(((kl_valid.double() - refs["gt"][0][~masked]).abs() / refs["gt"][0][~masked].abs()).max())
    return dict(excess=out, kl_min=float(kl.min()), kl_rel_err=rel, kl_gt_max=float(refs["gt"][0].max()),
                ignored_rows_zero=zero_rows, dtypes_ok=kl.dtype == torch.float32 and grads[0].dtype == dtype)


def run_api(torch, name, spec):
    """The public ops with backend="triton" (autograd Functions included) against backend="torch"."""
    import kdrl_kernels as K
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    h = torch.randn(3, 11, D, generator=gen)
    w = torch.randn(V, D, generator=gen) / D ** 0.5 * 2.0
    outs = {}
    for backend in ("triton", "torch"):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        if spec["op"] == "logprobs":
            targets = torch.randint(0, V, (3, 11), generator=torch.Generator().manual_seed(1))
            targets[0, :4] = -100
            logp, ent = K.fused_linear_logprobs(hh, ww, targets, temperature=0.7, return_entropy=True,
                                                backend=backend)
            (logp.sum() + 0.3 * ent.sum()).backward()
            vals = [logp, ent]
        elif spec["op"] == "loss":
            vals = [_loss_step(torch, K, hh, ww, spec, backend)]
        else:
            t_h = torch.randn(3, 11, D_T, generator=torch.Generator().manual_seed(2))
            t_w = torch.randn(V + 5, D_T, generator=torch.Generator().manual_seed(3)) / D_T ** 0.5 * 2.0
            mask = torch.rand(3, 11, generator=torch.Generator().manual_seed(4)) > 0.3
            kl = K.fused_linear_kl(hh, ww, t_h, t_w, kind="jsd", beta=0.4, mask=mask, backend=backend,
                                   truncate_teacher_vocab=True)
            (kl * torch.linspace(-1, 1, kl.numel()).reshape(kl.shape)).sum().backward()
            vals = [kl]
        outs[backend] = [v.detach() for v in vals] + [hh.grad, ww.grad]
    diffs = [float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(*outs.values())]
    return dict(max_rel_diff=max(diffs))


def _loss_step(torch, K, hh, ww, spec, backend):
    """KDRLLoss on one backend: Triton composes the fused ops, torch runs its single gradient-in-forward pass."""
    gen = torch.Generator().manual_seed(7)
    targets = torch.randint(0, V, (3, 11), generator=gen)
    mask = torch.rand(3, 11, generator=gen) > 0.3
    t_h, t_w = torch.randn(3, 11, D_T, generator=gen), torch.randn(V, D_T, generator=gen) / D_T ** 0.5 * 2.0
    old = torch.randn(3, 11, generator=gen) * 0.1 - 5.0
    cfg = K.KDRLConfig(objective=spec["objective"], kl_estimator=spec["estimator"], beta=0.3, backend=backend,
                       log_exact_kl=True, temperature=0.8)
    loss, metrics = K.KDRLLoss(cfg)(hh, ww, targets, mask, rewards=torch.tensor([1.0, 0.0, 1.0]),
                                    group_ids=torch.tensor([0, 0, 0]), old_logprobs=old, teacher_hidden=t_h,
                                    teacher_weight=t_w)
    loss.backward()
    return torch.tensor([loss.item(), metrics["exact_kl"], metrics["entropy"], metrics["clip_frac"]])


def main():
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1 (set before triton is imported)")
    import numpy as np
    import torch
    np.seterr(all="ignore")  # unused branches of tl.where compute inf/nan in the interpreter; GPUs don't care
    torch.manual_seed(0)
    results = {}
    for family, cases, runner in (("logprobs", LOGPROB_CASES, run_logprobs), ("kl", KL_CASES, run_kl),
                                  ("api", API_CASES, run_api)):
        for name, spec in cases.items():
            start = time.perf_counter()
            res = runner(torch, name, spec)
            res["seconds"] = round(time.perf_counter() - start, 2)
            results[f"{family}/{name}"] = res
            print(f"{family}/{name}: {res}", file=sys.stderr, flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
