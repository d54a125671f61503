"""The PyTorch backend: token-chunked, fp32 logits, never an ``(N, V)`` tensor.

Implements the backend contract of docs/DESIGN.md (``logprobs_forward/backward``, ``kl_forward/backward``).
Rows are processed ``chunk_size`` at a time against the whole vocabulary. Ignored rows are dropped before any
matmul (prompt and padding tokens cost no FLOPs) and get zeros in every output.

Speed on CPU comes from two habits: every vocabulary-sized buffer lives in a :class:`Workspace` allocated once per
call and reused by every chunk (a fresh 150 MB tensor per chunk is returned to the OS on free and costs ~40k page
faults the next time), and every elementwise step runs in place or with ``out=``, so one chunk costs a handful of
passes over its buffers besides the matmuls.

Precision: logits are always normalised in fp32 and never rounded to a low-precision dtype. Each lm_head is a
:class:`~kdrl_kernels.heads.Head`: fp32 matmuls for fp32/fp16 weights; for bf16 weights one GEMM with bf16 inputs
and an fp32 output (oneDNN's bf16 fpmath mode, on CPUs with AMX) or two compensated bf16 GEMMs (about 16 mantissa
bits) plus an exact target logit elsewhere. The gradient matmuls take dz in
bf16 for bf16 weights (as bf16 autograd does); dW is accumulated across chunks in fp32, or for bf16 weights
by the GEMMs themselves into the bf16 gradient with an fp32 fold every few chunks (:class:`_Accumulator`).
"""
from __future__ import annotations

import torch

from .heads import Head, add_bf16_, bf16_gemms


def _warm_vector_math():
    """Run exp and log once on a tensor too small to be split across threads, at import.

    CPU torch hands large elementwise exp/log to MKL's vector math, which picks its implementation on first use.
    When that first use is a call split across two OpenMP threads on a busy machine, one thread sometimes ran a
    less accurate exp for its half of the tensor: measured on a 2-core Xeon (AMX) with torch 2.13.0+cpu, the first
    chunk's ``p = exp(log p)`` had relative errors of 1.5e-4 (6e-8 normally) in about one fresh process in four
    started beside a busy one, moving the benchmark's exact-KL loss by 1.5e-5. With this single-threaded first use,
    0 of 16 such starts went wrong.
    """
    probe = torch.zeros(8)
    torch.exp(probe)
    torch.log(probe.add_(1.0))


_warm_vector_math()

__all__ = ["logprobs_forward", "logprobs_backward", "kl_forward", "kl_backward", "default_chunk_size",
           "Workspace", "log_softmax_", "normalise_", "rowdot"]

# Budget for all chunk-sized buffers of one call. Large problems: a fixed budget (memory flat in N), deep enough
# that the per-chunk read-modify-write of the (V, d) fp32 weight gradient stays a small part of the step (measured on
# the Qwen KDRL step, N = 2048, 2 threads: 263 rows took 1.11x the time of 526 rows, 421 rows 1.03x). Small
# problems: at least _MIN_CHUNKS chunks (of >= _MIN_ROWS rows), so the workspace stays a fraction of the (N, V)
# logits that a naive loss holds.
_WORKSPACE_BYTES = 384 * 2**20
_MIN_CHUNKS, _MIN_ROWS = 4, 64


