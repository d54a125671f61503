"""The PyTorch backend: token-chunked, fp32 logits, never an ``(N, V)`` tensor.

Implements the backend contract of docs/DESIGN.md (``logprobs_forward/backward``, ``kl_forward/backward``).
Rows are processed ``chunk_size`` at a time against the whole vocabulary, so one chunk's logits are the only
vocabulary-sized buffer alive. Ignored rows are dropped before any matmul (prompt and padding tokens cost no
FLOPs) and get zeros in every output.

Precision: logits are always computed and normalised in fp32. bf16 inputs are upcast for the forward matmul
because rounding logits to bf16 costs 1e-2..1e-1 in log-prob (the bug behind Liger #1432), and CPU torch has no
bf16 x bf16 -> fp32 matmul. The backward matmuls reuse that fp32 weight copy, so gradients are rounded to the
input dtype once, at the end; dW is accumulated across chunks in fp32. The price is speed: bf16 runs at fp32
matmul speed on CPU (GPUs get bf16 tensor cores with fp32 accumulation in the Triton kernels).
"""
from __future__ import annotations

import torch

__all__ = ["logprobs_forward", "logprobs_backward", "kl_forward", "kl_backward", "default_chunk_size",
           "chunk_logits", "softmax_stats", "divergence_and_grad"]

# One chunk's fp32 logits take chunk * V * 4 bytes; 256 rows of a 152k vocabulary is 156 MB, and a 256-deep
# matmul keeps the dW update (a V x d read-modify-write per chunk) compute-bound.
_CHUNK_BYTES = 160 * 2**20


