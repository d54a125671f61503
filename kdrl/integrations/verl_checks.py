"""Which settings a verl (0.9.1) launch with our losses honours and which it refuses, decided once.

:func:`resolve` takes the user's :class:`kdrl_kernels.KDRLConfig` (and the names of the fields the user actually
gave), verl's distillation-loss settings and the actor's settings, and returns the config the loss will run with,
or raises one ``ValueError`` that lists every problem with its reason. It runs twice: in the driver, on the whole
launch config, before Ray starts (:func:`check_launch`, hooked into verl's ``validate_config``), and in the loss
itself on the config objects the actor worker holds (a safety net for in-process use).

Rules (kdrl/README.md lists them for users):

- verl owns the clip range, the dual clip, the temperature and the aggregation: ``eps_low``/``eps_high`` are
  ``clip_ratio_low``/``clip_ratio_high`` (``clip_ratio`` when unset), ``dual_clip`` is ``clip_ratio_c`` (verl's
  vanilla policy loss always dual-clips), ``temperature`` is the rollout temperature (the log-probs verl hands the
  loss are already at it; it must be 1 for an objective that reads the teacher: verl's teacher server always scores
  at temperature 1) and ``aggregation`` is ``loss_agg_mode``. Giving one of these in the KDRL config with
  another value is refused; not giving it takes verl's.
- KDRL config fields that have no effect under verl (verl computes advantages, entropies and log-probs itself) are
  refused when given with a non-default value; ``kl_estimator=exact`` and ``log_exact_kl`` (need teacher hidden
  states, verl ships log-probs) and ``kd_mask=group_all_wrong`` (a micro-batch need not hold a whole group) too.
- ``loss_mode=kdrl`` with ``use_task_rewards=True`` adds only the KD term to verl's own policy loss: the objective's
  policy-gradient term must be GRPO's and verl's ``policy_loss.loss_mode`` must be ``vanilla`` (verl's entropy bonus
  and KL loss, when configured, stay verl's own extra terms). With ``use_task_rewards=False`` it is the pure KD loss
  (an objective without a policy-gradient term).
- ``loss_mode=kdrl_objective`` (and ``kdrl_trrd``, the same for ``objective=trrd``) replaces verl's policy loss with
  the whole registered objective: ``use_task_rewards=False``, and the settings of the replaced loss that it would
  drop (``entropy_coeff != 0``, ``use_kl_loss``, ``policy_loss.loss_mode != vanilla``) are refused.
- A non-constant beta schedule needs the trainer step: verl's v1 trainer gives it per sample (``global_steps``, the
  step the prompt was sent to the rollout at), which is the update's step only in ``trainer.v1.trainer_mode=sync``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Optional

from kdrl_kernels import KDRLConfig
from kdrl_kernels import registry as R

KDRL_LOSS = "kdrl"
OBJECTIVE_LOSS = "kdrl_objective"
TRRD_LOSS = "kdrl_trrd"
LOSS_MODES = (KDRL_LOSS, OBJECTIVE_LOSS, TRRD_LOSS)

# KDRLConfig.aggregation -> verl's loss_agg_mode with the same normaliser
AGGREGATION = {"token_mean": "token-mean", "seq_mean": "seq-mean-token-mean"}
# KDRLConfig fields that do nothing under verl, with the verl setting that decides instead
NO_EFFECT = {
    "scale_rewards": "verl computes the advantages: algorithm.norm_adv_by_std_in_grpo",
    "adv_eps": "verl computes the advantages (its own epsilon)",
    "max_len": "the aggregation is verl's loss_agg_mode",
    "truncate_teacher_vocab": "verl ships teacher log-probs, not an lm_head",
    "compute_entropy": "verl's actor.calculate_entropy decides",
    "backend": "verl hands the loss log-probs; the fused backend is actor_rollout_ref.model.fused_kernel_options",
    "single_pass": "verl hands the loss log-probs",
    "chunk_size": "verl hands the loss log-probs",
}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(KDRLConfig)}


def given_fields(config: KDRLConfig) -> set:
    """The fields of ``config`` that differ from KDRLConfig's defaults (what an in-process user evidently set)."""
    return {name for name, default in _DEFAULTS.items() if getattr(config, name) != default}


def _get(obj, dotted: str, default=None):
    """``obj.a.b`` for a dataclass, an OmegaConf node or a dict; ``default`` where a level is missing."""
    for key in dotted.split("."):
        if obj is None:
            return default
        obj = obj.get(key, None) if isinstance(obj, dict) or hasattr(obj, "keys") else getattr(obj, key, None)
    return default if obj is None else obj


