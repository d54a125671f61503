"""Single-pass fused policy loss on the PyTorch path: gradients are computed during the forward.

A GRPO/KDRL/TRRD loss is a weighted sum of per-token terms of ``s`` (student log-prob of the sampled token),
``t`` (teacher log-prob) and optionally the exact per-token KL, with weights known before the pass (aggregation
normalisers, advantages, masks). So the gradient of the loss w.r.t. a chunk's logits is known as soon as that chunk's
``s`` is: ``dL/dz = g_s * (onehot - p) + g_kl * p * (log p - log q - KL)``, with ``g_s = dL/ds`` and ``g_kl = dL/dKL``
from autograd on the tiny per-token objective. One pass then does student logits, teacher logits and both gradient
matmuls: ``6*N*d*V + 2*N*d_t*V`` FLOPs, no recompute, one or two chunk-sized buffers. ``loss.backward()`` only scales
the stored gradients, which is valid because the loss is terminal (a scalar the caller backpropagates once).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch

from .backend import autocast_inputs, no_autocast
from .chunked import Workspace, default_chunk_size, finish_grads, grad_buffers, log_softmax_, rowdot
from .heads import Head

__all__ = ["TeacherInputs", "FusedLossParams", "FusedPolicyLoss", "STAT_ROWS"]

STAT_ROWS = ("logp", "teacher_logp", "exact_kl", "entropy")


@dataclass(frozen=True, eq=False)
class TeacherInputs:
    """The teacher side, detached: either hidden ``(N, d_t)`` + weight ``(V, d_t)`` (+ bias), or log-probs ``(N,)``."""
    hidden: Optional[torch.Tensor] = None
    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    logprobs: Optional[torch.Tensor] = None

    @property
    def present(self) -> bool:
        return self.hidden is not None or self.logprobs is not None


@dataclass(frozen=True, eq=False)
class FusedLossParams:
    """``objective(rows, s, t, kl) -> scalar`` gives the loss of the rows ``rows`` (an index tensor) of the batch."""
    objective: Callable
    temperature: float = 1.0
    chunk_size: Optional[int] = None
    need_exact_kl: bool = False   # compute the exact reverse KL per token (for the loss or as a metric)
    kl_has_grad: bool = False     # the objective depends on the exact KL
    need_entropy: bool = False

    @property
    def keep_logp(self) -> bool:
        """log p is still needed after p (exact KL, entropy), so p takes a buffer of its own instead of log p's."""
        return self.need_exact_kl or self.need_entropy


def _teacher_chunk(ws, teacher, head, idx, targets, keep_logq):
    """Teacher log-prob of the targets for one chunk; with ``keep_logq`` also the teacher's ``(c, V)`` log-probs.

    Without ``keep_logq`` the teacher's logits go through the student's buffer "z", which the student then
    overwrites: a k1/k2/k3 step needs one vocabulary-sized buffer in all (two with the entropy), the exact KL three.
    """
    if teacher.hidden is None:
        return teacher.logprobs[idx].float(), None
    n = idx.numel()
    logq = log_softmax_(head.logits(ws, teacher.hidden[idx], ws.take("zt" if keep_logq else "z", n), targets))
    t = logq.gather(1, targets[:, None]).squeeze(1)
    if teacher.logprobs is not None:  # precomputed log-probs win for t; the full row still serves the exact KL
        t = teacher.logprobs[idx].float()
    return t, (logq if keep_logq else None)


def _objective_grads(params, idx, s, t, kl):
    """Loss of the chunk and its gradients w.r.t. ``s`` and ``kl``, by autograd on ``(c,)`` tensors."""
    s_var = s.detach().requires_grad_(True)
    kl_var = kl.detach().requires_grad_(True) if (kl is not None and params.kl_has_grad) else kl
    with torch.enable_grad():
        value = params.objective(idx, s_var, t, kl_var)
        wrt = [s_var] + ([kl_var] if params.kl_has_grad else [])
        grads = torch.autograd.grad(value, wrt, allow_unused=True)
    g_s = grads[0] if grads[0] is not None else torch.zeros_like(s)
    g_kl = grads[1] if params.kl_has_grad else None
    return value.detach(), g_s, g_kl


