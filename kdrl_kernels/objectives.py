"""Per-token objectives of GRPO, KDRL and TRRD, as small pure functions.

Everything here works on per-token scalars and needs no vocabulary, so trainers built on other frameworks can
reuse it with log-probs from anywhere. Notation (see docs/objectives.md):
``s`` student log-prob of the sampled token (gets the gradient), ``t`` teacher log-prob (detached),
``old`` log-prob under the rollout policy (detached), ``A`` advantage. All tensors ``(N,)`` or ``(B, T)``, float.
"""
from __future__ import annotations

import math

import torch

from . import validation as V

__all__ = [
    "kl_estimator", "grpo_log_ratio", "trrd_log_ratio", "clipped_surrogate", "clip_mask",
    "group_advantages", "aggregation_weights", "aggregate", "beta_at", "kd_sequence_mask",
]

KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token_mean", "seq_mean", "dr_grpo")
BETA_SCHEDULES = ("constant", "linear", "cosine")
KD_MASKS = ("none", "incorrect", "group_all_wrong")


def _same_shape(**tensors):
    """Per-token tensors must be floating and of one shape (broadcasting them would pair the wrong tokens)."""
    shape = None
    for name, x in tensors.items():
        V.check_tensor(name, x)
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
        if shape is None:
            first, shape = name, tuple(x.shape)
        elif tuple(x.shape) != shape:
            raise ValueError(f"{name} must have the shape of {first}, {shape}, got {tuple(x.shape)}")


def _check_clip(eps_low, eps_high, dual_clip):
    V.check_number("eps_low", eps_low, low=0.0, high=1.0)
    V.check_number("eps_high", eps_high, low=0.0)
    V.check_number("dual_clip", dual_clip, low=1.0, low_open=True, allow_none=True)


def kl_estimator(s, t, kind="k2"):
    """Schulman's sample estimators of KL(student || teacher) on the student's own samples.

    With ``R = t - s``: k1 = ``-R``, k2 = ``R**2 / 2``, k3 = ``exp(R) - R - 1``. The gradient of k2 w.r.t. ``s``
    is ``-R``, the policy gradient of the reverse KL, which is why KDRL uses it as a loss.
    """
    V.check_choice("kind", kind, KL_ESTIMATORS)
    _same_shape(s=s, t=t)
    r = t - s
    if kind == "k1":
        return -r
    if kind == "k2":
        return 0.5 * r * r
    if kind == "k3":
        return torch.expm1(r) - r
    raise ValueError(f"kind must be one of {KL_ESTIMATORS}, got {kind!r}")


def grpo_log_ratio(s, old):
    """``log(pi_theta / pi_old)`` per token."""
    _same_shape(s=s, old=old)
    return s - old


def trrd_log_ratio(s, old, t, alpha=0.5, clamp=1.0):
    """TRRD's log-ratio against the geometric mixture ``pi_old**alpha * pi_T**(1-alpha)``.

    ``alpha * (s - old) + (1 - alpha) * clip(s - t, -clamp, clamp)``; ``alpha = 1`` recovers GRPO.
    ``clamp=None`` disables the clamp of the teacher log-ratio.
    """
    V.check_number("alpha", alpha, low=0.0, high=1.0)
    V.check_number("clamp", clamp, low=0.0, low_open=True, allow_none=True)
    _same_shape(s=s, old=old, t=t)
    teacher_term = s - t
    if clamp is not None:
        teacher_term = teacher_term.clamp(-clamp, clamp)
    return alpha * (s - old) + (1.0 - alpha) * teacher_term


def clipped_surrogate(log_ratio, advantages, eps_low=0.2, eps_high=0.2, dual_clip=None):
    """Per-token PPO/GRPO loss ``-min(r*A, clip(r, 1-eps_low, 1+eps_high)*A)``, optionally dual-clipped.

    ``dual_clip = c`` (> 1) bounds the loss of negative-advantage tokens by ``-c*A`` (Ye et al. 2020),
    so a huge ratio on a bad token cannot blow the update up. Returns the per-token loss, same shape.
    """
    _same_shape(log_ratio=log_ratio, advantages=advantages)
    _check_clip(eps_low, eps_high, dual_clip)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -dual_clip * advantages), loss)
    return loss


def clip_mask(log_ratio, advantages, eps_low=0.2, eps_high=0.2, dual_clip=None):
    """Boolean mask of tokens whose surrogate gradient is cut by clipping (what "clip fraction" counts)."""
    _same_shape(log_ratio=log_ratio, advantages=advantages)
    _check_clip(eps_low, eps_high, dual_clip)
    ratio = torch.exp(log_ratio)
    clipped = ((advantages > 0) & (ratio > 1.0 + eps_high)) | ((advantages < 0) & (ratio < 1.0 - eps_low))
    if dual_clip is not None:
        clipped = clipped | ((advantages < 0) & (ratio > dual_clip))
    return clipped