def verl_values(actor, temperature: Optional[float]) -> dict:
    """The KDRLConfig values verl's actor settings stand for (``temperature`` None = not known here)."""
    clip = _get(actor, "clip_ratio", 0.2)
    low, high = _get(actor, "clip_ratio_low", clip), _get(actor, "clip_ratio_high", clip)
    out = {"eps_low": float(low), "eps_high": float(high), "dual_clip": float(_get(actor, "clip_ratio_c", 3.0))}
    agg = _get(actor, "loss_agg_mode", "token-mean")
    # None: verl's mode has no KDRLConfig equivalent (verl's aggregation still applies)
    out["aggregation"] = next((k for k, v in AGGREGATION.items() if v == agg), None)
    if temperature is not None:
        out["temperature"] = float(temperature)
    return out


def _pg_is_grpo(objective) -> bool:
    grpo = R.get_objective("grpo")
    return objective.log_ratio is grpo.log_ratio and objective.advantage is grpo.advantage


def resolve(config: KDRLConfig, given: Iterable[str], *, loss_mode: str, loss_cfg, actor,
            temperature: Optional[float] = None, trainer_mode: Optional[str] = None,
            use_v1: Optional[bool] = None) -> KDRLConfig:
    """The config the loss runs with; a ValueError listing every refused setting, each with its reason.

    ``loss_cfg``: verl's ``distillation.distillation_loss``; ``actor``: ``actor_rollout_ref.actor`` (dataclass,
    OmegaConf node or dict); ``temperature``, ``trainer_mode``, ``use_v1``: where known (the driver knows them).
    """
    given = set(given)
    problems = []
    if loss_mode not in LOSS_MODES:
        raise ValueError(f"loss_mode must be one of {LOSS_MODES}, got {loss_mode!r}")
    obj = R.get_objective(config.objective)
    task_rewards = bool(_get(loss_cfg, "use_task_rewards", True))
    if _get(loss_cfg, "use_policy_gradient", False):
        problems.append(f"loss_mode={loss_mode} needs distillation.distillation_loss.use_policy_gradient=False "
                        "(it is a loss, not a reward for verl's policy gradient)")
    if _get(loss_cfg, "loss_max_clamp", None) is not None:
        problems.append(f"loss_mode={loss_mode} needs distillation.distillation_loss.loss_max_clamp=null "
                        "(verl would clamp the per-token loss, cutting the surrogate and the KD term)")
    pg_mode = _get(actor, "policy_loss.loss_mode", "vanilla")
    if loss_mode == KDRL_LOSS:
        if task_rewards:
            if obj.kd != "loss" or not _pg_is_grpo(obj):
                problems.append(f"loss_mode=kdrl with use_task_rewards=True adds a KD loss term to verl's GRPO loss: "
                                f"objective={config.objective!r} is not GRPO + a KD loss term (use "
                                f"loss_mode={OBJECTIVE_LOSS} with use_task_rewards=False)")
            if pg_mode != "vanilla":
                problems.append(f"actor.policy_loss.loss_mode={pg_mode!r}: objective={config.objective!r}'s "
                                "policy-gradient term is GRPO's clipped surrogate, verl's 'vanilla'")
            if float(_get(loss_cfg, "distillation_loss_coef", 1.0)) <= 0:
                problems.append("distillation_loss_coef must be > 0 with loss_mode=kdrl (the KD weight is beta; "
                                "the term is divided by this coefficient)")
        elif obj.log_ratio is not None or obj.kd != "loss":
            problems.append(f"loss_mode=kdrl with use_task_rewards=False is pure KD: objective={config.objective!r} "
                            f"has a policy-gradient term (use loss_mode={OBJECTIVE_LOSS})")
    else:
        if loss_mode == TRRD_LOSS and config.objective != "trrd":
            problems.append(f"loss_mode={TRRD_LOSS} is KDRLConfig(objective='trrd'), got "
                            f"objective={config.objective!r} (loss_mode={OBJECTIVE_LOSS} takes any objective)")
        if task_rewards:
            problems.append(f"loss_mode={loss_mode} replaces verl's policy loss: set "
                            "distillation.distillation_loss.use_task_rewards=False (advantages still come from rewards)")
        if float(_get(actor, "entropy_coeff", 0.0)) != 0.0:
            problems.append(f"actor.entropy_coeff={_get(actor, 'entropy_coeff')}: loss_mode={loss_mode} replaces "
                            "verl's policy loss, which is where verl adds the entropy bonus; set it to 0")
        if _get(actor, "use_kl_loss", False):
            problems.append(f"actor.use_kl_loss=True: loss_mode={loss_mode} replaces verl's policy loss, which is "
                            "where verl adds the KL loss; set it to False")
        if pg_mode != "vanilla":
            problems.append(f"actor.policy_loss.loss_mode={pg_mode!r}: loss_mode={loss_mode} replaces verl's policy "
                            f"loss with objective={config.objective!r}; set it to 'vanilla'")
    if config.kl_estimator == "exact" or config.log_exact_kl:
        problems.append("kl_estimator='exact' and log_exact_kl need the teacher's hidden states; verl provides "
                        "its log-probs only")
    if config.kd_mask == "group_all_wrong":
        problems.append("kd_mask='group_all_wrong' is not offered in verl: a loss sees one micro-batch, which need "
                        "not hold every response of a group; use 'incorrect' or 'none'")
    # the schedule matters only where the applied KD coefficient depends on beta (not for kd, grpo, trrd)
    if config.beta_schedule != "constant" and R.applied_kd_coef(config, 1.0) != R.applied_kd_coef(config, 0.5):
        if use_v1 is False:
            problems.append(f"beta_schedule={config.beta_schedule!r} needs the trainer step, which verl's legacy "
                            "trainer (trainer.use_v1=False) does not hand the actor; use the v1 trainer")
        if trainer_mode not in (None, "sync"):
            problems.append(f"beta_schedule={config.beta_schedule!r} with trainer.v1.trainer_mode={trainer_mode!r}: "
                            "the step a sample carries is its rollout's, not the update's; use trainer_mode=sync")
    if temperature is not None and float(temperature) != 1.0 and obj.needs_teacher:
        problems.append(f"rollout temperature {temperature:g}: verl's teacher server scores at temperature 1 "
                        "(verl/experimental/teacher_loop/teacher_manager.py, _get_teacher_sampling_params) while the "
                        f"student's log-probs are at {temperature:g}; objective={config.objective!r} compares them: "
                        "use rollout temperature 1")
    verl = verl_values(actor, temperature)
    for name, value in verl.items():
        if name in given and getattr(config, name) != value:
            theirs = (f"verl's setting ({value!r})" if value is not None else
                      f"verl's loss_agg_mode={_get(actor, 'loss_agg_mode')!r}, which has no KDRLConfig equivalent")
            problems.append(f"{name}={getattr(config, name)!r} disagrees with {theirs}; verl's is used: drop the "
                            "field or make them agree")
    for name, why in NO_EFFECT.items():
        if name in given and getattr(config, name) != _DEFAULTS[name]:
            problems.append(f"{name}={getattr(config, name)!r} has no effect under verl ({why})")
    if problems:
        raise ValueError("kdrl-kernels cannot run this verl launch as configured:\n  - " + "\n  - ".join(problems))
    return dataclasses.replace(config, **{k: v for k, v in verl.items() if v is not None})


