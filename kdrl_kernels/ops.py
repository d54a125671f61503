"""Autograd Functions over the backend contract; each takes a small frozen params dataclass.

``apply`` casts the matmul operands for an enclosing autocast region and runs forward and backward with autocast
off (``backend.autocast_inputs``): the kernels choose each op's precision themselves.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .backend import autocast_inputs, get_impl, no_autocast


@dataclass(frozen=True)
class LogprobParams:
    temperature: float = 1.0
    ignore_index: int = -100
    backend: str = "torch"
    chunk_size: int | None = None
    need_entropy: bool = True  # the PyTorch path skips the entropy pass when nobody asked for it


@dataclass(frozen=True)
class KLParams:
    kind: str = "reverse"
    beta: float = 0.5
    temperature: float = 1.0
    backend: str = "torch"
    chunk_size: int | None = None


class LinearLogprobs(torch.autograd.Function):
    """``(logp, entropy, lse)`` of targets under ``softmax((hidden @ weight.T + bias) / T)``; lse not differentiable.

    The backward recomputes logits chunk by chunk (or tile by tile on GPU) from the saved lse and entropy.
    """

    @classmethod
    def apply(cls, hidden, weight, bias, targets, params):
        hidden, weight = autocast_inputs(hidden.device, hidden, weight)
        with no_autocast(hidden.device):
            return super().apply(hidden, weight, bias, targets, params)

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, params: LogprobParams):
        impl = get_impl(params.backend, params.chunk_size)
        logp, lse, entropy = impl.logprobs_forward(hidden, weight, bias, targets, temperature=params.temperature,
                                                   ignore_index=params.ignore_index, need_entropy=params.need_entropy)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.params = params
        ctx.mark_non_differentiable(lse)
        return logp, entropy, lse

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_lse):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        params = ctx.params
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        impl = get_impl(params.backend, params.chunk_size)
        with no_autocast(hidden.device):  # backward() may be called inside the autocast region
            grad_h, grad_w, grad_b = impl.logprobs_backward(
                hidden, weight, bias, targets, lse, grad_logp.contiguous(),
                None if grad_entropy is None else grad_entropy.contiguous(), entropy,
                temperature=params.temperature, ignore_index=params.ignore_index, needs=ctx.needs_input_grad[:3])
        return grad_h, grad_w, grad_b, None, None


class LinearKL(torch.autograd.Function):
    """Exact per-token divergence between student and teacher; gradients reach the student only."""

    @classmethod
    def apply(cls, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, mask, params):
        s_hidden, s_weight, t_hidden, t_weight = autocast_inputs(s_hidden.device, s_hidden, s_weight, t_hidden,
                                                                 t_weight)
        with no_autocast(s_hidden.device):
            return super().apply(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, mask, params)

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, mask, params: KLParams):
        impl = get_impl(params.backend, params.chunk_size)
        kl, s_lse, t_lse = impl.kl_forward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, mask,
                                           kind=params.kind, beta=params.beta, temperature=params.temperature)
        ctx.save_for_backward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, mask, s_lse, t_lse, kl)
        ctx.params = params
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, mask, s_lse, t_lse, kl = ctx.saved_tensors
        params = ctx.params
        impl = get_impl(params.backend, params.chunk_size)
        with no_autocast(s_hidden.device):
            grad_h, grad_w, grad_b = impl.kl_backward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, mask,
                                                      s_lse, t_lse, kl, grad_kl.contiguous(), kind=params.kind,
                                                      beta=params.beta, temperature=params.temperature,
                                                      needs=ctx.needs_input_grad[:3])
        return grad_h, grad_w, grad_b, None, None, None, None, None
