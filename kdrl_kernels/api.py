"""Public ops: validate, pick the backend, call the autograd Function."""
from __future__ import annotations

from . import validation as V
from .backend import resolve_backend
from .ops import KLParams, LinearKL, LinearLogprobs, LogprobParams

__all__ = ["fused_linear_logprobs", "fused_linear_kl"]

KL_KINDS = ("reverse", "forward", "jsd")


def fused_linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                          backend="auto", return_entropy=False, return_lse=False, chunk_size=None,
                          check_finite=True):
    """Log-probability of each target token under ``softmax((hidden @ weight.T + bias) / temperature)``.

    Never allocates an ``(N, V)`` tensor: logits live one chunk (CPU) or one on-chip tile (Triton) at a time.

    Args:
        hidden: ``(N, d)`` float32/bfloat16/float16 final hidden states (``(..., d)`` is flattened).
        weight: ``(V, d)`` lm_head weight, same dtype family and device.
        targets: ``(N,)`` (or hidden's leading shape) int64/int32 token ids (int32 is converted to int64) in ``[0, V)``, or ``ignore_index`` for rows to skip.
        bias: optional ``(V,)``.
        temperature: > 0, applied to the logits in fp32.
        backend: ``"auto"`` (Triton on CUDA, PyTorch elsewhere), ``"torch"`` or ``"triton"``.
        return_entropy, return_lse: also return the per-token entropy (differentiable) and logsumexp.
        chunk_size: rows per chunk on the PyTorch path (default: about 160 MB of fp32 logits).
        check_finite: refuse NaN/inf inputs; checked on the (N,) outputs, then the inputs are scanned to name the
            culprit, so the check costs O(N) when all is well.

    Returns:
        ``logp`` ``(N,)`` float32 (0 at ignored rows), or a tuple ``(logp, entropy?, lse?)`` in that order with the
        optional entries present when asked. Differentiable w.r.t. hidden, weight and bias.
    """
    V.check_tensor("hidden", hidden)
    V.check_tensor("targets", targets)
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be (N, d) or (..., d), got shape {tuple(hidden.shape)}")
    lead_shape = hidden.shape[:-1]
    if tuple(targets.shape) != tuple(lead_shape):
        raise ValueError(f"targets must have shape {tuple(lead_shape)} (hidden's leading dims), "
                         f"got {tuple(targets.shape)}")
    if hidden.dim() > 2:
        hidden = hidden.reshape(-1, hidden.shape[-1])
        targets = targets.reshape(-1)
    V.check_matrix("hidden", hidden)
    V.check_matrix("weight", weight, cols=hidden.shape[1], min_rows=1)
    V.check_same_dtype("hidden", hidden, "weight", weight)
    V.check_vector("targets", targets, hidden.shape[0], dtype_kind="int")
    if bias is not None:
        V.check_vector("bias", bias, weight.shape[0])
    V.check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    V.check_temperature(temperature)
    V.check_int("ignore_index", ignore_index)
    V.check_chunk_size(chunk_size)
    for name, flag in (("return_entropy", return_entropy), ("return_lse", return_lse),
                       ("check_finite", check_finite)):
        V.check_bool(name, flag)
    V.check_targets(targets, weight.shape[0], ignore_index)
    params = LogprobParams(float(temperature), int(ignore_index), resolve_backend(backend, hidden.device),
                           chunk_size, need_entropy=return_entropy)
    logp, entropy, lse = LinearLogprobs.apply(hidden.contiguous(), weight.contiguous(),
                                              None if bias is None else bias.contiguous(),
                                              targets.long().contiguous(), params)
    if check_finite:
        V.check_outputs_finite((logp, lse), hidden=hidden, weight=weight, bias=bias)
    outs = [t.reshape(lead_shape) for t in (logp, entropy, lse)]
    if not (return_entropy or return_lse):
        return outs[0]
    return tuple(o for o, keep in zip(outs, (True, return_entropy, return_lse)) if keep)


