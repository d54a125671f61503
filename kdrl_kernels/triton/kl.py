"""Triton kernels for the exact full-vocabulary divergence between a student and a teacher, per token.

Student logits ``a`` (hidden size d) and teacher logits ``b`` (hidden size d_t) are computed tile by tile in the
SAME pass over the vocabulary, with an online logsumexp for each. With ``p = softmax(a)``, ``q = softmax(b)``:

- reverse ``KL(p || q) = E_p[a - b] - lse_a + lse_b``: the running sum of ``e^(a - m_a) (a - b)`` is rescaled like
  the softmax denominator when the running max ``m_a`` moves, so one pass suffices; forward is the mirror image.
- jsd (generalised, ``m = beta q + (1 - beta) p``) needs ``log m``, which needs both final logsumexps: a second pass
  recomputes the tiles.

Backward (gradient to the student only), with ``log p`` and ``log q`` from the saved logsumexps:
``dKL/da = p (log p - log q - KL)`` (reverse), ``p - q`` (forward), ``(1 - beta) p (log p - log m - KL(p || m))``
(jsd; its ``KL(p || m)`` comes from one extra recompute pass in the grad_hidden kernel, kept in an ``(N,)`` buffer
that the grad_weight kernel reads). grad_hidden / grad_weight / grad_bias are computed as in ``logprobs.py``: each
program owns its output rows, no atomics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (KernelConfig, accumulate_rows, any_row, check_2d, check_float_param, check_vector,
                      default_config, dot_precision, fp32_grad_buffers, logits_tile)

__all__ = ["kl_forward", "kl_backward", "KINDS"]

KINDS = {"reverse": 0, "forward": 1, "jsd": 2}


@triton.jit
def _online_update(m, s, z, col_ok):
    """Fold one tile into a running (max, sum of exp); returns the new pair, the rescale factor and exp(z - m_new)."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    alpha = tl.exp(m - m_new)
    e = tl.where(col_ok, tl.exp(z - m_new[:, None]), 0.0)
    return m_new, alpha * s + tl.sum(e, axis=1), alpha, e


@triton.jit
def _log_probs(a, b, lse_a, lse_b, col_ok, beta):
    """log p, log q, p, q and log m (jsd mixture) of one tile; 0 on columns >= V (instead of -inf, so no nan)."""
    lp = tl.where(col_ok, a - lse_a[:, None], 0.0)
    lq = tl.where(col_ok, b - lse_b[:, None], 0.0)
    p = tl.where(col_ok, tl.exp(lp), 0.0)
    q = tl.where(col_ok, tl.exp(lq), 0.0)
    x1 = lq + tl.log(beta)
    x2 = lp + tl.log(1.0 - beta)
    mx = tl.maximum(x1, x2)
    lm = mx + tl.log(tl.exp(x1 - mx) + tl.exp(x2 - mx))
    return lp, lq, p, q, lm


