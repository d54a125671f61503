"""Full-logits reference implementations: the specification every fast path is tested against.

These materialise the ``(N, V)`` logits on purpose. With ``dtype=torch.float64`` (the default) they are the
ground truth of the tests; with ``dtype=None`` they compute in the input dtype, which is what a user who writes
the loss by hand gets (the "naive PyTorch" provider of the benchmarks and the ``torch_lowprec`` term of the
tolerance rule ``|ours - gt| <= |torch_lowprec - gt| + tol``).
"""
from __future__ import annotations

import torch

__all__ = ["reference_logits", "reference_logprobs", "reference_kl", "divergence_from_logprobs"]


def reference_logits(hidden, weight, bias=None, temperature=1.0, dtype=torch.float64):
    """``(hidden @ weight.T + bias) / temperature`` as a full ``(N, V)`` tensor.

    hidden ``(N, d)``, weight ``(V, d)``, bias ``(V,)`` or None. ``dtype=None`` keeps the input dtype.
    """
    if dtype is not None:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return logits / temperature


def reference_logprobs(hidden, weight, targets, bias=None, temperature=1.0, ignore_index=-100,
                       dtype=torch.float64):
    """Log-prob of ``targets``, entropy and logsumexp per token, from full logits.

    Returns ``(logp, entropy, lse)``, each ``(N,)`` in the compute dtype, 0 at rows whose target is
    ``ignore_index``. Differentiable (gradients flow back to the original tensors through the casts).
    """
    logits = reference_logits(hidden, weight, bias, temperature, dtype)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    logprobs = torch.log_softmax(logits, dim=-1)
    logp = logprobs.gather(-1, safe_targets[:, None]).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    lse = torch.logsumexp(logits, dim=-1)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero), torch.where(valid, lse, zero)


def divergence_from_logprobs(student_logprobs, teacher_logprobs, kind="reverse", beta=0.5):
    """Per-row divergence between two ``(N, V)`` log-prob tensors (student ``p``, teacher ``q``).

    ``reverse``: KL(p || q); ``forward``: KL(q || p); ``jsd``: with ``m = beta*q + (1-beta)*p``,
    ``beta * KL(q || m) + (1 - beta) * KL(p || m)``. Returns ``(N,)``.
    """
    logp, logq = student_logprobs, teacher_logprobs
    if kind == "reverse":
        return (logp.exp() * (logp - logq)).sum(-1)
    if kind == "forward":
        return (logq.exp() * (logq - logp)).sum(-1)
    if kind == "jsd":
        logm = torch.logsumexp(torch.stack([logq + torch.log(torch.tensor(beta, dtype=logq.dtype)),
                                            logp + torch.log1p(torch.tensor(-beta, dtype=logp.dtype))]), dim=0)
        kl_qm = (logq.exp() * (logq - logm)).sum(-1)
        kl_pm = (logp.exp() * (logp - logm)).sum(-1)
        return beta * kl_qm + (1 - beta) * kl_pm
    raise ValueError(f"kind must be 'reverse', 'forward' or 'jsd', got {kind!r}")


def reference_kl(s_hidden, s_weight, t_hidden, t_weight, *, kind="reverse", beta=0.5, temperature=1.0,
                 mask=None, s_bias=None, t_bias=None, dtype=torch.float64):
    """Exact full-vocabulary divergence per token from full student and teacher logits.

    s_hidden ``(N, d)``, s_weight ``(V, d)``, t_hidden ``(N, d_t)``, t_weight ``(V, d_t)``; mask ``(N,)`` bool.
    The teacher side is detached (no gradient), as in every distillation objective here. Returns ``(N,)``,
    0 where ``mask`` is False.
    """
    logp = torch.log_softmax(reference_logits(s_hidden, s_weight, s_bias, temperature, dtype), dim=-1)
    with torch.no_grad():
        logq = torch.log_softmax(reference_logits(t_hidden, t_weight, t_bias, temperature, dtype), dim=-1)
    kl = divergence_from_logprobs(logp, logq, kind, beta)
    if mask is not None:
        kl = torch.where(mask, kl, torch.zeros_like(kl))
    return kl
