"""``KDRLLoss``: GRPO, on-policy KD, KDRL (joint and reward-shaping) and TRRD as one drop-in module.

The student's log-probs (and the teacher's, when given as hidden states) are computed from hidden states and lm_head
weights without materialising ``(N, V)`` logits. On the PyTorch backend the loss runs in a single pass that
computes gradients during the forward (see :mod:`kdrl_kernels.fused_loss`); on Triton it composes the fused ops.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import torch

from . import objectives as O
from . import registry as R
from . import validation as V
from .api import fused_linear_kl, fused_linear_logprobs
from .backend import BACKENDS, resolve_backend
from .fused_loss import FusedLossParams, FusedPolicyLoss, TeacherInputs

__all__ = ["KDRLConfig", "KDRLLoss", "token_losses"]

token_losses = R.token_losses  # the per-token terms, as declared in kdrl_kernels.registry


def _f(default, help: str):
    """A KDRLConfig field with its one-line documentation (``python -m kdrl.train --describe`` prints it)."""
    return field(default=default, metadata={"help": help})


@dataclass
class KDRLConfig:
    """Every knob of the loss. Defaults follow the KDRL paper (k2, beta 2e-3, token-mean)."""
    objective: str = _f("kdrl", "grpo | kd | kdrl | kdrl_shaping | trrd, or one added with "
                                "kdrl_kernels.registry.register_objective")
    kl_estimator: str = _f("k2", "k1 | k2 | k3 | exact (full-vocabulary reverse KL; needs the teacher's hidden states)")
    beta: float = _f(2e-3, "KD coefficient of kdrl and kdrl_shaping (kd applies 1, grpo and trrd have no KD term)")
    beta_schedule: str = _f("constant", "constant | linear (max(beta - beta_decay * step, beta_min)) | cosine "
                                        "(beta -> beta_min over total_steps)")
    beta_min: float = _f(1e-3, "floor of the linear and cosine beta schedules")
    beta_decay: float = _f(5e-5, "per-step decrease of the linear beta schedule")
    total_steps: Optional[int] = _f(None, "length of the cosine beta schedule, in steps")
    kd_mask: str = _f("none", "reward-guided KD: none | incorrect (KD on wrong responses only) | group_all_wrong "
                              "(KD on groups with no correct response)")
    eps_low: float = _f(0.2, "lower clip range of the ratio (1 - eps_low)")
    eps_high: float = _f(0.2, "upper clip range of the ratio (1 + eps_high; 0.28 for DAPO's clip-higher)")
    dual_clip: Optional[float] = _f(None, "dual-clip bound c > 1 on negative advantages (e.g. 3.0); null = off")
    trrd_alpha: float = _f(0.5, "TRRD: weight of the old policy in the geometric mixture with the teacher")
    trrd_clamp: Optional[float] = _f(1.0, "TRRD: s - t clamped to [-c, c] before forming the ratio; null = no clamp")
    aggregation: str = _f("token_mean", "token_mean | seq_mean | dr_grpo (sum over tokens / (B * max_len))")
    max_len: Optional[int] = _f(None, "L_max of dr_grpo (default: the T of the batch)")
    scale_rewards: bool = _f(True, "group advantages divided by the group std (False: Dr. GRPO, centring only)")
    adv_eps: float = _f(1e-6, "added to the group std before dividing (with rewards= and scale_rewards)")
    temperature: float = _f(1.0, "logits are divided by it (student, teacher and the exact KL)")
    truncate_teacher_vocab: bool = _f(False, "slice a teacher lm_head with extra padding rows to the student's V")
    compute_entropy: bool = _f(True, "entropy metric (one extra pass over each chunk)")
    log_exact_kl: bool = _f(False, "exact reverse KL as a metric when the estimator is not exact (needs teacher "
                                   "hidden states)")
    backend: str = _f("auto", "auto (triton on CUDA, torch elsewhere) | torch | triton")
    single_pass: bool = _f(True, "PyTorch backend: gradients during forward (no recompute)")
    chunk_size: Optional[int] = _f(None, "tokens per chunk of the PyTorch backend (default: from a memory budget)")

    def __post_init__(self):
        choices = {"objective": tuple(R.OBJECTIVES), "kl_estimator": O.KL_ESTIMATORS + ("exact",),
                   "beta_schedule": O.BETA_SCHEDULES, "kd_mask": O.KD_MASKS, "aggregation": O.AGGREGATIONS,
                   "backend": BACKENDS}
        for name, allowed in choices.items():
            V.check_choice(name, getattr(self, name), allowed)
        for name in ("eps_low", "eps_high", "beta", "beta_min", "beta_decay"):
            V.check_number(name, getattr(self, name), low=0.0)
        V.check_number("eps_low", self.eps_low, high=1.0)  # 1 - eps_low is the lower clip of a ratio > 0
        V.check_number("trrd_alpha", self.trrd_alpha, low=0.0, high=1.0)
        V.check_number("dual_clip", self.dual_clip, low=1.0, low_open=True, allow_none=True)
        V.check_number("trrd_clamp", self.trrd_clamp, low=0.0, low_open=True, allow_none=True)
        V.check_number("adv_eps", self.adv_eps, low=0.0)
        V.check_int("total_steps", self.total_steps, low=1, allow_none=True)
        V.check_int("max_len", self.max_len, low=1, allow_none=True)
        if self.beta_schedule == "cosine" and self.total_steps is None:
            raise ValueError("total_steps must be set (an int >= 1) for beta_schedule='cosine'")
        V.check_chunk_size(self.chunk_size)
        V.check_temperature(self.temperature)
        for name in ("scale_rewards", "truncate_teacher_vocab", "compute_entropy", "log_exact_kl", "single_pass"):
            V.check_bool(name, getattr(self, name))

    @property
    def needs_teacher(self) -> bool:
        return R.get_objective(self.objective).needs_teacher

    @property
    def kl_in_loss(self) -> bool:
        """The exact KL is a term of the loss (and gets a gradient), not only a metric."""
        return R.kl_in_loss(self)

    @classmethod
    def from_dict(cls, values: dict, where: str = "") -> "KDRLConfig":
        """A config from plain values as YAML or JSON give them: numbers written as strings (YAML reads ``2e-3``
        as a string) become numbers of the field's type; unknown keys are a ValueError naming them."""
        if not isinstance(values, dict):
            raise ValueError(f"{where or 'KDRLConfig'} must be a mapping of KDRLConfig fields, got "
                             f"{type(values).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown {where}KDRLConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: _from_text(f"{where}{k}", known[k].type, v) for k, v in values.items()})


def _from_text(name, annotation, value):
    """``value`` as the number its field's annotation asks for, when it came as a string."""
    if not isinstance(value, str) or "str" in annotation or "bool" in annotation:
        return value  # strings stay strings; a bool field's check names the field
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if "int" in annotation:
        if number != int(number):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return int(number)
    return number


def _objective(rows, s, t, kl, *, cfg, beta, adv, old, w_pg, w_kd):
    """Scalar loss of the given rows: ``sum(w_pg * pg) + coef * sum(w_kd * kd)``."""
    pg, kd = R.token_losses(s, t, None if old is None else old[rows], adv[rows], kl, cfg, beta)
    total = torch.zeros((), dtype=torch.float32, device=s.device)
    if pg is not None:
        total = total + (w_pg[rows] * pg).sum()
    if kd is not None:
        total = total + R.applied_kd_coef(cfg, beta) * (w_kd[rows] * kd).sum()
    return total


class KDRLLoss(torch.nn.Module):
    """Drop-in KD + RL loss from hidden states. ``KDRLLoss(config)`` or ``KDRLLoss(**config_fields)``.

    forward(hidden ``(B, T, d)``, weight ``(V, d)``, targets ``(B, T)`` int64, mask ``(B, T)`` bool, *,
    advantages ``(B,)``/``(B, T)`` | rewards ``(B,)`` + group_ids ``(B,)``, correct ``(B,)`` bool,
    old_logprobs ``(B, T)``, teacher_hidden ``(B, T, d_t)`` + teacher_weight ``(V_t, d_t)`` | teacher_logprobs
    ``(B, T)``, step, bias, teacher_bias, pg_weights ``(B, T)``) -> ``(loss, metrics)``; ``hidden[b, t]`` predicts
    ``targets[b, t]``. ``pg_weights`` (>= 0) multiply the policy-gradient term only, token by token (an
    importance-sampling correction between the sampler and the trainer, as TRL applies to its vLLM rollouts); the KD
    term is not weighted.
    """

    def __init__(self, config: Optional[KDRLConfig] = None, **kwargs):
        super().__init__()
        if config is not None and kwargs:
            raise ValueError("pass either a KDRLConfig or keyword fields, not both")
        self.config = config if config is not None else KDRLConfig(**kwargs)

    def extra_repr(self):
        return ", ".join(f"{k}={v}" for k, v in asdict(self.config).items())

    def forward(self, hidden, weight, targets, mask, *, advantages=None, rewards=None, group_ids=None, correct=None,
                old_logprobs=None, teacher_hidden=None, teacher_weight=None, teacher_logprobs=None, step=None,
                bias=None, teacher_bias=None, pg_weights=None):
        cfg = self.config
        if not isinstance(cfg, KDRLConfig):
            raise TypeError(f"config must be a KDRLConfig, got {type(cfg).__name__}")
        cfg.__post_init__()  # a few scalar checks: catches fields changed after construction
        mask = _check_batch(hidden, weight, targets, mask, old_logprobs, teacher_hidden, teacher_weight,
                            teacher_logprobs, bias, teacher_bias, correct)
        V.check_int("step", step, low=0, allow_none=True)
        if cfg.needs_teacher and teacher_hidden is None and teacher_logprobs is None:
            raise ValueError(f"objective={cfg.objective!r} needs teacher_hidden + teacher_weight or teacher_logprobs")
        if teacher_hidden is not None:
            if teacher_weight is None:
                raise ValueError("teacher_hidden needs teacher_weight")
            teacher_weight, teacher_bias = V.match_teacher_vocab(weight, teacher_weight, cfg.truncate_teacher_vocab,
                                                                 teacher_bias)
        need_exact = cfg.kl_in_loss or cfg.log_exact_kl
        if need_exact and teacher_hidden is None:
            raise ValueError("the exact KL needs teacher_hidden and teacher_weight (log-probs are not enough)")
        adv = _token_advantages(cfg, mask, advantages, rewards, group_ids)
        w_pg = O.aggregation_weights(mask, cfg.aggregation, cfg.max_len)
        if correct is None:
            correct = rewards > 0 if rewards is not None else torch.zeros(mask.shape[0], dtype=torch.bool,
                                                                          device=mask.device)
        w_kd = w_pg * O.kd_sequence_mask(correct, group_ids, cfg.kd_mask)[:, None].to(w_pg.device)
        if pg_weights is not None:
            w_pg = w_pg * _check_pg_weights(pg_weights, mask)
        beta = O.beta_at(step, cfg.beta, cfg.beta_schedule, cfg.beta_min, cfg.beta_decay, cfg.total_steps)

        flat = mask.reshape(-1)
        rows = flat.nonzero().squeeze(1)  # masked tokens are dropped before any matmul
        pick = (lambda x: None if x is None else x.reshape(flat.shape[0], *x.shape[2:])[rows])
        h, tgt = pick(hidden), pick(targets).long()
        V.check_targets(tgt, weight.shape[0])  # every token under the mask must be a real id
        teacher = TeacherInputs(pick(teacher_hidden).detach() if teacher_hidden is not None else None,
                                None if teacher_weight is None else teacher_weight.detach(),
                                None if teacher_bias is None else teacher_bias.detach(),
                                None if teacher_logprobs is None else pick(teacher_logprobs).detach().float())
        old = None if old_logprobs is None else pick(old_logprobs).detach().float()
        adv, w_pg, w_kd = pick(adv), pick(w_pg), pick(w_kd)
        objective = functools.partial(_objective, cfg=cfg, beta=beta, adv=adv, old=old, w_pg=w_pg, w_kd=w_kd)
        backend = resolve_backend(cfg.backend, hidden.device)
        if backend == "torch" and cfg.single_pass:
            params = FusedLossParams(objective, cfg.temperature, cfg.chunk_size, need_exact, cfg.kl_in_loss,
                                     cfg.compute_entropy)
            loss, stats = FusedPolicyLoss.apply(h, weight, bias, tgt, teacher, params)
            s, t, kl, ent = stats
            t = t if teacher.present else None
        else:
            loss, s, t, kl, ent = _composed_loss(cfg, backend, objective, h, weight, bias, tgt, teacher, need_exact)
        V.check_outputs_finite((loss, s, t, kl), hidden=hidden, weight=weight, bias=bias,
                               teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias)
        metrics = _metrics(cfg, loss, beta, s.detach(), t, kl if need_exact else None,
                           ent if cfg.compute_entropy else None, old, adv, w_pg, w_kd)
        return loss, metrics


def _composed_loss(cfg, backend, objective, h, weight, bias, tgt, teacher, need_exact):
    """The same loss from the public ops (Triton on GPU): student log-probs keep their autograd graph."""
    common = dict(temperature=cfg.temperature, backend=backend, chunk_size=cfg.chunk_size, check_finite=False)
    s, ent = fused_linear_logprobs(h, weight, tgt, bias=bias, return_entropy=True, **common)
    t = teacher.logprobs
    if t is None and teacher.hidden is not None:
        with torch.no_grad():
            t = fused_linear_logprobs(teacher.hidden, teacher.weight, tgt, bias=teacher.bias, **common)
    kl = None
    if need_exact:
        kl = fused_linear_kl(h, weight, teacher.hidden, teacher.weight, kind="reverse", student_bias=bias,
                             teacher_bias=teacher.bias, **common)
        if not cfg.kl_in_loss:
            kl = kl.detach()
    rows = torch.arange(h.shape[0], device=h.device)
    return objective(rows, s, t, kl), s, t, kl, ent.detach()


def _token_advantages(cfg, mask, advantages, rewards, group_ids):
    """``(B, T)`` float32 advantages from per-sequence / per-token advantages or from rewards + group ids."""
    b, t = mask.shape
    if advantages is None:
        if rewards is None or group_ids is None:
            if R.get_objective(cfg.objective).log_ratio is None:  # no policy-gradient term (kd): none needed
                return torch.zeros(b, t, device=mask.device)
            raise ValueError("pass advantages (B,) or (B, T), or rewards (B,) with group_ids (B,)")
        V.check_vector("rewards", rewards, b)
        V.check_vector("group_ids", group_ids, b, dtype_kind="int")
        V.check_same_device(mask=mask, rewards=rewards, group_ids=group_ids)
        advantages = O.group_advantages(rewards, group_ids, cfg.adv_eps, cfg.scale_rewards)
    else:
        V.check_tensor("advantages", advantages)
        if not advantages.is_floating_point():
            raise TypeError(f"advantages must be a floating tensor, got {advantages.dtype}")
        V.check_same_device(mask=mask, advantages=advantages)
        for name, x in (("rewards", rewards), ("group_ids", group_ids)):
            if x is not None:
                V.check_vector(name, x, b, dtype_kind="float" if name == "rewards" else "int")
    if advantages.shape == (b,):
        advantages = advantages[:, None].expand(b, t)
    if advantages.shape != (b, t):
        raise ValueError(f"advantages must have shape ({b},) or ({b}, {t}), got {tuple(advantages.shape)}")
    if not torch.isfinite(advantages[mask]).all():
        raise ValueError("advantages contain NaN or inf (under the mask)")
    return advantages.float()


def _check_pg_weights(pg_weights, mask):
    """``(B, T)`` float32 per-token factors of the policy-gradient term: finite and >= 0 under the mask."""
    V.check_tensor("pg_weights", pg_weights)
    if not pg_weights.is_floating_point():
        raise TypeError(f"pg_weights must be a floating tensor, got {pg_weights.dtype}")
    if tuple(pg_weights.shape) != tuple(mask.shape):
        raise ValueError(f"pg_weights must have shape {tuple(mask.shape)}, got {tuple(pg_weights.shape)}")
    V.check_same_device(mask=mask, pg_weights=pg_weights)
    vals = pg_weights[mask]
    if vals.numel() and not (torch.isfinite(vals).all() and bool((vals >= 0).all())):
        raise ValueError("pg_weights must be finite and >= 0 under the mask")
    return torch.where(mask, pg_weights.float(), torch.zeros((), device=mask.device))


def _check_batch(hidden, weight, targets, mask, old_logprobs, teacher_hidden, teacher_weight, teacher_logprobs,
                 bias, teacher_bias, correct):
    """Shapes, dtypes and devices of the batch, cheaply (no scan of a weight). Returns the mask as bool."""
    V.check_tensor("hidden", hidden)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, d), got shape {tuple(hidden.shape)}")
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating tensor (float32, bfloat16, float16), got {hidden.dtype}")
    b, t, d = hidden.shape
    V.check_matrix("weight", weight, cols=d, min_rows=1)
    V.check_same_dtype("hidden", hidden, "weight", weight)
    if bias is not None:
        V.check_vector("bias", bias, weight.shape[0])
    V.check_tensor("targets", targets)
    if tuple(targets.shape) != (b, t):
        raise ValueError(f"targets must have shape ({b}, {t}), got {tuple(targets.shape)}")
    if targets.dtype not in V.INT_DTYPES:
        raise TypeError(f"targets must be an int64 (or int32) tensor, got {targets.dtype}")
    mask = V.check_mask("mask", mask, (b, t))
    for name, x in (("old_logprobs", old_logprobs), ("teacher_logprobs", teacher_logprobs)):
        if x is not None:
            V.check_tensor(name, x)
            if tuple(x.shape) != (b, t):
                raise ValueError(f"{name} must have shape ({b}, {t}), got {tuple(x.shape)}")
    if teacher_hidden is not None:
        V.check_tensor("teacher_hidden", teacher_hidden)
        if teacher_hidden.dim() != 3 or tuple(teacher_hidden.shape[:2]) != (b, t):
            raise ValueError(f"teacher_hidden must have shape ({b}, {t}, d_t), got {tuple(teacher_hidden.shape)}")
        if not teacher_hidden.is_floating_point():
            raise TypeError(f"teacher_hidden must be a floating tensor, got {teacher_hidden.dtype}")
        if teacher_weight is not None:
            V.check_matrix("teacher_weight", teacher_weight, cols=teacher_hidden.shape[2], min_rows=1)
            V.check_same_dtype("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight)
            if teacher_bias is not None:
                V.check_vector("teacher_bias", teacher_bias, teacher_weight.shape[0])
    if correct is not None:
        V.check_vector("correct", correct, b, dtype_kind="bool")
    V.check_same_device(hidden=hidden, weight=weight, targets=targets, mask=mask, old_logprobs=old_logprobs,
                        teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                        teacher_logprobs=teacher_logprobs, bias=bias, teacher_bias=teacher_bias, correct=correct)
    # (B, T): cheap; only the tokens under the mask count, so padding may hold anything
    V.check_logprobs("old_logprobs", old_logprobs, mask)
    V.check_logprobs("teacher_logprobs", teacher_logprobs, mask)
    return mask


def _metrics(cfg, loss, beta, s, t, kl, ent, old, adv, w_pg, w_kd):
    """Floats for logging, computed from the per-token statistics without gradients (one host sync)."""
    n = s.numel()
    coef = R.applied_kd_coef(cfg, beta)  # the KD coefficient applied at this step, not the configured beta
    if n == 0:
        return {"loss": float(loss.detach()), "num_tokens": 0.0, "beta": coef}
    with torch.no_grad():
        pg, kd = R.token_losses(s, t, old, adv, kl, cfg, beta)
        log_ratio, clip_adv = R.clip_inputs(s, t, old, adv, cfg, beta)
        ratio = log_ratio.exp()
        vals = {"loss": loss.detach().float(), "num_tokens": torch.tensor(float(n)),
                "pg_loss": (w_pg * pg).sum() if pg is not None else torch.tensor(0.0),
                "kd_loss": (w_kd * kd).sum() if kd is not None else torch.tensor(0.0),
                "clip_frac": O.clip_mask(log_ratio, clip_adv, cfg.eps_low, cfg.eps_high, cfg.dual_clip).float().mean(),
                "ratio_mean": ratio.mean(), "ratio_min": ratio.min(), "ratio_max": ratio.max(),
                "logp_mean": s.mean()}
        if t is not None:
            vals.update({k: O.kl_estimator(s, t, k).mean() for k in O.KL_ESTIMATORS})
            vals["teacher_logp_mean"] = t.mean()
        if kl is not None:
            vals["exact_kl"] = kl.detach().mean()
        if ent is not None:
            vals["entropy"] = ent.mean()
        names = list(vals)
        floats = torch.stack([vals[k].float().to(s.device) for k in names]).tolist()
    out = dict(zip(names, floats))
    out["beta"] = coef
    return out