def group_advantages(rewards, group_ids, eps=1e-6, scale=True):
    """Group-normalised advantages ``(r - mean_G(r)) / (std_G(r) + eps)`` with population std.

    rewards ``(B,)`` float, group_ids ``(B,)`` int64 (responses to the same prompt share an id).
    ``scale=False`` is Dr. GRPO: no division by the std. Returns ``(B,)`` float32.
    """
    V.check_tensor("rewards", rewards)
    if rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError(f"rewards must be a (B,) floating tensor, got {rewards.dtype} of shape {tuple(rewards.shape)}")
    V.check_vector("group_ids", group_ids, rewards.shape[0], dtype_kind="int")
    V.check_number("eps", eps, low=0.0)
    V.check_bool("scale", scale)
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf")
    rewards = rewards.float()
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    count = torch.zeros(n_groups, dtype=torch.float32, device=rewards.device).index_add_(
        0, inverse, torch.ones_like(rewards))
    mean = torch.zeros_like(count).index_add_(0, inverse, rewards) / count
    centred = rewards - mean[inverse]
    if not scale:
        return centred
    var = torch.zeros_like(count).index_add_(0, inverse, centred * centred) / count
    return centred / (var.sqrt()[inverse] + eps)


def aggregation_weights(mask, mode="token_mean", max_len=None):
    """Weights ``w`` such that ``loss = sum(w * per_token_loss)`` realises the aggregation ``mode``.

    mask ``(B, T)`` bool. ``token_mean``: ``1 / sum(mask)`` (DAPO; KDRL); ``seq_mean``: ``1 / (B' * |o_i|)`` over the
    ``B'`` non-empty sequences (original GRPO); ``dr_grpo``: ``1 / (B * L_max)`` with ``L_max = max_len`` or ``T``.
    Returns ``(B, T)`` float32, zero off the mask. An all-empty mask gives all-zero weights.
    """
    V.check_tensor("mask", mask)
    if mask.dim() != 2:
        raise ValueError(f"mask must be (B, T), got shape {tuple(mask.shape)}")
    mask = V.check_mask("mask", mask, mask.shape)
    V.check_choice("mode", mode, AGGREGATIONS)
    V.check_int("max_len", max_len, low=1, allow_none=True)
    m = mask.float()
    if mode == "token_mean":
        return m / m.sum().clamp_min(1.0)
    if mode == "seq_mean":
        lengths = m.sum(-1, keepdim=True)
        n_seq = (lengths > 0).sum().clamp_min(1)
        return m / lengths.clamp_min(1.0) / n_seq
    if mode == "dr_grpo":
        return m / (mask.shape[0] * float(max_len or mask.shape[-1]))
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {mode!r}")


def aggregate(per_token, mask, mode="token_mean", max_len=None):
    """Aggregate a ``(B, T)`` per-token loss into a scalar with :func:`aggregation_weights`."""
    V.check_tensor("per_token", per_token)
    V.check_tensor("mask", mask)
    if tuple(per_token.shape) != tuple(mask.shape):
        raise ValueError(f"per_token must have the shape of mask, {tuple(mask.shape)}, got {tuple(per_token.shape)}")
    return (aggregation_weights(mask, mode, max_len).to(per_token.dtype) * per_token).sum()


def beta_at(step, beta, schedule="constant", beta_min=0.0, decay=0.0, total_steps=None):
    """The KD coefficient at optimizer step ``step``.

    ``constant``: ``beta``; ``linear``: ``max(beta - decay * step, beta_min)`` (KDRL's annealing uses
    ``beta=5e-3, decay=5e-5, beta_min=1e-3``); ``cosine``: from ``beta`` to ``beta_min`` over ``total_steps``.
    """
    V.check_choice("schedule", schedule, BETA_SCHEDULES)
    V.check_number("beta", beta, low=0.0)
    V.check_int("step", step, low=0, allow_none=True)
    if schedule == "constant" or step is None:
        return float(beta)
    V.check_number("beta_min", beta_min, low=0.0)
    V.check_number("decay", decay, low=0.0)
    if schedule == "linear":
        return max(beta - decay * step, beta_min)
    if schedule == "cosine":
        if total_steps is None:
            raise ValueError("cosine beta schedule needs total_steps > 0")
        V.check_int("total_steps", total_steps, low=1)
        progress = min(step, total_steps) / total_steps
        return beta_min + 0.5 * (beta - beta_min) * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"beta schedule must be one of {BETA_SCHEDULES}, got {schedule!r}")


def kd_sequence_mask(correct, group_ids=None, mode="none"):
    """Per-sequence weight of the KD term for reward-guided distillation.

    correct ``(B,)`` bool. ``none``: all ones; ``incorrect``: KD only on wrong responses (KDRL-mask);
    ``group_all_wrong``: KD only where every response of the group is wrong. Returns ``(B,)`` float32.
    """
    V.check_tensor("correct", correct)
    if correct.dim() != 1 or correct.dtype != torch.bool:
        raise TypeError(f"correct must be a (B,) bool tensor, got {correct.dtype} of shape {tuple(correct.shape)}")
    V.check_choice("mode", mode, KD_MASKS)
    if group_ids is not None:
        V.check_vector("group_ids", group_ids, correct.shape[0], dtype_kind="int")
    if mode == "none":
        return torch.ones(correct.shape, dtype=torch.float32, device=correct.device)
    wrong = (~correct.bool()).float()
    if mode == "incorrect":
        return wrong
    if mode == "group_all_wrong":
        if group_ids is None:
            raise ValueError("kd_mask='group_all_wrong' needs group_ids")
        _, inverse = torch.unique(group_ids, return_inverse=True)
        n_correct = torch.zeros(int(inverse.max()) + 1, device=correct.device).index_add_(
            0, inverse, correct.float())
        return (n_correct[inverse] == 0).float()
    raise ValueError(f"kd_mask must be one of {KD_MASKS}, got {mode!r}")