def fused_linear_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, *, kind="reverse", beta=0.5,
                    temperature=1.0, mask=None, backend="auto", student_bias=None, teacher_bias=None,
                    truncate_teacher_vocab=False, chunk_size=None, check_finite=True):
    """Exact full-vocabulary divergence between student and teacher next-token distributions, per token.

    Student and teacher logits are formed tile by tile from hidden states; neither ``(N, V)`` tensor exists.

    Args:
        student_hidden: ``(N, d)``; student_weight: ``(V, d)``.
        teacher_hidden: ``(N, d_t)`` (``d_t`` may differ from ``d``); teacher_weight: ``(V, d_t)``, or ``(V_t, d_t)``
            with ``V_t > V`` padding rows when ``truncate_teacher_vocab=True``.
        kind: ``"reverse"`` KL(student || teacher), ``"forward"`` KL(teacher || student), or ``"jsd"``: generalised
            JSD with ``m = beta * teacher + (1 - beta) * student`` (GKD's convention), ``0 < beta < 1``.
        mask: optional ``(N,)`` bool (or integer 0/1); rows where it is False give 0 and no gradient.
    Returns:
        ``(N,)`` float32, differentiable w.r.t. the student's hidden, weight and bias only.
    """
    for name, x in (("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden)):
        V.check_tensor(name, x)
        if x.dim() < 2:
            raise ValueError(f"{name} must be (N, d) or (..., d), got shape {tuple(x.shape)}")
    lead_shape = student_hidden.shape[:-1]
    if max(student_hidden.dim(), teacher_hidden.dim()) > 2 and tuple(teacher_hidden.shape[:-1]) != tuple(lead_shape):
        raise ValueError(f"teacher_hidden must have the leading shape of student_hidden, {tuple(lead_shape)} + (d_t,),"
                         f" got {tuple(teacher_hidden.shape)}")
    if mask is not None:
        mask = V.check_mask("mask", mask, lead_shape)
    if student_hidden.dim() > 2:
        student_hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
        teacher_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        mask = mask.reshape(-1) if mask is not None else None
    V.check_choice("kind", kind, KL_KINDS)
    V.check_number("beta", beta)
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1) for kind='jsd', got {beta}")
    V.check_matrix("student_hidden", student_hidden)
    V.check_matrix("student_weight", student_weight, cols=student_hidden.shape[1], min_rows=1)
    V.check_matrix("teacher_hidden", teacher_hidden, rows=student_hidden.shape[0])
    V.check_matrix("teacher_weight", teacher_weight, cols=teacher_hidden.shape[1], min_rows=1)
    V.check_same_dtype("student_hidden", student_hidden, "student_weight", student_weight)
    V.check_same_dtype("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight)
    for name, b, w in (("student_bias", student_bias, student_weight), ("teacher_bias", teacher_bias, teacher_weight)):
        if b is not None:
            V.check_vector(name, b, w.shape[0])
    V.check_chunk_size(chunk_size)
    V.check_bool("truncate_teacher_vocab", truncate_teacher_vocab)
    V.check_bool("check_finite", check_finite)
    V.check_same_device(student_hidden=student_hidden, student_weight=student_weight, teacher_hidden=teacher_hidden,
                        teacher_weight=teacher_weight, mask=mask, student_bias=student_bias, teacher_bias=teacher_bias)
    V.check_temperature(temperature)
    teacher_weight, teacher_bias = V.match_teacher_vocab(student_weight, teacher_weight, truncate_teacher_vocab,
                                                         teacher_bias)
    params = KLParams(kind, float(beta), float(temperature), resolve_backend(backend, student_hidden.device),
                      chunk_size)
    detach = (lambda t: None if t is None else t.detach().contiguous())
    kl = LinearKL.apply(student_hidden.contiguous(), student_weight.contiguous(),
                        None if student_bias is None else student_bias.contiguous(),
                        detach(teacher_hidden), detach(teacher_weight), detach(teacher_bias),
                        None if mask is None else mask.contiguous(), params)
    if check_finite:
        V.check_outputs_finite((kl,), student_hidden=student_hidden, student_weight=student_weight,
                               teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                               student_bias=student_bias, teacher_bias=teacher_bias)
    return kl.reshape(lead_shape)