@triton.jit
def _kl_fwd_kernel(
    # pointers (student s*, teacher t*; bias pointers may be None)
    sh_ptr, sw_ptr, sb_ptr, th_ptr, tw_ptr, tb_ptr, mask_ptr, kl_ptr, slse_ptr, tlse_ptr,
    # sizes
    N, V, D, DT,
    # strides (in elements)
    s_hn, s_hd, s_wv, s_wd, t_hn, t_hd, t_wv, t_wd,
    # scalars (runtime: a new temperature or beta does not recompile)
    inv_temp, beta,
    # meta-parameters
    KIND: tl.constexpr, HAS_SBIAS: tl.constexpr, HAS_TBIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    S_PRECISION: tl.constexpr, T_PRECISION: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    valid = row_ok
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + offs_n, mask=row_ok, other=0) != 0)
    v_end = tl.where(any_row(valid), V, 0)
    ma = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    mb = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    sa = tl.zeros((BLOCK_N,), tl.float32)
    sb = tl.zeros((BLOCK_N,), tl.float32)
    cross = tl.zeros((BLOCK_N,), tl.float32)  # reverse: sum e^(a-ma) (a-b); forward: sum e^(b-mb) (b-a)
    for v0 in range(0, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_ok = (offs_v < V)[None, :]
        a = logits_tile(sh_ptr, sw_ptr, sb_ptr, offs_n, offs_v, N, V, D, s_hn, s_hd, s_wv, s_wd,
                        inv_temp, HAS_SBIAS, BLOCK_N, BLOCK_V, BLOCK_D, S_PRECISION)
        b = logits_tile(th_ptr, tw_ptr, tb_ptr, offs_n, offs_v, N, V, DT, t_hn, t_hd, t_wv, t_wd,
                        inv_temp, HAS_TBIAS, BLOCK_N, BLOCK_V, BLOCK_D, T_PRECISION)
        ma, sa, alpha_a, ea = _online_update(ma, sa, a, col_ok)
        mb, sb, alpha_b, eb = _online_update(mb, sb, b, col_ok)
        diff = tl.where(col_ok, a - b, 0.0)
        if KIND == 0:
            cross = alpha_a * cross + tl.sum(ea * diff, axis=1)
        elif KIND == 1:
            cross = alpha_b * cross - tl.sum(eb * diff, axis=1)
    lse_a = ma + tl.log(sa)
    lse_b = mb + tl.log(sb)
    if KIND == 0:
        kl = cross / sa - lse_a + lse_b
    elif KIND == 1:
        kl = cross / sb - lse_b + lse_a
    else:
        kl = tl.zeros((BLOCK_N,), tl.float32)
        for v0 in range(0, v_end, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            col_ok = (offs_v < V)[None, :]
            a = logits_tile(sh_ptr, sw_ptr, sb_ptr, offs_n, offs_v, N, V, D, s_hn, s_hd, s_wv, s_wd,
                            inv_temp, HAS_SBIAS, BLOCK_N, BLOCK_V, BLOCK_D, S_PRECISION)
            b = logits_tile(th_ptr, tw_ptr, tb_ptr, offs_n, offs_v, N, V, DT, t_hn, t_hd, t_wv, t_wd,
                            inv_temp, HAS_TBIAS, BLOCK_N, BLOCK_V, BLOCK_D, T_PRECISION)
            lp, lq, p, q, lm = _log_probs(a, b, lse_a, lse_b, col_ok, beta)
            kl += tl.sum(beta * q * (lq - lm) + (1.0 - beta) * p * (lp - lm), axis=1)
    tl.store(kl_ptr + offs_n, tl.where(valid, kl, 0.0), mask=row_ok)
    tl.store(slse_ptr + offs_n, tl.where(valid, lse_a, 0.0), mask=row_ok)
    tl.store(tlse_ptr + offs_n, tl.where(valid, lse_b, 0.0), mask=row_ok)


@triton.jit
def _dstudent(a, b, offs_v, V, lse_a, lse_b, c, g, valid, inv_temp, beta, KIND: tl.constexpr):
    """Gradient of ``g * KL`` w.r.t. the pre-temperature student logits of one tile; 0 on invalid rows/columns.

    c is KL(p || q) for reverse and KL(p || m) for jsd (unused for forward)."""
    ok = valid[:, None] & (offs_v < V)[None, :]
    lp, lq, p, q, lm = _log_probs(a, b, lse_a, lse_b, ok, beta)
    if KIND == 0:
        d = p * (lp - lq - c[:, None])
    elif KIND == 1:
        d = p - q
    else:
        d = (1.0 - beta) * p * (lp - lm - c[:, None])
    return tl.where(ok, d * (g * inv_temp)[:, None], 0.0)


@triton.jit
def _load_rows(mask_ptr, slse_ptr, tlse_ptr, g_ptr, offs_n, N, HAS_MASK: tl.constexpr):
    row_ok = offs_n < N
    valid = row_ok
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + offs_n, mask=row_ok, other=0) != 0)
    lse_a = tl.load(slse_ptr + offs_n, mask=row_ok, other=0.0)
    lse_b = tl.load(tlse_ptr + offs_n, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + offs_n, mask=row_ok, other=0.0).to(tl.float32)
    return valid, lse_a, lse_b, g


