"""Pieces shared by the Triton kernel families: the logits tile, launch configurations and launcher checks.

Every kernel here works on ``(BLOCK_N, BLOCK_V)`` tiles of ``logits = (hidden @ weight.T + bias) / temperature``
computed in fp32 by looping over the hidden dimension in ``BLOCK_D`` chunks, so no kernel ever holds a whole
``d``-long row in registers and no ``(N, V)`` tensor is ever written to memory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    from . import _interpreter  # CPU interpreter workarounds (tests, smoke runs); never imported for GPU use
    _interpreter.apply()


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options of one kernel. Every block size must be >= 16 (``tl.dot``)."""
    BLOCK_N: int = 64
    BLOCK_V: int = 128
    BLOCK_D: int = 64
    num_warps: int = 8
    num_stages: int = 2

    def __post_init__(self):
        for name in ("BLOCK_N", "BLOCK_V", "BLOCK_D"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {value}")

    def meta(self) -> dict:
        """Keyword arguments for a kernel launch."""
        return dict(BLOCK_N=self.BLOCK_N, BLOCK_V=self.BLOCK_V, BLOCK_D=self.BLOCK_D,
                    num_warps=self.num_warps, num_stages=self.num_stages)


# Chosen with the ahead-of-time report (python -m kdrl_kernels.triton.aot), never timed: no register spills on
# sm_80 or sm_90 under Triton 3.6.0 and 3.9.0, tensor cores for bf16. The hidden dimension is a runtime loop in
# BLOCK_D chunks, so these numbers hold for any d (4096 included). fp32 inputs use ieee dots (FMA, not tensor cores)
# whose operands live in registers, hence BLOCK_D = 16. Their tiles are small and ptxas' choices erratic: 3.6's
# ptxas capped the former 64-row tiles at 128 registers and spilled 8-24 B in six kernels, and a small change can
# spill elsewhere (BLOCK_N = 32 in the logprobs backward: 8 B on sm_80 under 3.9). Recheck both versions after any
# change here (tests/test_triton_aot.py; KDRL_TEST_PYTHONS adds the other Triton). Keys: (kernel, element size).
_BF16_SINGLE = KernelConfig(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3)
_BF16_PAIR = KernelConfig(BLOCK_N=64, BLOCK_V=64, BLOCK_D=64, num_warps=8, num_stages=3)
CONFIGS = {
    ("logprobs_fwd", 2): _BF16_SINGLE, ("logprobs_bwd", 2): _BF16_SINGLE,
    ("kl_fwd", 2): _BF16_PAIR, ("kl_bwd", 2): _BF16_PAIR,
    ("logprobs_fwd", 4): KernelConfig(BLOCK_N=32, BLOCK_V=128, BLOCK_D=16, num_warps=8, num_stages=2),
    ("logprobs_bwd", 4): KernelConfig(BLOCK_N=64, BLOCK_V=32, BLOCK_D=16, num_warps=8, num_stages=2),
    ("kl_fwd", 4): KernelConfig(BLOCK_N=32, BLOCK_V=64, BLOCK_D=16, num_warps=8, num_stages=2),
    ("kl_bwd", 4): KernelConfig(BLOCK_N=64, BLOCK_V=64, BLOCK_D=16, num_warps=8, num_stages=3),
}


def default_config(kernel: str, dtype: torch.dtype) -> KernelConfig:
    """Launch configuration of ``kernel`` (logprobs_fwd, logprobs_bwd, kl_fwd, kl_bwd) for inputs of ``dtype``."""
    return CONFIGS[(kernel, 2 if dtype.itemsize <= 2 else 4)]


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 inputs follow torch's own TF32 switch (off by default, as in torch)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


@triton.jit
def any_row(valid):
    """True when any row of the block is valid; blocks of ignored rows (prompt, padding) skip every GEMM."""
    return tl.max(valid.to(tl.int32), axis=0) > 0


@triton.jit
def logits_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, D,
                stride_hn, stride_hd, stride_wv, stride_wd, inv_temp,
                HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                PRECISION: tl.constexpr):
    """fp32 ``(BLOCK_N, BLOCK_V)`` tile of ``(h @ w.T + b) * inv_temp``; columns ``>= V`` are ``-inf``.

    Rows ``>= N`` read zeros (finite logits), so the caller must mask them out of anything it stores.
    Row offsets are int64: ``N * d`` and ``V * d`` can exceed 2**31.
    """
    offs_d = tl.arange(0, BLOCK_D)
    h_rows = h_ptr + offs_n.to(tl.int64)[:, None] * stride_hn
    w_rows = w_ptr + offs_v.to(tl.int64)[:, None] * stride_wv
    row_ok = (offs_n < N)[:, None]
    col_ok = (offs_v < V)[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        d = k0 + offs_d
        d_ok = (d < D)[None, :]
        h = tl.load(h_rows + d[None, :] * stride_hd, mask=row_ok & d_ok, other=0.0)
        w = tl.load(w_rows + d[None, :] * stride_wd, mask=col_ok & d_ok, other=0.0)
        # Native-dtype inputs (bf16 -> tensor cores), fp32 accumulation.
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION, out_dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=offs_v < V, other=0.0).to(tl.float32)[None, :]
    acc = acc * inv_temp
    return tl.where((offs_v < V)[None, :], acc, float("-inf"))