def _chunk_step(ws, idx, hidden, targets, head, teacher, teacher_head, params, stats, grads, needs):
    """One chunk of rows ``idx``: statistics into ``stats``, gradients into ``grads``; returns the chunk's loss."""
    keep_logp = params.keep_logp
    tgt = targets[idx]
    t, logq = (_teacher_chunk(ws, teacher, teacher_head, idx, tgt, params.need_exact_kl)
               if teacher.present else (None, None))
    h = hidden[idx]
    logp = log_softmax_(head.logits(ws, h, ws.take("z", idx.numel()), tgt))
    s = logp.gather(1, tgt[:, None]).squeeze(1)
    p = torch.exp(logp, out=ws.take("p", idx.numel())) if keep_logp else logp.exp_()
    kl = None
    if params.need_exact_kl:
        diff = torch.sub(logp, logq, out=logq)  # log p - log q, in the teacher's buffer
        kl = rowdot(p, diff)
        stats[2, idx] = kl
    if params.need_entropy:
        stats[3, idx] = -rowdot(p, logp)
    value, g_s, g_kl = _objective_grads(params, idx, s, t, kl)
    stats[0, idx] = s
    if t is not None:
        stats[1, idx] = t
    # dL/dz = g_s * (onehot - p) [+ g_kl * p * (log p - log q - KL)], all over the temperature.
    dz = torch.mul(p, -g_s[:, None], out=logp) if keep_logp else p.mul_(-g_s[:, None])
    if g_kl is not None:
        dz += diff.sub_(kl[:, None]).mul_(p).mul_(g_kl[:, None])
    dz.scatter_add_(1, tgt[:, None], g_s[:, None])
    if params.temperature != 1.0:
        dz /= params.temperature
    if any(needs):
        head.backprop(ws, dz, h, idx, *grads)
    return value


class FusedPolicyLoss(torch.autograd.Function):
    """forward(hidden ``(N, d)``, weight ``(V, d)``, bias, targets ``(N,)``, teacher, params) -> (loss, stats).

    All rows are valid (the caller drops masked tokens before calling). ``stats`` is ``(4, N)`` float32 with the rows
    of :data:`STAT_ROWS` (zeros where not computed), not differentiable. Inside an autocast region the hidden states
    and weights (student and teacher) are cast to its dtype first, as ``nn.Linear``'s are (``backend.autocast_inputs``).
    """

    @classmethod
    def apply(cls, hidden, weight, bias, targets, teacher: TeacherInputs, params: FusedLossParams):
        device = hidden.device
        hidden, weight, t_hidden, t_weight = autocast_inputs(device, hidden, weight, teacher.hidden, teacher.weight)
        if t_hidden is not teacher.hidden or t_weight is not teacher.weight:
            teacher = replace(teacher, hidden=t_hidden, weight=t_weight)
        with no_autocast(device):
            return super().apply(hidden, weight, bias, targets, teacher, params)

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, teacher: TeacherInputs, params: FusedLossParams):
        n = hidden.shape[0]
        needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        grads = grad_buffers(hidden, weight, bias, needs)
        stats = torch.zeros(len(STAT_ROWS), n, dtype=torch.float32, device=hidden.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        head = Head(weight, bias, params.temperature)
        teacher_head = Head(teacher.weight, teacher.bias, params.temperature) if teacher.hidden is not None else None
        scratch = max(h.scratch_buffers for h in (head, teacher_head) if h is not None)  # shared by both heads
        n_buffers = (3 if params.need_exact_kl else (2 if params.keep_logp else 1)) + scratch
        chunk = params.chunk_size or default_chunk_size(weight.shape[0], max(n, 1), n_buffers)
        ws = Workspace(chunk, weight.shape[0], hidden.device)
        for start in range(0, n, chunk):
            idx = torch.arange(start, min(start + chunk, n), device=hidden.device)
            loss += _chunk_step(ws, idx, hidden, targets, head, teacher, teacher_head, params, stats, grads, needs)
        del ws  # the workspace goes before the fp32 weight gradient is rounded: the two need not coexist
        grad_hidden, grad_weight, grad_bias = finish_grads(weight, bias, *grads)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        if bool(grad_loss == 1):  # the usual loss.backward(): skip a full pass over the (V, d) gradient
            return grad_hidden, grad_weight, grad_bias, None, None, None
        scale = (lambda g: None if g is None else g * grad_loss.to(g.dtype))
        return scale(grad_hidden), scale(grad_weight), scale(grad_bias), None, None, None