def default_chunk_size(vocab: int, n_rows: int) -> int:
    """Rows per chunk: about 160 MB of fp32 logits, between 32 and 4096 rows, never more than needed."""
    rows = max(32, min(4096, _CHUNK_BYTES // (4 * max(vocab, 1))))
    return max(1, min(rows, n_rows))


def as_fp32(x):
    return None if x is None else x.float()


def chunk_logits(h, w32, b32, temperature, out=None):
    """fp32 logits ``(h @ w32.T + b32) / temperature`` for one chunk: h ``(c, d)``, w32 ``(V, d)`` float32."""
    logits = torch.matmul(h.float(), w32.T, out=out)
    if b32 is not None:
        logits += b32
    if temperature != 1.0:
        logits /= temperature
    return logits


def softmax_stats(logits, targets=None, need_logp=False):
    """Turn a chunk of fp32 logits into probabilities IN PLACE and return per-row statistics.

    logits ``(c, V)`` float32 (overwritten with ``p``); targets ``(c,)`` int64 or None.
    Returns ``(p, lse, target_logit, entropy, logp)``; ``entropy`` and the ``(c, V)`` log-probs ``logp`` are
    computed only when ``need_logp`` (the entropy and its gradient need them), else None.
    """
    target_logit = logits.gather(1, targets[:, None]).squeeze(1) if targets is not None else None
    row_max = logits.amax(dim=1, keepdim=True)
    logits -= row_max
    logp = logits.clone() if need_logp else None
    p = logits.exp_()
    total = p.sum(dim=1, keepdim=True)
    p /= total
    log_total = total.log_()
    lse = (row_max + log_total).squeeze(1)
    entropy = None
    if need_logp:
        logp -= log_total
        entropy = -(p * logp).sum(dim=1)
    return p, lse, target_logit, entropy, logp


def _valid_rows(targets, ignore_index):
    valid = targets != ignore_index
    return valid.nonzero().squeeze(1), valid


def logprobs_forward(hidden, weight, bias, targets, *, temperature=1.0, ignore_index=-100, chunk_size=None,
                     need_entropy=True):
    """Log-prob of each target, logsumexp and entropy. hidden ``(N, d)``, weight ``(V, d)``, targets ``(N,)``.

    Returns ``(logp, lse, entropy)``, each ``(N,)`` float32, zero at ignored rows (entropy zero everywhere when
    ``need_entropy`` is False).
    """
    n = hidden.shape[0]
    rows, _ = _valid_rows(targets, ignore_index)
    out = torch.zeros(3, n, dtype=torch.float32, device=hidden.device)
    if rows.numel() == 0:
        return out[0], out[1], out[2]
    w32, b32 = as_fp32(weight), as_fp32(bias)
    chunk = chunk_size or default_chunk_size(weight.shape[0], rows.numel())
    for start in range(0, rows.numel(), chunk):
        idx = rows[start:start + chunk]
        z = chunk_logits(hidden[idx], w32, b32, temperature)
        _, lse, tgt, ent, _ = softmax_stats(z, targets[idx], need_entropy)
        out[0, idx] = tgt - lse
        out[1, idx] = lse
        if need_entropy:
            out[2, idx] = ent
    return out[0], out[1], out[2]


def accumulate_grads(dz, h, w32, idx, grad_hidden, grad_weight32, grad_bias32):
    """Backpropagate one chunk's fp32 logit gradient dz ``(c, V)`` through ``logits = h @ W.T + b``, in fp32."""
    if grad_hidden is not None:
        grad_hidden[idx] = (dz @ w32).to(grad_hidden.dtype)
    if grad_weight32 is not None:
        grad_weight32.addmm_(dz.T, h.float())
    if grad_bias32 is not None:
        grad_bias32 += dz.sum(0)


def grad_buffers(hidden, weight, bias, needs):
    need_h, need_w, need_b = needs
    grad_hidden = torch.zeros_like(hidden) if need_h else None
    grad_weight32 = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_bias32 = (torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
                   if need_b and bias is not None else None)
    return grad_hidden, grad_weight32, grad_bias32


def finish_grads(weight, bias, grad_hidden, grad_weight32, grad_bias32):
    grad_weight = grad_weight32.to(weight.dtype) if grad_weight32 is not None else None
    grad_bias = grad_bias32.to(bias.dtype) if grad_bias32 is not None else None
    return grad_hidden, grad_weight, grad_bias


def logprobs_backward(hidden, weight, bias, targets, lse, grad_logp, grad_entropy, entropy, *, temperature=1.0,
                      ignore_index=-100, chunk_size=None, needs=(True, True, True)):
    """Gradients of ``sum(grad_logp * logp + grad_entropy * entropy)`` by recomputing each chunk's logits.

    ``d logp / dz = onehot - p``; ``d H / dz = -p * (log p + H)``; both divided by the temperature.
    Returns ``(grad_hidden, grad_weight, grad_bias)`` in the dtypes of the inputs (None where not needed).
    """
    rows, _ = _valid_rows(targets, ignore_index)
    grads = grad_buffers(hidden, weight, bias, needs)
    if rows.numel() == 0:
        return finish_grads(weight, bias, *grads)
    w32, b32 = as_fp32(weight), as_fp32(bias)
    chunk = chunk_size or default_chunk_size(weight.shape[0], rows.numel())
    need_entropy = grad_entropy is not None
    for start in range(0, rows.numel(), chunk):
        idx = rows[start:start + chunk]
        h = hidden[idx]
        z = chunk_logits(h, w32, b32, temperature)
        p, _, _, _, logp = softmax_stats(z, None, need_entropy)
        g = grad_logp[idx].float()[:, None]
        if need_entropy:
            # dH/dz = -p * (log p + H), with H from the forward pass.
            logp += entropy[idx][:, None]
            dz = logp.mul_(p).mul_(-grad_entropy[idx].float()[:, None])
            dz -= g * p
        else:
            dz = p.mul_(-g)
        dz.scatter_add_(1, targets[idx][:, None], g)
        if temperature != 1.0:
            dz /= temperature
        accumulate_grads(dz, h, w32, idx, *grads)
    return finish_grads(weight, bias, *grads)


def divergence_and_grad(zs, zt, kind, beta, need_grad):
    """Exact divergence per row from one chunk of student and teacher fp32 logits (both overwritten).

    zs, zt ``(c, V)`` float32. Returns ``(kl, s_lse, t_lse, dkl_dzs)`` where ``dkl_dzs`` ``(c, V)`` is the gradient
    of each row's divergence w.r.t. the student logits (None unless ``need_grad``).
    """
    s_lse = torch.logsumexp(zs, dim=1)
    t_lse = torch.logsumexp(zt, dim=1)
    logp = zs.sub_(s_lse[:, None])
    logq = zt.sub_(t_lse[:, None])
    p = logp.exp()
    if kind == "reverse":
        diff = logp - logq
        kl = (p * diff).sum(1)
        grad = diff.sub_(kl[:, None]).mul_(p) if need_grad else None
    elif kind == "forward":
        q = logq.exp()
        kl = (q * (logq - logp)).sum(1)
        grad = p.sub_(q) if need_grad else None
    elif kind == "jsd":
        # log m = log(beta * q + (1 - beta) * p), stably as a two-term logsumexp.
        logm = torch.logaddexp(logq + torch.log(torch.tensor(beta)), logp + torch.log1p(torch.tensor(-beta)))
        q = logq.exp()
        kl_pm = (p * (logp - logm)).sum(1)
        kl = beta * (q * (logq - logm)).sum(1) + (1 - beta) * kl_pm
        grad = (logp - logm).sub_(kl_pm[:, None]).mul_(p).mul_(1 - beta) if need_grad else None
    else:
        raise ValueError(f"kind must be 'reverse', 'forward' or 'jsd', got {kind!r}")
    return kl, s_lse, t_lse, grad


def _kl_chunks(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, mask, chunk_size):
    rows = mask.nonzero().squeeze(1) if mask is not None else torch.arange(s_hidden.shape[0],
                                                                          device=s_hidden.device)
    chunk = chunk_size or default_chunk_size(s_weight.shape[0], max(rows.numel(), 1))
    return rows, chunk, (as_fp32(s_weight), as_fp32(s_bias), as_fp32(t_weight), as_fp32(t_bias))


def kl_forward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, mask, *, kind="reverse", beta=0.5,
               temperature=1.0, chunk_size=None):
    """Exact full-vocabulary divergence per token. Returns ``(kl, s_lse, t_lse)``, each ``(N,)`` float32."""
    rows, chunk, (sw, sb, tw, tb) = _kl_chunks(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, mask,
                                               chunk_size)
    out = torch.zeros(3, s_hidden.shape[0], dtype=torch.float32, device=s_hidden.device)
    for start in range(0, rows.numel(), chunk):
        idx = rows[start:start + chunk]
        zs = chunk_logits(s_hidden[idx], sw, sb, temperature)
        zt = chunk_logits(t_hidden[idx], tw, tb, temperature)
        kl, s_lse, t_lse, _ = divergence_and_grad(zs, zt, kind, beta, need_grad=False)
        out[0, idx], out[1, idx], out[2, idx] = kl, s_lse, t_lse
    return out[0], out[1], out[2]


def kl_backward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, mask, s_lse, t_lse, kl, grad_kl, *,
                kind="reverse", beta=0.5, temperature=1.0, chunk_size=None, needs=(True, True, True)):
    """Student gradients of ``sum(grad_kl * kl)`` by recomputing both models' logits chunk by chunk."""
    rows, chunk, (sw, sb, tw, tb) = _kl_chunks(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, mask,
                                               chunk_size)
    grads = grad_buffers(s_hidden, s_weight, s_bias, needs)
    for start in range(0, rows.numel(), chunk):
        idx = rows[start:start + chunk]
        h = s_hidden[idx]
        zs = chunk_logits(h, sw, sb, temperature)
        zt = chunk_logits(t_hidden[idx], tw, tb, temperature)
        _, _, _, dz = divergence_and_grad(zs, zt, kind, beta, need_grad=True)
        dz *= grad_kl[idx].float()[:, None] / temperature
        accumulate_grads(dz, h, sw, idx, *grads)
    return finish_grads(s_weight, s_bias, *grads)
