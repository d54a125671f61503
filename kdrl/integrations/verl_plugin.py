"""verl (0.9.1) integration: our fused log-prob/entropy as the actor's hidden-state backend, KDRL and TRRD as losses.

``install()`` (idempotent; also run when this module is imported) does two things inside verl:

1. **Fused backend ``"kdrl"``.** verl picks the forward of a causal LM in
   ``verl.models.transformers.monkey_patch.patch_forward_with_backends`` from
   ``actor_rollout_ref.model.fused_kernel_options.impl_backend`` (``torch`` / ``liger`` / ``triton``; any other value
   silently leaves the model unpatched). We wrap that function so that ``impl_backend=kdrl`` (with
   ``use_fused_kernels=True``) installs a forward that runs the base model and returns ``log_probs`` and ``entropy``
   of the next token from the final hidden states with :func:`kdrl_kernels.fused_linear_logprobs`, exactly where
   verl's torch backend calls ``FusedLinearForPPO(hidden_states, lm_head.weight, rolled_labels, temperature)``.
   Dense text models only (verl's generic forward); the vision-language model types verl special-cases are refused.
2. **Distillation losses** (``verl.trainer.distillation.losses.register_distillation_loss``), on the per-token
   log-probs verl already has (the student's from the actor forward, the teacher's from verl's teacher server), with
   the per-token terms read from :mod:`kdrl_kernels.registry` (``token_losses``, ``applied_kd_coef``), so any
   registered objective reaches verl:
   - ``distillation.distillation_loss.loss_mode=kdrl``: only the objective's KD term, ``coef(beta(step)) * kd_mask
     * k``. With ``use_task_rewards=True`` verl adds it to its own GRPO policy loss (KDRL's joint form; the term is
     divided by ``distillation_loss_coef`` so the total is ``pg + beta(step) * k``); with ``use_task_rewards=False``
     it is pure on-policy KD.
   - ``loss_mode=kdrl_objective``: the whole registered objective (policy-gradient and KD terms, verl's advantages,
     old log-probs and rollout importance weights), replacing verl's policy loss (``use_task_rewards=False``).
     ``loss_mode=kdrl_trrd`` is the same for ``objective=trrd``.
   What is honoured and what is refused, and why, is decided in :mod:`kdrl.integrations.verl_checks`: in the
   driver before Ray starts (we wrap ``verl.utils.config.validate_config``) and again in the loss.

Nothing is registered in verl's policy-loss registry: a policy loss there receives only the policy's own log-probs
(``old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights``), not the teacher's.

The loss settings are a :class:`kdrl_kernels.KDRLConfig`: ``install(config=KDRLConfig(...))`` in-process, or the
environment variable ``KDRL_VERL_CONFIG`` holding the config's fields as JSON (what verl's Ray workers see:
``+ray_kwargs.ray_init.runtime_env.env_vars.KDRL_VERL_CONFIG=...``). verl imports this module in every process when
``VERL_USE_EXTERNAL_MODULES=kdrl.integrations.verl_plugin`` is set (read by ``import verl``), which is what a launch needs:
the driver validates ``loss_mode`` against the registry before any worker starts.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch

from kdrl_kernels import KDRLConfig, fused_linear_logprobs
from kdrl_kernels import objectives as O
from kdrl_kernels import registry as R

from . import verl_checks as C
from .verl_checks import KDRL_LOSS, OBJECTIVE_LOSS, TRRD_LOSS

__all__ = ["install", "uninstall", "set_config", "get_config", "given_fields", "resolved_config", "batch_step",
           "batch_correct", "kdrl_backend_logprobs", "forward_with_kdrl_backend", "kdrl_distillation_loss",
           "objective_distillation_loss", "BACKEND", "KDRL_LOSS", "OBJECTIVE_LOSS", "TRRD_LOSS", "ENV_CONFIG"]

BACKEND = "kdrl"
ENV_CONFIG = "KDRL_VERL_CONFIG"
# model types for which verl has a model-specific fused forward (vision-language); ours is the dense-text one
_VERL_SPECIAL_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "qwen3_5", "qwen3_5_moe")

_config: Optional[KDRLConfig] = None
_given: set = set()
_installed = False


def set_config(config: Optional[KDRLConfig] = None, **config_fields) -> KDRLConfig:
    """Set the :class:`KDRLConfig` the registered losses use (``set_config(cfg)`` or ``set_config(beta=...)``).

    The fields given (keyword names, or a config's fields that differ from the defaults) are the ones checked
    against verl's own settings (verl_checks); the others take verl's values where verl owns them.
    """
    global _config, _given
    if config is not None and config_fields:
        raise ValueError("pass either a KDRLConfig or keyword fields, not both")
    if config is not None and not isinstance(config, KDRLConfig):
        raise TypeError(f"config must be a KDRLConfig, got {type(config).__name__}")
    _config = config if config is not None else KDRLConfig.from_dict(config_fields)
    _given = C.given_fields(_config) if config is not None else set(config_fields)
    return _config


def _from_environment():
    raw = os.environ.get(ENV_CONFIG, "").strip()
    if not raw:
        return KDRLConfig(), set()
    try:
        values = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"${ENV_CONFIG} must hold KDRLConfig fields as a JSON object: {e}") from None
    return KDRLConfig.from_dict(values, where=f"${ENV_CONFIG}: "), set(values)


def get_config() -> KDRLConfig:
    """The config set by :func:`set_config` / :func:`install`, else the JSON in ``$KDRL_VERL_CONFIG``, else defaults."""
    return _config if _config is not None else _from_environment()[0]


def given_fields() -> set:
    """The names of the fields the user gave (see :func:`set_config`; for ``$KDRL_VERL_CONFIG`` its JSON keys)."""
    return set(_given) if _config is not None else _from_environment()[1]


# --------------------------------------------------------------------------------------------------------------
# (a) fused hidden-state log-prob / entropy backend


def kdrl_backend_logprobs(hidden_states, vocab_weights, input_ids, temperature=1.0, bias=None):
    """``(log_probs, entropy)`` of ``input_ids`` under ``softmax(hidden_states @ vocab_weights.T / temperature)``.

    The call signature and output of verl's ``FusedLinearForPPO.forward`` (hidden ``(T, d)`` or ``(B, T, d)``,
    weight ``(V, d)``, ids of hidden's leading shape); both outputs float32, differentiable w.r.t. hidden and weight.
    """
    logp, entropy = fused_linear_logprobs(hidden_states, vocab_weights, input_ids.to(torch.int64), bias=bias,
                                          temperature=float(temperature), return_entropy=True)
    return logp, entropy


def forward_with_kdrl_backend(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                              inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                              output_hidden_states=None, return_dict=None, cache_position=None, logits_to_keep=0,
                              temperature: float = 1.0, shift_labels=None, **loss_kwargs):
    """Drop-in for verl's ``forward_with_torch_backend`` (same arguments, same ``CausalLMOutputForPPO``)."""
    from verl.models.transformers.dense_common import CausalLMOutputForPPO, forward_base_model

    outputs = forward_base_model(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                                 output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                 cache_position=cache_position)
    if not return_dict:
        raise NotImplementedError("the kdrl fused backend has to return_dict (as verl's torch backend)")
    # label for position i is token i+1: verl's convention (engine-rolled shift_labels first, e.g. under Ulysses SP)
    if shift_labels is not None:
        rolled = shift_labels
    elif labels is not None:
        rolled = torch.roll(labels, shifts=-1, dims=-1)
    elif input_ids is not None:
        rolled = torch.roll(input_ids, shifts=-1, dims=-1)
    else:
        raise RuntimeError("the kdrl fused backend needs labels or input_ids")
    log_probs, entropy = kdrl_backend_logprobs(outputs[0], self.lm_head.weight, rolled, temperature,
                                               bias=getattr(self.lm_head, "bias", None))
    return CausalLMOutputForPPO(log_probs=log_probs, entropy=entropy, past_key_values=outputs.past_key_values,
                                hidden_states=outputs.hidden_states, attentions=outputs.attentions)


def _wrap_patch_forward_with_backends(original):
    def patch_forward_with_backends(model, use_fused_kernels=False, fused_kernels_backend=None):
        if not (use_fused_kernels and fused_kernels_backend == BACKEND):
            return original(model, use_fused_kernels=use_fused_kernels, fused_kernels_backend=fused_kernels_backend)
        if model.config.model_type in _VERL_SPECIAL_MODEL_TYPES:
            raise NotImplementedError(f"impl_backend={BACKEND!r} covers dense text models; {model.config.model_type} "
                                      "has a model-specific forward in verl: use impl_backend=torch or triton")
        model._verl_fused_kernels_backend = BACKEND
        model.__class__.forward = forward_with_kdrl_backend
        print(f"Using kdrl-kernels backend for fused kernels in {model.__class__.__name__}")

    patch_forward_with_backends._kdrl_original = original
    return patch_forward_with_backends


# --------------------------------------------------------------------------------------------------------------
# (b) the registered objectives through verl's distillation-loss registry


def _padded(x, data):
    from verl.workers.utils.padding import no_padding_2_padding
    return no_padding_2_padding(x, data)


def _dense(x):
    return x.to_padded_tensor(0) if getattr(x, "is_nested", False) else x


def _inputs(model_output, data):
    """Student / teacher log-probs and the response mask as ``(B, R)``, as verl's own estimator loss reads them."""
    s = _padded(model_output["log_probs"], data).float()
    t = _padded(data["teacher_logprobs"], data).squeeze(-1).float()
    mask = data["response_mask"]
    mask = (mask.bool().to_padded_tensor(False) if mask.is_nested else mask.bool())
    if not (s.shape == t.shape == mask.shape):
        raise ValueError(f"student {tuple(s.shape)}, teacher {tuple(t.shape)} and response mask "
                         f"{tuple(mask.shape)} log-probs must have one shape")
    return s, t.detach(), mask


def _temperature(data) -> Optional[float]:
    from verl.utils import tensordict_utils as tu
    value = tu.get(data, "temperature", None)
    if isinstance(value, torch.Tensor):
        value = value.unique()
        return float(value) if value.numel() == 1 else None
    return None if value is None else float(value)


def batch_step(data) -> Optional[int]:
    """The schedule step (0 = first update) of an actor micro-batch, or None where the batch carries none.

    verl's v1 trainer stores ``global_steps`` per sample (the step its prompt went to the rollout at; verl counts
    from 1); a hand-made batch may hold one ``global_steps`` for the whole batch. Samples of different steps (an
    async trainer) are refused: the schedule is a function of the update's step.
    """
    from verl.utils import tensordict_utils as tu
    value = tu.get(data, "global_steps", None)
    if value is None:
        return None
    steps = {int(v) for v in (value.tolist() if isinstance(value, torch.Tensor) else
                              value if isinstance(value, (list, tuple)) else [value])}
    if len(steps) != 1:
        raise ValueError(f"the micro-batch holds samples of several trainer steps {sorted(steps)}; a beta schedule "
                         "needs trainer.v1.trainer_mode=sync")
    return max(steps.pop() - 1, 0)


def batch_correct(data) -> Optional[torch.Tensor]:
    """``(B,)`` bool: the response's task reward is > 0 (KDRLLoss's convention), from ``token_level_scores`` (v0)
    or ``rm_scores`` (v1: the reward sits on the response's last token); None where the batch carries neither."""
    for key in ("token_level_scores", "rm_scores"):
        if key in data.keys():
            return _dense(data[key]).float().sum(-1) > 0
    return None


def _masked_mean(x, mask):
    n = mask.sum()
    return float((x * mask).sum() / n) if n > 0 else 0.0


def resolved_config(config, distillation_config, data) -> KDRLConfig:
    """The KDRLConfig the loss runs with for this actor / distillation config (verl_checks.resolve)."""
    user = get_config()
    return C.resolve(user, given_fields(), loss_mode=distillation_config.distillation_loss.loss_mode,
                     loss_cfg=distillation_config.distillation_loss, actor=config, temperature=_temperature(data))


def _objective_terms(cfg, data, s, t, mask):
    """Per-token ``(pg, kd_weighted, beta, metrics)``: the objective's terms as KDRLLoss forms them."""
    step = batch_step(data)
    if cfg.beta_schedule != "constant" and step is None:
        raise ValueError(f"beta_schedule={cfg.beta_schedule!r} needs the batch's global_steps; none was found")
    beta = O.beta_at(step, cfg.beta, cfg.beta_schedule, cfg.beta_min, cfg.beta_decay, cfg.total_steps)
    obj = R.get_objective(cfg.objective)
    old = adv = None
    if obj.log_ratio is not None:
        old = _dense(data["old_log_probs"]).float().detach()
        adv = _dense(data["advantages"]).float()
    pg, kd = R.token_losses(s, t, old, adv if adv is not None else torch.zeros_like(s), None, cfg, beta)
    metrics = {"kdrl/beta": R.applied_kd_coef(cfg, beta)}
    m = mask.float()
    if kd is not None:
        if cfg.kd_mask == "none":
            seq_w = torch.ones(s.shape[0], device=s.device)
        else:
            correct = batch_correct(data)
            if correct is None:
                raise ValueError(f"kd_mask={cfg.kd_mask!r} needs the task reward (rm_scores or token_level_scores)")
            seq_w = O.kd_sequence_mask(correct.to(s.device), None, cfg.kd_mask).to(s.device).float()
        kd = R.applied_kd_coef(cfg, beta) * seq_w[:, None] * kd
        metrics[f"kdrl/{cfg.kl_estimator}"] = _masked_mean(O.kl_estimator(s.detach(), t, cfg.kl_estimator), m)
        metrics["kdrl/kd_mask_frac"] = _masked_mean(seq_w[:, None].expand_as(m), m)
    if pg is not None:
        weights = data.get("rollout_is_weights", None)
        if weights is not None:
            pg = pg * _dense(weights).float()
        log_ratio, a = R.clip_inputs(s.detach(), t, old, adv, cfg, beta)
        clipped = O.clip_mask(log_ratio, a, cfg.eps_low, cfg.eps_high, cfg.dual_clip).float()
        metrics["kdrl/clip_frac"] = _masked_mean(clipped, m)
        metrics["kdrl/ratio_max"] = float(torch.where(mask, log_ratio, -torch.inf).max().exp()) if mask.any() else 1.0
    metrics["kdrl/teacher_log_ratio"] = _masked_mean((s - t).detach(), m)
    return pg, kd, beta, metrics


def kdrl_distillation_loss(config, distillation_config, model_output, data):
    """verl ``DistillationLossFn`` for ``loss_mode=kdrl``: the objective's KD term per token ``(B, R)``.

    With ``use_task_rewards=True`` verl adds it (times ``distillation_loss_coef``, divided out here) to its own
    GRPO policy loss, so the total is the objective's ``pg + coef(beta) * kd_mask * k``; without, it is the loss.
    """
    loss_cfg = distillation_config.distillation_loss
    cfg = resolved_config(config, distillation_config, data)
    s, t, mask = _inputs(model_output, data)
    _, kd, _, metrics = _objective_terms(cfg, data, s, t, mask)
    weight = 1.0 / float(loss_cfg.distillation_loss_coef) if loss_cfg.use_task_rewards else 1.0
    return weight * kd, metrics


def objective_distillation_loss(config, distillation_config, model_output, data):
    """verl ``DistillationLossFn`` for ``loss_mode=kdrl_objective`` (and ``kdrl_trrd``): the whole registered
    objective per token ``(B, R)``, replacing verl's policy loss; verl aggregates it with ``loss_agg_mode``."""
    cfg = resolved_config(config, distillation_config, data)
    s, t, mask = _inputs(model_output, data)
    pg, kd, _, metrics = _objective_terms(cfg, data, s, t, mask)
    losses = torch.zeros_like(s)
    if pg is not None:
        losses = losses + pg
    if kd is not None:
        losses = losses + kd
    return losses, metrics


def _register_losses():
    from verl.trainer.distillation import losses as L

    for name, fn in ((KDRL_LOSS, kdrl_distillation_loss), (OBJECTIVE_LOSS, objective_distillation_loss),
                     (TRRD_LOSS, objective_distillation_loss)):
        if L.DISTILLATION_LOSS_REGISTRY.get(name) is fn:
            continue
        if name in L.DISTILLATION_LOSS_REGISTRY:
            raise ValueError(f"verl already has a distillation loss named {name!r}")
        L.register_distillation_loss(L.DistillationLossSettings(names=[name], use_estimator=True))(fn)


def _wrap_validate_config(original):
    """verl's driver calls ``validate_config(config, ...)`` before Ray starts: check our settings there too."""
    def validate_config(config, *args, **kwargs):
        original(config, *args, **kwargs)
        C.check_launch(config, get_config(), given_fields(), env_set=bool(os.environ.get(ENV_CONFIG, "").strip()))

    validate_config._kdrl_original = original
    return validate_config


def install(config: Optional[KDRLConfig] = None, **config_fields: Any) -> None:
    """Register the ``kdrl`` fused backend and the ``kdrl`` / ``kdrl_objective`` / ``kdrl_trrd`` distillation losses in
    verl, and add our launch checks to verl's ``validate_config`` (the driver runs it before Ray starts)."""
    global _installed
    if config is not None or config_fields:
        set_config(config, **config_fields)
    if _installed:
        return
    import verl.models.transformers.monkey_patch as mp

    import verl.utils.config as vc

    if not hasattr(mp.patch_forward_with_backends, "_kdrl_original"):
        mp.patch_forward_with_backends = _wrap_patch_forward_with_backends(mp.patch_forward_with_backends)
    if not hasattr(vc.validate_config, "_kdrl_original"):
        vc.validate_config = _wrap_validate_config(vc.validate_config)
    _register_losses()
    _installed = True


def uninstall() -> None:
    """Undo the backend and config-check patches (the registered losses stay: verl's registry has no removal)."""
    global _installed
    import verl.models.transformers.monkey_patch as mp

    import verl.utils.config as vc

    original = getattr(mp.patch_forward_with_backends, "_kdrl_original", None)
    if original is not None:
        mp.patch_forward_with_backends = original
    original = getattr(vc.validate_config, "_kdrl_original", None)
    if original is not None:
        vc.validate_config = original
    _installed = False


try:  # importing this module is the install (that is how verl's external-module hook uses it)
    import verl  # noqa: F401
except ImportError:  # verl is not installed: the functions above stay importable for documentation and tests
    pass
else:
    install()
