"""The naive PyTorch baseline: the loss as a user writes it by hand, with full ``(N, V)`` logits.

Deliberately plain: logits in the input dtype (a bf16 model gives bf16 logits), upcast to fp32 before the
log-softmax (what HF/TRL-style code does for stability), gather the sampled token, teacher under ``no_grad``.
Shapes: hidden ``(N, d)``, weight ``(V, d)``, t_hidden ``(N, d_t)``, t_weight ``(V, d_t)``, targets ``(B, T)``
int64 with ``N = B*T``, mask ``(B, T)`` bool, advantages ``(B,)``. Each function returns a scalar loss; the
benchmark calls ``.backward()`` on it.
"""
from __future__ import annotations

import torch


def token_logprobs(hidden, weight, targets, upcast=torch.float32):
    """Log-prob of each target token, ``(N,)`` in ``upcast`` (float32), through full logits."""
    logits = hidden @ weight.T
    logprobs = torch.log_softmax(logits.to(upcast), dim=-1)
    return logprobs.gather(-1, targets.reshape(-1, 1)).squeeze(-1)


def clipped_pg(logp, old_logp, advantages, eps_low, eps_high):
    """Per-token clipped surrogate ``-min(r*A, clip(r)*A)``, logp/old_logp ``(B, T)``, advantages ``(B,)``."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    return -torch.minimum(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)


def token_mean(per_token, mask):
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


def kdrl_loss(hidden, weight, t_hidden, t_weight, targets, mask, advantages, beta=0.02, eps_low=0.2, eps_high=0.2,
              upcast=torch.float32):
    """KDRL (on-policy): token-mean of ``clipped GRPO surrogate + beta * 0.5 * (t - s)**2``."""
    s = token_logprobs(hidden, weight, targets, upcast).view_as(mask)
    with torch.no_grad():
        t = token_logprobs(t_hidden, t_weight, targets, upcast).view_as(mask)
    k2 = 0.5 * (t - s) ** 2
    return token_mean(clipped_pg(s, s.detach(), advantages, eps_low, eps_high) + beta * k2, mask)


def grpo_loss(hidden, weight, targets, mask, advantages, eps_low=0.2, eps_high=0.2, upcast=torch.float32):
    """GRPO alone (on-policy): token-mean of the clipped surrogate."""
    s = token_logprobs(hidden, weight, targets, upcast).view_as(mask)
    return token_mean(clipped_pg(s, s.detach(), advantages, eps_low, eps_high), mask)


def reverse_kl_loss(hidden, weight, t_hidden, t_weight, mask, upcast=torch.float32):
    """Exact reverse KL(student || teacher) over the vocabulary, token mean over the mask."""
    logp = torch.log_softmax((hidden @ weight.T).to(upcast), dim=-1)
    with torch.no_grad():
        logq = torch.log_softmax((t_hidden @ t_weight.T).to(upcast), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return token_mean(kl.view_as(mask), mask)


def reference_loss(inp, workload) -> float:
    """The workload's loss in float64 throughout (inputs upcast, float64 logits), no gradients: the yardstick for
    the ``loss err`` column. ``inp`` is a :class:`bench.workloads.Inputs`."""
    d = (lambda x: None if x is None else x.detach().double())
    with torch.no_grad():
        if workload == "kdrl":
            return float(kdrl_loss(d(inp.hidden), d(inp.weight), d(inp.t_hidden), d(inp.t_weight), inp.targets,
                                   inp.mask, inp.advantages.double(), inp.beta, inp.eps_low, inp.eps_high,
                                   torch.float64))
        if workload == "grpo":
            return float(grpo_loss(d(inp.hidden), d(inp.weight), inp.targets, inp.mask, inp.advantages.double(),
                                   inp.eps_low, inp.eps_high, torch.float64))
        return float(reverse_kl_loss(d(inp.hidden), d(inp.weight), d(inp.t_hidden), d(inp.t_weight), inp.mask,
                                     torch.float64))