def default_chunk_size(vocab: int, n_rows: int, n_buffers: int = 2) -> int:
    """Rows per chunk: ``n_buffers`` fp32 ``(rows, vocab)`` buffers within the budget, and at least
    ``_MIN_CHUNKS`` chunks when that leaves ``_MIN_ROWS`` rows each (16..4096 rows)."""
    rows = _WORKSPACE_BYTES // (4 * n_buffers * max(vocab, 1))
    rows = min(rows, max(_MIN_ROWS, -(-n_rows // _MIN_CHUNKS)))
    return max(1, min(max(16, min(4096, rows)), n_rows))


class Workspace:
    """Named ``(rows, vocab)`` buffers (fp32 unless asked) allocated on first use and reused by every chunk."""

    def __init__(self, rows, vocab, device):
        self.rows, self.vocab, self.device = rows, vocab, device
        self._buffers = {}

    def take(self, name, n_rows, dtype=torch.float32):
        buf = self._buffers.get(name)
        if buf is None:
            buf = self._buffers[name] = torch.empty(self.rows, self.vocab, dtype=dtype, device=self.device)
        return buf[:n_rows]

    def scratch(self, name, shape, dtype):
        """A small named buffer of ``shape`` (not vocabulary-sized), allocated once per call."""
        buf = self._buffers.get(name)
        if buf is None:
            buf = self._buffers[name] = torch.empty(shape, dtype=dtype, device=self.device)
        return buf


def log_softmax_(z):
    """Normalise fp32 logits ``z`` ``(c, V)`` into log-probs IN PLACE with torch's fused kernel (3 passes).

    The logsumexp is then ``z_before[:, j] - z_after[:, j]`` for any column ``j``; callers read it off the target.
    """
    return torch._log_softmax(z, 1, False, out=z)


def normalise_(z, cols):
    """In-place log-softmax of ``z`` ``(c, V)``; returns ``(lse, logp[cols])`` with ``cols`` ``(c,)`` int64."""
    before = z.gather(1, cols[:, None]).squeeze(1)
    log_softmax_(z)
    after = z.gather(1, cols[:, None]).squeeze(1)
    return before - after, after


def rowdot(a, b, slab=8192):
    """Row-wise dot product of two ``(c, V)`` tensors, ``(c,)``.

    Slab by slab with torch's cascade summation: a BLAS dot (bmm) sums 152k terms sequentially and loses ~1e-4
    relative accuracy, and one ``(c, V)`` product would be another vocabulary-sized buffer.
    """
    out = torch.zeros(a.shape[0], dtype=torch.float32, device=a.device)
    for v0 in range(0, a.shape[1], slab):
        out += (a[:, v0:v0 + slab] * b[:, v0:v0 + slab]).sum(1)
    return out


def _rows(targets, ignore_index):
    return (targets != ignore_index).nonzero().squeeze(1)


def logprobs_forward(hidden, weight, bias, targets, *, temperature=1.0, ignore_index=-100, chunk_size=None,
                     need_entropy=True):
    """Log-prob of each target, logsumexp and entropy. hidden ``(N, d)``, weight ``(V, d)``, targets ``(N,)``.

    Returns ``(logp, lse, entropy)``, each ``(N,)`` float32, zero at ignored rows (entropy zero everywhere when
    ``need_entropy`` is False).
    """
    rows = _rows(targets, ignore_index)
    out = torch.zeros(3, hidden.shape[0], dtype=torch.float32, device=hidden.device)
    head = Head(weight, bias, temperature)
    chunk = chunk_size or default_chunk_size(weight.shape[0], max(rows.numel(), 1), 2 + head.scratch_buffers)
    ws = Workspace(chunk, weight.shape[0], hidden.device)
    for start in range(0, rows.numel(), chunk):
        idx = rows[start:start + chunk]
        logp = head.logits(ws, hidden[idx], ws.take("z", idx.numel()), targets[idx])
        out[1, idx], out[0, idx] = normalise_(logp, targets[idx])
        if need_entropy:
            out[2, idx] = -rowdot(torch.exp(logp, out=ws.take("p", idx.numel())), logp)
    return out[0], out[1], out[2]


def grad_buffers(hidden, weight, bias, needs):
    """Gradient outputs: hidden's in its dtype, weight's as a :class:`_Accumulator`, bias's fp32 (None if unneeded).

    All zeroed except the weight's (V x d), which the first chunk overwrites instead: a fill of that size is a
    pass as long as a dW update. :func:`finish_grads` zeroes it if no chunk ran.
    """
    need_h, need_w, need_b = needs
    grad_hidden = torch.zeros_like(hidden) if need_h else None
    grad_weight32 = _Accumulator(weight) if need_w else None
    grad_bias32 = (torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
                   if need_b and bias is not None else None)
    return grad_hidden, grad_weight32, grad_bias32


class _Accumulator:
    """dW ``(V, d)`` summed over chunks by GEMMs that add into it; the first chunk writes instead (no zero fill).

    fp32 and fp16 weights: an fp32 matrix, fp32 products. bf16 weights (every bf16 head method): the bf16
    gradient itself. ``addmm_`` adds each chunk's ``dz^T h`` to it inside the GEMM's fp32 accumulator and rounds
    once, so a chunk costs one pass over dW instead of a bf16 product, a conversion and a read-modify-write of an
    fp32 copy (1.6 GB of traffic per chunk at Qwen shapes), and no fp32 copy of dW exists. Rounding once per chunk
    grows the error like sqrt(chunks), so after :data:`FOLD` chunks the sum is folded into an fp32 master (allocated
    only then) and the bf16 sum restarts: at most FOLD roundings stack, the same class as naive bf16 autograd's one.
    """
    FOLD = 8

    def __init__(self, weight):
        self.low = bf16_gemms(weight)
        dtype = weight.dtype if self.low else torch.float32
        self.value = torch.empty(weight.shape, dtype=dtype, device=weight.device)
        self.master = None
        self.started, self.pending = False, 0

    def add_product(self, a, b):
        """``value += a @ b`` for ``a``, ``b`` in the accumulator's dtype (bf16 or fp32)."""
        if self.started:
            self.value.addmm_(a, b)
        else:
            torch.mm(a, b, out=self.value)
            self.started = True
        if self.low:
            self.pending += 1
            if self.pending == self.FOLD:
                self._fold()

    def _fold(self):
        if self.master is None:
            self.master = self.value.float()
        else:
            add_bf16_(self.master, self.value, torch.empty(8, self.value.shape[1], device=self.value.device))
        self.started, self.pending = False, 0

    def result(self):
        """The sum, bf16 in the low-precision mode (written into ``value``), else fp32; zeros if nothing was added."""
        if self.master is None:
            return self.value if self.started else self.value.zero_()
        if self.started:
            self._fold()
        return self.value.copy_(self.master) if self.low else self.master


def finish_grads(weight, bias, grad_hidden, grad_weight32, grad_bias32):
    grad_weight = grad_weight32.result().to(weight.dtype) if grad_weight32 is not None else None
    grad_bias = grad_bias32.to(bias.dtype) if grad_bias32 is not None else None
    return grad_hidden, grad_weight, grad_bias


def logprobs_backward(hidden, weight, bias, targets, lse, grad_logp, grad_entropy, entropy, *, temperature=1.0,
                      ignore_index=-100, chunk_size=None, needs=(True, True, True)):
    """Gradients of ``sum(grad_logp * logp + grad_entropy * entropy)`` by recomputing each chunk's logits.

    ``d logp / dz = onehot - p``; ``d H / dz = -p * (log p + H)``; both divided by the temperature.
    Returns ``(grad_hidden, grad_weight, grad_bias)`` in the dtypes of the inputs (None where not needed).
    """
    rows = _rows(targets, ignore_index)
    grads = grad_buffers(hidden, weight, bias, needs)
    head = Head(weight, bias, temperature)
    chunk = chunk_size or default_chunk_size(weight.shape[0], max(rows.numel(), 1), 2 + head.scratch_buffers)
    ws = Workspace(chunk, weight.shape[0], hidden.device)
    for start in range(0, rows.numel(), chunk):
        idx = rows[start:start + chunk]
        h = hidden[idx]
        logp = log_softmax_(head.logits(ws, h, ws.take("z", idx.numel()), targets[idx]))
        g = grad_logp[idx].float()[:, None]
        if grad_entropy is not None:
            # dH/dz = -p * (log p + H), with H from the forward pass; built in the log-prob buffer.
            p = torch.exp(logp, out=ws.take("p", idx.numel()))
            ent_term = logp.add_(entropy[idx][:, None]).mul_(p).mul_(-grad_entropy[idx].float()[:, None])
            dz = p.mul_(-g).add_(ent_term)
        else:
            dz = logp.exp_().mul_(-g)  # one buffer: p overwrites log p
        dz.scatter_add_(1, targets[idx][:, None], g)
        if temperature != 1.0:
            dz /= temperature
        head.backprop(ws, dz, h, idx, *grads)
    return finish_grads(weight, bias, *grads)


def divergence_(logp, logq, p, q, kind, beta, need_grad):
    """Per-row divergence from a chunk's student and teacher log-probs and probabilities ``(c, V)``.

    Overwrites ``logq`` (and ``q`` for jsd) with scratch. Returns ``(kl, dkl_dz)`` where ``dkl_dz`` ``(c, V)`` is the
    gradient of each row's divergence w.r.t. the student logits (in ``logq``'s buffer; None unless ``need_grad``).
    """
    if kind == "reverse":
        diff = logq.neg_().add_(logp)  # log p - log q
        kl = rowdot(p, diff)
        return kl, (diff.sub_(kl[:, None]).mul_(p) if need_grad else None)
    if kind == "forward":
        kl = rowdot(q, logq.sub_(logp))
        return kl, (torch.sub(p, q, out=logq) if need_grad else None)
    if kind == "jsd":
        kl_q = rowdot(q, logq)   # sum q log q, before the buffers are reused
        m = q.mul_(beta).add_(p, alpha=1.0 - beta)
        logm = m.log_()
        kl_pm = rowdot(p, logp) - rowdot(p, logm)
        kl = beta * (kl_q - rowdot(torch.exp(logq, out=logq), logm)) + (1.0 - beta) * kl_pm
        if not need_grad:
            return kl, None
        # dJSD/dz = (1 - beta) * p * (log p - log m - KL(p || m))
        grad = torch.sub(logp, logm, out=logq).sub_(kl_pm[:, None]).mul_(p).mul_(1.0 - beta)
        return kl, grad
    raise ValueError(f"kind must be 'reverse', 'forward' or 'jsd', got {kind!r}")


def _kl_chunks(s_hidden, s_weight, t_weight, mask, chunk_size, heads):
    rows = (mask.nonzero().squeeze(1) if mask is not None
            else torch.arange(s_hidden.shape[0], device=s_hidden.device))
    scratch = max(head.scratch_buffers for head in heads)  # the two heads take turns with the bf16 scratch
    chunk = chunk_size or default_chunk_size(s_weight.shape[0], max(rows.numel(), 1), 4 + scratch)  # zs zt p q
    return rows, chunk, Workspace(chunk, s_weight.shape[0], s_hidden.device)


def _kl_chunk(ws, idx, s_hidden, student, t_hidden, teacher, kind, beta, need_grad):
    n = idx.numel()
    first = torch.zeros(n, dtype=torch.long, device=idx.device)  # any column recovers the logsumexp
    logp = student.logits(ws, s_hidden[idx], ws.take("zs", n))
    logq = teacher.logits(ws, t_hidden[idx], ws.take("zt", n))
    s_lse, _ = normalise_(logp, first)
    t_lse, _ = normalise_(logq, first)
    p = torch.exp(logp, out=ws.take("p", n))
    q = torch.exp(logq, out=ws.take("q", n)) if kind != "reverse" else None
    kl, grad = divergence_(logp, logq, p, q, kind, beta, need_grad)
    return kl, s_lse, t_lse, grad


def kl_forward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, mask, *, kind="reverse", beta=0.5,
               temperature=1.0, chunk_size=None):
    """Exact full-vocabulary divergence per token. Returns ``(kl, s_lse, t_lse)``, each ``(N,)`` float32."""
    student, teacher = Head(s_weight, s_bias, temperature), Head(t_weight, t_bias, temperature)
    rows, chunk, ws = _kl_chunks(s_hidden, s_weight, t_weight, mask, chunk_size, (student, teacher))
    out = torch.zeros(3, s_hidden.shape[0], dtype=torch.float32, device=s_hidden.device)
    for start in range(0, rows.numel(), chunk):
        idx = rows[start:start + chunk]
        kl, s_lse, t_lse, _ = _kl_chunk(ws, idx, s_hidden, student, t_hidden, teacher, kind, beta, False)
        out[0, idx], out[1, idx], out[2, idx] = kl, s_lse, t_lse
    return out[0], out[1], out[2]


def kl_backward(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, mask, s_lse, t_lse, kl, grad_kl, *,
                kind="reverse", beta=0.5, temperature=1.0, chunk_size=None, needs=(True, True, True)):
    """Student gradients of ``sum(grad_kl * kl)`` by recomputing both models' logits chunk by chunk."""
    student, teacher = Head(s_weight, s_bias, temperature), Head(t_weight, t_bias, temperature)
    rows, chunk, ws = _kl_chunks(s_hidden, s_weight, t_weight, mask, chunk_size, (student, teacher))
    grads = grad_buffers(s_hidden, s_weight, s_bias, needs)
    for start in range(0, rows.numel(), chunk):
        idx = rows[start:start + chunk]
        _, _, _, dz = _kl_chunk(ws, idx, s_hidden, student, t_hidden, teacher, kind, beta, True)
        dz *= grad_kl[idx].float()[:, None] / temperature
        student.backprop(ws, dz, s_hidden[idx], idx, *grads)
    return finish_grads(s_weight, s_bias, *grads)