@triton.jit
def _kl_bwd_hidden_kernel(
    # pointers; c_ptr: the forward's kl (reverse/forward) or an (N,) fp32 buffer this kernel fills (jsd)
    sh_ptr, sw_ptr, sb_ptr, th_ptr, tw_ptr, tb_ptr, mask_ptr, slse_ptr, tlse_ptr, c_ptr, g_ptr, dh_ptr,
    # sizes
    N, V, D, DT,
    # strides (dh is a contiguous fp32 (N, D) buffer)
    s_hn, s_hd, s_wv, s_wd, t_hn, t_hd, t_wv, t_wd,
    # scalars
    inv_temp, beta,
    # meta-parameters
    KIND: tl.constexpr, HAS_SBIAS: tl.constexpr, HAS_TBIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    S_PRECISION: tl.constexpr, T_PRECISION: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid, lse_a, lse_b, g = _load_rows(mask_ptr, slse_ptr, tlse_ptr, g_ptr, offs_n, N, HAS_MASK)
    v_end = tl.where(any_row(valid), V, 0)
    if KIND == 2:
        # KL(p || m) per row, needed by every gradient term: one extra recompute pass, shared with the
        # grad_weight kernel through c_ptr.
        c = tl.zeros((BLOCK_N,), tl.float32)
        for v0 in range(0, v_end, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V)
            a = logits_tile(sh_ptr, sw_ptr, sb_ptr, offs_n, offs_v, N, V, D, s_hn, s_hd, s_wv, s_wd,
                            inv_temp, HAS_SBIAS, BLOCK_N, BLOCK_V, BLOCK_D, S_PRECISION)
            b = logits_tile(th_ptr, tw_ptr, tb_ptr, offs_n, offs_v, N, V, DT, t_hn, t_hd, t_wv, t_wd,
                            inv_temp, HAS_TBIAS, BLOCK_N, BLOCK_V, BLOCK_D, T_PRECISION)
            lp, lq, p, q, lm = _log_probs(a, b, lse_a, lse_b, (offs_v < V)[None, :], beta)
            c += tl.sum(p * (lp - lm), axis=1)
        tl.store(c_ptr + offs_n, c, mask=offs_n < N)
    else:
        c = tl.load(c_ptr + offs_n, mask=offs_n < N, other=0.0)
    for v0 in range(0, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        a = logits_tile(sh_ptr, sw_ptr, sb_ptr, offs_n, offs_v, N, V, D, s_hn, s_hd, s_wv, s_wd,
                        inv_temp, HAS_SBIAS, BLOCK_N, BLOCK_V, BLOCK_D, S_PRECISION)
        b = logits_tile(th_ptr, tw_ptr, tb_ptr, offs_n, offs_v, N, V, DT, t_hn, t_hd, t_wv, t_wd,
                        inv_temp, HAS_TBIAS, BLOCK_N, BLOCK_V, BLOCK_D, T_PRECISION)
        da = _dstudent(a, b, offs_v, V, lse_a, lse_b, c, g, valid, inv_temp, beta, KIND)
        accumulate_rows(dh_ptr, offs_n, N, D, D, 1, da.to(sw_ptr.dtype.element_ty), sw_ptr, offs_v, V,
                        s_wv, s_wd, BLOCK_D, S_PRECISION)


@triton.jit
def _kl_bwd_weight_kernel(
    # pointers; c_ptr as in _kl_bwd_hidden_kernel (already filled for jsd)
    sh_ptr, sw_ptr, sb_ptr, th_ptr, tw_ptr, tb_ptr, mask_ptr, slse_ptr, tlse_ptr, c_ptr, g_ptr, dw_ptr, db_ptr,
    # sizes
    N, V, D, DT,
    # strides (dw is a contiguous fp32 (V, D) buffer, db a fp32 (V,) buffer)
    s_hn, s_hd, s_wv, s_wd, t_hn, t_hd, t_wv, t_wd,
    # scalars
    inv_temp, beta,
    # meta-parameters
    KIND: tl.constexpr, HAS_SBIAS: tl.constexpr, HAS_TBIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    S_PRECISION: tl.constexpr, T_PRECISION: tl.constexpr,
):
    offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    db = tl.zeros((BLOCK_V,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid, lse_a, lse_b, g = _load_rows(mask_ptr, slse_ptr, tlse_ptr, g_ptr, offs_n, N, HAS_MASK)
        if any_row(valid):
            c = tl.load(c_ptr + offs_n, mask=offs_n < N, other=0.0)
            a = logits_tile(sh_ptr, sw_ptr, sb_ptr, offs_n, offs_v, N, V, D, s_hn, s_hd, s_wv, s_wd,
                            inv_temp, HAS_SBIAS, BLOCK_N, BLOCK_V, BLOCK_D, S_PRECISION)
            b = logits_tile(th_ptr, tw_ptr, tb_ptr, offs_n, offs_v, N, V, DT, t_hn, t_hd, t_wv, t_wd,
                            inv_temp, HAS_TBIAS, BLOCK_N, BLOCK_V, BLOCK_D, T_PRECISION)
            da = _dstudent(a, b, offs_v, V, lse_a, lse_b, c, g, valid, inv_temp, beta, KIND)
            db += tl.sum(da, axis=0)
            accumulate_rows(dw_ptr, offs_v, V, D, D, 1, tl.trans(da).to(sh_ptr.dtype.element_ty), sh_ptr,
                            offs_n, N, s_hn, s_hd, BLOCK_D, S_PRECISION)
    if HAS_SBIAS:
        tl.store(db_ptr + offs_v, db, mask=offs_v < V)


def _check(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, mask, kind, beta, temperature):
    check_2d("s_hidden", s_hidden)
    n, d = s_hidden.shape
    check_2d("s_weight", s_weight, cols=d)
    v = s_weight.shape[0]
    check_2d("t_hidden", t_hidden, rows=n)
    check_2d("t_weight", t_weight, rows=v, cols=t_hidden.shape[1])
    for name, h, w in (("s", s_hidden, s_weight), ("t", t_hidden, t_weight)):
        if h.dtype != w.dtype:
            raise ValueError(f"{name}_weight dtype {w.dtype} must match {name}_hidden dtype {h.dtype}")
    check_vector("s_bias", s_bias, v)
    check_vector("t_bias", t_bias, v)
    check_vector("mask", mask, n, torch.bool)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    if kind == "jsd":
        beta = check_float_param("beta", beta, 0.0, 1.0)
    inv_temp = 1.0 / check_float_param("temperature", temperature, 0.0)
    devices = {x.device for x in (s_hidden, s_weight, t_hidden, t_weight)}
    if len(devices) != 1:
        raise ValueError(f"student and teacher tensors must be on one device, got {sorted(map(str, devices))}")
    return n, v, d, t_hidden.shape[1], float(beta), inv_temp


def _launch_args(s_hidden, s_weight, t_hidden, t_weight, n, v, d, dt, inv_temp, beta):
    return (n, v, d, dt, *s_hidden.stride(), *s_weight.stride(), *t_hidden.stride(), *t_weight.stride(),
            inv_temp, beta)


def _meta(kind, s_bias, t_bias, mask, s_hidden, t_hidden, cfg):
    return dict(KIND=KINDS[kind], HAS_SBIAS=s_bias is not None, HAS_TBIAS=t_bias is not None,
                HAS_MASK=mask is not None, S_PRECISION=dot_precision(s_hidden.dtype),
                T_PRECISION=dot_precision(t_hidden.dtype), **cfg.meta())


def kl_forward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, mask, *, kind="reverse", beta=0.5,
               temperature=1.0, config: KernelConfig | None = None):
    """Exact divergence per token without materialising logits.

    s_hidden ``(N, d)``, s_weight ``(V, d)``, t_hidden ``(N, d_t)``, t_weight ``(V, d_t)``, biases ``(V,)`` or None,
    mask ``(N,)`` bool or None. Returns ``(kl, s_lse, t_lse)``, each ``(N,)`` float32, 0 where mask is False.
    """
    n, v, d, dt, beta, inv_temp = _check(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, mask, kind, beta,
                                         temperature)
    cfg = config or default_config("kl_fwd", s_hidden.dtype)
    kl, s_lse, t_lse = (torch.empty(n, device=s_hidden.device, dtype=torch.float32) for _ in range(3))
    if n == 0:
        return kl, s_lse, t_lse
    mask8 = mask.contiguous().view(torch.uint8) if mask is not None else None
    _kl_fwd_kernel[(triton.cdiv(n, cfg.BLOCK_N),)](  # tokens on grid axis 0 (axes 1, 2 stop at 65,535)
        s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, mask8, kl, s_lse, t_lse,
        *_launch_args(s_hidden, s_weight, t_hidden, t_weight, n, v, d, dt, inv_temp, beta),
        **_meta(kind, s_bias, t_bias, mask, s_hidden, t_hidden, cfg))
    return kl, s_lse, t_lse


def kl_backward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, mask, s_lse, t_lse, kl, grad_kl, *,
                kind="reverse", beta=0.5, temperature=1.0, config: KernelConfig | None = None):
    """Student gradients of ``sum(grad_kl * kl)`` by recomputing both models' logit tiles.

    s_lse, t_lse, kl: ``(N,)`` float32 from :func:`kl_forward`; grad_kl ``(N,)``. Returns
    ``(grad_s_hidden, grad_s_weight, grad_s_bias)`` in the student's dtypes (grad_s_bias None without s_bias).
    """
    n, v, d, dt, beta, inv_temp = _check(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, mask, kind, beta,
                                         temperature)
    for name, x in (("s_lse", s_lse), ("t_lse", t_lse), ("kl", kl)):
        check_vector(name, x, n, torch.float32)
    check_vector("grad_kl", grad_kl, n)
    cfg = config or default_config("kl_bwd", s_hidden.dtype)
    dev = s_hidden.device
    grad_h, grad_w, grad_b = fp32_grad_buffers(n, v, d, dev, s_bias is not None)
    if n > 0:
        mask8 = mask.contiguous().view(torch.uint8) if mask is not None else None
        c = torch.empty(n, device=dev, dtype=torch.float32) if kind == "jsd" else kl.contiguous()
        ptrs = (s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, mask8, s_lse.contiguous(),
                t_lse.contiguous(), c, grad_kl.contiguous())
        args = _launch_args(s_hidden, s_weight, t_hidden, t_weight, n, v, d, dt, inv_temp, beta)
        meta = _meta(kind, s_bias, t_bias, mask, s_hidden, t_hidden, cfg)
        # Order matters for jsd: the grad_hidden kernel fills c, the grad_weight kernel reads it (same stream).
        _kl_bwd_hidden_kernel[(triton.cdiv(n, cfg.BLOCK_N),)](*ptrs, grad_h, *args, **meta)
        _kl_bwd_weight_kernel[(triton.cdiv(v, cfg.BLOCK_V),)](*ptrs, grad_w, grad_b, *args, **meta)
    return (grad_h.to(s_hidden.dtype), grad_w.to(s_weight.dtype),
            grad_b.to(s_bias.dtype) if s_bias is not None else None)