@triton.jit
def accumulate_rows(acc_ptr, offs_r, R, D, stride_ar, stride_ad, x, b_ptr, offs_k, K, stride_bk, stride_bd,
                    BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """``acc[offs_r, :] += x @ b[offs_k, :]`` over the whole width ``D``, in ``BLOCK_D`` chunks.

    x ``(BLOCK_R, BLOCK_K)`` already in b's dtype, b ``(K, D)``, acc ``(R, D)`` float32. The calling program owns the
    rows ``offs_r`` of acc for the whole launch, so this read-modify-write needs no atomics and is deterministic.
    """
    offs_d = tl.arange(0, BLOCK_D)
    a_rows = acc_ptr + offs_r.to(tl.int64)[:, None] * stride_ar
    b_rows = b_ptr + offs_k.to(tl.int64)[:, None] * stride_bk
    r_ok = (offs_r < R)[:, None]
    k_ok = (offs_k < K)[:, None]
    for k0 in range(0, D, BLOCK_D):
        d = k0 + offs_d
        d_ok = (d < D)[None, :]
        b = tl.load(b_rows + d[None, :] * stride_bd, mask=k_ok & d_ok, other=0.0)
        a_ptrs = a_rows + d[None, :] * stride_ad
        upd = tl.dot(x, b, input_precision=PRECISION, out_dtype=tl.float32)
        tl.store(a_ptrs, tl.load(a_ptrs, mask=r_ok & d_ok, other=0.0) + upd, mask=r_ok & d_ok)
    # The next call re-reads these rows, possibly through other threads of the block if the compiler picks a
    # different register layout for that load: a block-wide barrier orders the global stores before it.
    tl.debug_barrier()


def fp32_grad_buffers(n: int, v: int, d: int, device, with_bias: bool):
    """Zeroed fp32 accumulators ``(grad_hidden (N, d), grad_weight (V, d), grad_bias (V,) or None)``."""
    grad_bias = torch.zeros(v, device=device, dtype=torch.float32) if with_bias else None
    return (torch.zeros((n, d), device=device, dtype=torch.float32),
            torch.zeros((v, d), device=device, dtype=torch.float32), grad_bias)


def check_2d(name: str, x: torch.Tensor, rows: int | None = None, cols: int | None = None) -> None:
    if x.dim() != 2 or (rows is not None and x.shape[0] != rows) or (cols is not None and x.shape[1] != cols):
        want = f"({rows if rows is not None else 'any'}, {cols if cols is not None else 'any'})"
        raise ValueError(f"{name} must be 2-D with shape {want}, got {tuple(x.shape)}")


def check_vector(name: str, x: torch.Tensor | None, n: int, dtype: torch.dtype | None = None) -> None:
    if x is None:
        return
    if x.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(x.shape)}")
    if dtype is not None and x.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {x.dtype}")


def check_float_param(name: str, value: float, low: float, high: float | None = None) -> float:
    value = float(value)
    if not (value > low and (high is None or value < high)):
        bound = f"in ({low}, {high})" if high is not None else f"> {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value
