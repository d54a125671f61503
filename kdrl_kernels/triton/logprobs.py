"""Triton kernels for target log-probs, entropy and logsumexp from hidden states and an lm_head weight.

Forward (one program per ``BLOCK_N`` tokens, looping over ``BLOCK_V`` vocabulary tiles): online logsumexp and an
online entropy in fp32. Backward recomputes the logit tiles instead of storing ``(N, V)`` anything:

    dz = (g_logp * (onehot - p) + g_ent * (-p * (log p + H))) / temperature
    grad_hidden = dz @ W        (one program per token block, over vocabulary tiles)
    grad_weight = dz^T @ h      (one program per vocabulary block, over token blocks)
    grad_bias   = sum_rows dz   (same programs as grad_weight)

Each program owns the rows it writes, so there are no atomics and results are deterministic. FLOPs: forward
``2 N d V``; backward ``8 N d V`` (two recomputes of the logits plus the two gradient GEMMs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (KernelConfig, accumulate_rows, any_row, check_2d, check_float_param, check_vector,
                      default_config, dot_precision, fp32_grad_buffers, logits_tile)

__all__ = ["logprobs_forward", "logprobs_backward"]


@triton.jit
def _logprobs_fwd_kernel(
    # pointers
    h_ptr, w_ptr, b_ptr, tgt_ptr, logp_ptr, lse_ptr, ent_ptr,
    # sizes
    N, V, D,
    # strides (in elements)
    stride_hn, stride_hd, stride_wv, stride_wd,
    # scalars: runtime values, so a new temperature or ignore_index does not recompile
    inv_temp, ignore_index,
    # meta-parameters
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    tgt = tl.load(tgt_ptr + offs_n, mask=row_ok, other=ignore_index)
    valid = row_ok & (tgt != ignore_index)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # running max of the logits
    s = tl.zeros((BLOCK_N,), tl.float32)                 # sum exp(z - m)
    t = tl.zeros((BLOCK_N,), tl.float32)                 # sum exp(z - m) * (z - m): shifted, so no cancellation
    z_tgt = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(0, tl.where(any_row(valid), V, 0), BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_ok = (offs_v < V)[None, :]
        z = logits_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, D, stride_hn, stride_hd, stride_wv, stride_wd,
                        inv_temp, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, PRECISION)
        m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: every tile has at least one column < V
        alpha = tl.exp(m - m_new)                  # 0 on the first tile (m = -inf)
        zs = tl.where(col_ok, z - m_new[:, None], 0.0)
        e = tl.exp(zs) * col_ok
        # Moving the shift from m to m_new adds (m - m_new) to every earlier (z - m). On the first tile m = -inf
        # and s = 0: use m_new there so the product is 0 * 0, not -inf * 0 = nan.
        shift = tl.where(s > 0, m, m_new) - m_new
        t = alpha * (t + shift * s) + tl.sum(e * zs, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
        hit = (offs_v[None, :] == tgt[:, None]) & col_ok
        z_tgt += tl.sum(tl.where(hit, z, 0.0), axis=1)
    log_s = tl.log(s)
    lse = m + log_s
    entropy = log_s - t / s  # H = lse - E_p[z] = log s - E_p[z - m]
    tl.store(logp_ptr + offs_n, tl.where(valid, z_tgt - lse, 0.0), mask=row_ok)
    tl.store(lse_ptr + offs_n, tl.where(valid, lse, 0.0), mask=row_ok)
    tl.store(ent_ptr + offs_n, tl.where(valid, entropy, 0.0), mask=row_ok)


@triton.jit
def _dlogits(z, offs_v, V, tgt, lse, ent, g_logp, g_ent, valid, inv_temp, HAS_GENT: tl.constexpr):
    """Gradient w.r.t. the pre-temperature logits of one tile, fp32; 0 on invalid rows and columns."""
    ok = valid[:, None] & (offs_v < V)[None, :]
    logp = tl.where(ok, z - lse[:, None], 0.0)
    p = tl.where(ok, tl.exp(logp), 0.0)
    onehot = (offs_v[None, :] == tgt[:, None]).to(tl.float32)
    dz = g_logp[:, None] * (onehot - p)
    if HAS_GENT:
        dz += g_ent[:, None] * (-p * (logp + ent[:, None]))
    return tl.where(ok, dz * inv_temp, 0.0)


@triton.jit
def _load_row_stats(tgt_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr, offs_n, N, ignore_index,
                    HAS_GENT: tl.constexpr):
    row_ok = offs_n < N
    tgt = tl.load(tgt_ptr + offs_n, mask=row_ok, other=ignore_index)
    valid = row_ok & (tgt != ignore_index)
    lse = tl.load(lse_ptr + offs_n, mask=row_ok, other=0.0)
    ent = tl.load(ent_ptr + offs_n, mask=row_ok, other=0.0)
    g_logp = tl.load(glogp_ptr + offs_n, mask=row_ok, other=0.0).to(tl.float32)
    if HAS_GENT:
        g_ent = tl.load(gent_ptr + offs_n, mask=row_ok, other=0.0).to(tl.float32)
    else:
        g_ent = tl.zeros_like(g_logp)
    return tgt, valid, lse, ent, g_logp, g_ent


@triton.jit
def _logprobs_bwd_hidden_kernel(
    # pointers
    h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr, dh_ptr,
    # sizes
    N, V, D,
    # strides (dh is a contiguous fp32 (N, D) buffer)
    stride_hn, stride_hd, stride_wv, stride_wd,
    # scalars
    inv_temp, ignore_index,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_GENT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tgt, valid, lse, ent, g_logp, g_ent = _load_row_stats(tgt_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr, offs_n,
                                                          N, ignore_index, HAS_GENT)
    for v0 in range(0, tl.where(any_row(valid), V, 0), BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        z = logits_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, D, stride_hn, stride_hd, stride_wv, stride_wd,
                        inv_temp, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, PRECISION)
        dz = _dlogits(z, offs_v, V, tgt, lse, ent, g_logp, g_ent, valid, inv_temp, HAS_GENT)
        accumulate_rows(dh_ptr, offs_n, N, D, D, 1, dz.to(w_ptr.dtype.element_ty), w_ptr, offs_v, V,
                        stride_wv, stride_wd, BLOCK_D, PRECISION)


@triton.jit
def _logprobs_bwd_weight_kernel(
    # pointers
    h_ptr, w_ptr, b_ptr, tgt_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr, dw_ptr, db_ptr,
    # sizes
    N, V, D,
    # strides (dw is a contiguous fp32 (V, D) buffer, db a fp32 (V,) buffer)
    stride_hn, stride_hd, stride_wv, stride_wd,
    # scalars
    inv_temp, ignore_index,
    # meta-parameters
    HAS_BIAS: tl.constexpr, HAS_GENT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    db = tl.zeros((BLOCK_V,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        tgt, valid, lse, ent, g_logp, g_ent = _load_row_stats(tgt_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr,
                                                              offs_n, N, ignore_index, HAS_GENT)
        if any_row(valid):
            z = logits_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, D, stride_hn, stride_hd, stride_wv, stride_wd,
                            inv_temp, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D, PRECISION)
            dz = _dlogits(z, offs_v, V, tgt, lse, ent, g_logp, g_ent, valid, inv_temp, HAS_GENT)
            db += tl.sum(dz, axis=0)
            accumulate_rows(dw_ptr, offs_v, V, D, D, 1, tl.trans(dz).to(h_ptr.dtype.element_ty), h_ptr, offs_n, N,
                            stride_hn, stride_hd, BLOCK_D, PRECISION)
    if HAS_BIAS:
        tl.store(db_ptr + offs_v, db, mask=offs_v < V)


def _check(hidden, weight, bias, targets):
    check_2d("hidden", hidden)
    n, d = hidden.shape
    check_2d("weight", weight, cols=d)
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    check_vector("bias", bias, weight.shape[0])
    check_vector("targets", targets, n, torch.int64)
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError("hidden, weight and targets must be on the same device")
    return n, weight.shape[0], d


def _scalar_args(temperature, ignore_index):
    return 1.0 / check_float_param("temperature", temperature, 0.0), int(ignore_index)


def logprobs_forward(hidden, weight, bias, targets, *, temperature=1.0, ignore_index=-100,
                     config: KernelConfig | None = None):
    """Target log-probs, logsumexp and entropy without materialising logits.

    hidden ``(N, d)``, weight ``(V, d)`` (same float dtype), bias ``(V,)`` or None, targets ``(N,)`` int64.
    Returns ``(logp, lse, entropy)``, each ``(N,)`` float32, 0 on rows whose target is ``ignore_index``.
    Target values are not range-checked here (that would synchronise with the GPU); the public op checks them.
    ``config`` overrides the tile sizes (tests use small tiles to exercise every loop).
    """
    n, v, d = _check(hidden, weight, bias, targets)
    inv_temp, ignore_index = _scalar_args(temperature, ignore_index)
    cfg = config or default_config("logprobs_fwd", hidden.dtype)
    logp, lse, entropy = (torch.empty(n, device=hidden.device, dtype=torch.float32) for _ in range(3))
    if n == 0:
        return logp, lse, entropy
    # Tokens on grid axis 0: axes 1 and 2 are limited to 65,535 programs.
    grid = (triton.cdiv(n, cfg.BLOCK_N),)
    _logprobs_fwd_kernel[grid](
        hidden, weight, bias, targets, logp, lse, entropy,
        n, v, d, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        inv_temp, ignore_index,
        HAS_BIAS=bias is not None, PRECISION=dot_precision(hidden.dtype), **cfg.meta())
    return logp, lse, entropy


def logprobs_backward(hidden, weight, bias, targets, lse, grad_logp, grad_entropy, entropy, *, temperature=1.0,
                      ignore_index=-100, config: KernelConfig | None = None):
    """Gradients of ``sum(grad_logp * logp + grad_entropy * entropy)`` by recomputing the logit tiles.

    lse, entropy: ``(N,)`` float32 from :func:`logprobs_forward`; grad_logp ``(N,)``; grad_entropy ``(N,)`` or None.
    Returns ``(grad_hidden, grad_weight, grad_bias)`` in the dtypes of hidden, weight and bias (grad_bias None when
    bias is None). Accumulation is fp32 throughout; the cast to the parameter dtype happens once at the end.
    """
    n, v, d = _check(hidden, weight, bias, targets)
    inv_temp, ignore_index = _scalar_args(temperature, ignore_index)
    for name, x in (("lse", lse), ("entropy", entropy)):
        check_vector(name, x, n, torch.float32)
    check_vector("grad_logp", grad_logp, n)
    check_vector("grad_entropy", grad_entropy, n)
    cfg = config or default_config("logprobs_bwd", hidden.dtype)
    grad_hidden, grad_weight, grad_bias = fp32_grad_buffers(n, v, d, hidden.device, bias is not None)
    if n > 0:
        args = (n, v, d, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                inv_temp, ignore_index)
        meta = dict(HAS_BIAS=bias is not None, HAS_GENT=grad_entropy is not None,
                    PRECISION=dot_precision(hidden.dtype), **cfg.meta())
        stats = (targets, lse.contiguous(), entropy.contiguous(), grad_logp.contiguous(),
                 grad_entropy.contiguous() if grad_entropy is not None else None)
        _logprobs_bwd_hidden_kernel[(triton.cdiv(n, cfg.BLOCK_N),)](
            hidden, weight, bias, *stats, grad_hidden, *args, **meta)
        _logprobs_bwd_weight_kernel[(triton.cdiv(v, cfg.BLOCK_V),)](
            hidden, weight, bias, *stats, grad_weight, grad_bias, *args, **meta)
    return (grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype),
            grad_bias.to(bias.dtype) if bias is not None else None)