def check_launch(config: Any, kdrl_config: KDRLConfig, given: Iterable[str], env_set: bool) -> Optional[KDRLConfig]:
    """The driver's check on verl's whole launch config (``python -m verl.trainer.main_ppo``'s Hydra config).

    Returns the resolved config when one of our loss modes is in use, None when none is and no KDRL config was
    set; raises ValueError when a KDRL config is set that the launch would not use, or when :func:`resolve` refuses.
    """
    enabled = bool(_get(config, "distillation.enabled", False))
    loss_mode = _get(config, "distillation.distillation_loss.loss_mode", None)
    if not enabled or loss_mode not in LOSS_MODES:
        if env_set:
            raise ValueError("$KDRL_VERL_CONFIG is set, but no kdrl loss is in use (distillation.enabled="
                             f"{enabled}, distillation.distillation_loss.loss_mode={loss_mode!r}): it would have no "
                             f"effect; set distillation.enabled=True and loss_mode to one of {LOSS_MODES}, or unset it")
        return None
    return resolve(kdrl_config, given, loss_mode=loss_mode, loss_cfg=_get(config, "distillation.distillation_loss"),
                   actor=_get(config, "actor_rollout_ref.actor"),
                   temperature=_get(config, "actor_rollout_ref.rollout.temperature", None),
                   trainer_mode=_get(config, "trainer.v1.trainer_mode", None),
                   use_v1=bool(_get(config, "trainer.use_v1", True)))
