"""What each objective means, declared once. ``KDRLLoss``, the trainer, the testbed and the TRL and verl adapters
read these declarations; none of them re-derives an objective from its name.

An :class:`Objective` says which terms the per-token loss has (see docs/objectives.md):

- a policy-gradient term ``clipped_surrogate(log_ratio(s, old, t, cfg), advantage(A, s, t, beta))`` when
  ``log_ratio`` is set (GRPO's ratio to the rollout policy, TRRD's to the old-policy/teacher mixture);
- a KD term, entering either the loss (``kd="loss"``: ``coef(beta) * k``, with ``k`` the configured estimator or the
  exact KL) or the advantage (``kd="advantage"``: KDRL's reward shaping);
- whether it needs the teacher at all.

From the declaration follow: the KD coefficient actually applied at a step (:func:`applied_kd_coef`), what teacher
input a caller must provide (:func:`teacher_input`), the metric names ``KDRLLoss`` returns (:func:`metric_names`),
how each metric reduces over micro-batches and processes (:data:`METRICS`, :func:`reduce_metrics`), and the KD signal
a trainer logs (:func:`kd_signal`). ``register_objective`` adds an objective; every caller then accepts it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from . import objectives as O

__all__ = ["Objective", "OBJECTIVES", "register_objective", "get_objective", "token_losses", "applied_kd_coef",
           "teacher_input", "metric_names", "METRICS", "reduce_metrics", "kd_signal", "describe", "kl_in_loss",
           "clip_inputs"]


def _plain_advantage(adv, s, t, beta):
    return adv


@dataclass(frozen=True)
class Objective:
    """One objective's meaning.

    name: the ``KDRLConfig.objective`` value.
    summary: ``cfg -> str``, one phrase saying what the loss is (start-up lines, docs).
    log_ratio: ``(s, old, t, cfg) -> (N,)`` log-ratio of the clipped surrogate; None = no policy-gradient term.
    advantage: ``(adv, s, t, beta) -> (N,)`` the advantage the surrogate sees (default: ``adv``); must not carry
        a gradient (detach what depends on ``s``).
    kd: where the KD signal enters: ``"loss"`` (a term ``coef(beta) * k``), ``"advantage"`` (inside ``advantage``,
        KDRL's shaping form) or None.
    coef: ``beta -> float``, the coefficient applied to the KD signal at a step whose scheduled beta is ``beta``.
    kd_metric: the loss metric that holds the KD signal before its coefficient (``kd_loss``; ``k1`` for shaping).
    needs_teacher: the objective reads the teacher's log-probs (or hidden states).
    """
    name: str
    summary: Callable
    log_ratio: Optional[Callable] = None
    advantage: Callable = _plain_advantage
    kd: Optional[str] = None
    coef: Callable = lambda beta: beta
    kd_metric: Optional[str] = None
    needs_teacher: bool = True

    def __post_init__(self):
        if self.kd not in (None, "loss", "advantage"):
            raise ValueError(f"Objective.kd must be None, 'loss' or 'advantage', got {self.kd!r}")
        if self.log_ratio is None and self.kd != "loss":
            raise ValueError(f"objective {self.name!r} has neither a policy-gradient nor a KD loss term")
        if self.kd is not None and not self.needs_teacher:
            raise ValueError(f"objective {self.name!r} has a KD signal, so it needs the teacher")


OBJECTIVES: dict[str, Objective] = {}


def register_objective(objective: Objective) -> Objective:
    """Add ``objective`` (or replace one of the same name); returns it."""
    if not isinstance(objective, Objective):
        raise TypeError(f"objective must be an Objective, got {type(objective).__name__}")
    OBJECTIVES[objective.name] = objective
    return objective


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {name!r}")
    return OBJECTIVES[name]


def _kd_name(cfg) -> str:
    return "exact reverse KL" if cfg.kl_estimator == "exact" else cfg.kl_estimator


def _beta_phrase(cfg) -> str:
    return f"beta {cfg.beta:g}" + (f" {cfg.beta_schedule}" if cfg.beta_schedule != "constant" else "")


def _grpo_ratio(s, old, t, cfg):
    return O.grpo_log_ratio(s, old)


def _trrd_ratio(s, old, t, cfg):
    return O.trrd_log_ratio(s, old, t, cfg.trrd_alpha, cfg.trrd_clamp)


def _shaped_advantage(adv, s, t, beta):
    return adv + beta * (t - s).detach()


register_objective(Objective(
    "grpo", lambda c: "grpo (no KD term)", log_ratio=_grpo_ratio, needs_teacher=False))
register_objective(Objective(
    "kd", lambda c: f"kd (loss = {_kd_name(c)} to the teacher)", kd="loss", coef=lambda beta: 1.0,
    kd_metric="kd_loss"))
register_objective(Objective(
    "kdrl", lambda c: f"kdrl (loss = GRPO + beta * {_kd_name(c)}, {_beta_phrase(c)})", log_ratio=_grpo_ratio,
    kd="loss", kd_metric="kd_loss"))
register_objective(Objective(
    "kdrl_shaping", lambda c: f"kdrl_shaping (advantage - beta * (log p - log p_teacher), {_beta_phrase(c)})",
    log_ratio=_grpo_ratio, advantage=_shaped_advantage, kd="advantage", kd_metric="k1"))
register_objective(Objective(
    "trrd", lambda c: f"trrd (ratio against pi_old^{c.trrd_alpha:g} * pi_teacher^{1 - c.trrd_alpha:g})",
    log_ratio=_trrd_ratio))


def describe(cfg) -> str:
    """One phrase for a start-up line: what ``cfg``'s loss is, with the KD term written as it enters."""
    return get_objective(cfg.objective).summary(cfg)


def applied_kd_coef(cfg, beta: float) -> float:
    """The coefficient the KD signal gets at a step whose scheduled beta is ``beta`` (0 without a KD signal)."""
    obj = get_objective(cfg.objective)
    return 0.0 if obj.kd is None else float(obj.coef(beta))


def kl_in_loss(cfg) -> bool:
    """The exact KL is a term of the loss (and gets a gradient), not only a metric."""
    return cfg.kl_estimator == "exact" and get_objective(cfg.objective).kd == "loss"


def teacher_input(cfg) -> str:
    """What a caller must pass for ``cfg``: ``"none"``, ``"logprobs"`` (teacher log-probs of the sampled tokens
    suffice) or ``"hidden"`` (teacher hidden states + lm_head: the exact KL is in the loss or logged)."""
    if kl_in_loss(cfg) or cfg.log_exact_kl:  # log_exact_kl: a metric of the distance to the teacher, any objective
        return "hidden"
    return "logprobs" if get_objective(cfg.objective).needs_teacher else "none"


def token_losses(s, t, old, adv, kl, cfg, beta: float):
    """Per-token policy-gradient and KD terms ``(pg, kd)`` (either may be None), each shaped like ``s``.

    ``old=None`` means on-policy (``old = s.detach()``, ratio 1). ``kl`` is the exact per-token KL when the
    estimator is ``exact``. The KD term is returned before its coefficient (:func:`applied_kd_coef`).
    """
    obj = get_objective(cfg.objective)
    old = s.detach() if old is None else old
    pg = kd = None
    if obj.log_ratio is not None:
        pg = O.clipped_surrogate(obj.log_ratio(s, old, t, cfg), obj.advantage(adv, s, t, beta),
                                 eps_low=cfg.eps_low, eps_high=cfg.eps_high, dual_clip=cfg.dual_clip)
    if obj.kd == "loss":
        kd = kl if cfg.kl_estimator == "exact" else O.kl_estimator(s, t, cfg.kl_estimator)
    return pg, kd


def clip_inputs(s, t, old, adv, cfg, beta: float):
    """``(log_ratio, advantage)`` whose clip mask is the clip fraction (ratio 1 without a policy-gradient term)."""
    obj = get_objective(cfg.objective)
    old = s if old is None else old
    if obj.log_ratio is None:
        return s - old, adv
    return obj.log_ratio(s, old, t, cfg), obj.advantage(adv, s, t, beta)


# How each metric of KDRLLoss reduces over micro-batches (weights = each one's share of the batch's normaliser) and
# over processes (equal weights, as DDP averages gradients): "weighted" = weighted mean, "token" = mean over all
# tokens (weighted by num_tokens), "sum", "min", "max". A metric not listed here reduces as "weighted".
METRICS = {"loss": "weighted", "pg_loss": "weighted", "kd_loss": "weighted", "beta": "weighted",
           "num_tokens": "sum", "ratio_min": "min", "ratio_max": "max",
           "clip_frac": "token", "ratio_mean": "token", "logp_mean": "token", "teacher_logp_mean": "token",
           "k1": "token", "k2": "token", "k3": "token", "exact_kl": "token", "entropy": "token"}


def metric_names(cfg, teacher: bool) -> list[str]:
    """The names ``KDRLLoss(cfg)`` returns on a non-empty batch (``teacher``: teacher log-probs or hidden given)."""
    names = ["loss", "num_tokens", "pg_loss", "kd_loss", "clip_frac", "ratio_mean", "ratio_min", "ratio_max",
             "logp_mean"]
    if teacher:
        names += list(O.KL_ESTIMATORS) + ["teacher_logp_mean"]
    if teacher_input(cfg) == "hidden":
        names.append("exact_kl")
    if cfg.compute_entropy:
        names.append("entropy")
    return names + ["beta"]


def reduce_metrics(parts: Sequence[dict], weights: Optional[Sequence[float]] = None) -> dict:
    """One dict from the metrics of several micro-batches or processes, each name reduced as :data:`METRICS` says.

    ``weights``: the parts' shares of the whole (the micro-losses were scaled by them); None = equal shares that sum
    to 1. A part without tokens (``num_tokens == 0``) contributes only its count and its weighted terms.
    """
    parts = list(parts)
    if weights is None:
        weights = [1.0 / len(parts)] * len(parts) if parts else []
    if len(weights) != len(parts):
        raise ValueError(f"weights has {len(weights)} entries for {len(parts)} parts")
    counts = [float(p.get("num_tokens", 0.0)) for p in parts]
    out: dict[str, float] = {}
    for name in dict.fromkeys(k for p in parts for k in p):
        have = [(p[name], w, n) for p, w, n in zip(parts, weights, counts) if name in p]
        kind = METRICS.get(name, "weighted")
        if kind == "sum":
            out[name] = float(sum(v for v, _, _ in have))
        elif kind == "weighted":
            out[name] = float(sum(v * w for v, w, _ in have))
        else:
            have = [(v, w, n) for v, w, n in have if n > 0]
            if not have:
                continue
            if kind == "min":
                out[name] = float(min(v for v, _, _ in have))
            elif kind == "max":
                out[name] = float(max(v for v, _, _ in have))
            else:
                out[name] = float(sum(v * n for v, _, n in have) / sum(n for _, _, n in have))
    return out


def kd_signal(cfg, metrics: dict) -> dict:
    """``kd_raw`` (the KD signal before its coefficient) and ``kd_term`` (as it enters: ``beta * kd_raw``) of a step's
    reduced metrics, where ``beta`` is the applied coefficient KDRLLoss reports; empty without a KD signal."""
    name = get_objective(cfg.objective).kd_metric
    if name is None or metrics.get(name) is None or metrics.get("beta") is None:
        return {}
    return {"kd_raw": metrics[name], "kd_term": metrics["beta"] * metrics[name]}

