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
   log-probs verl already has (the student's from the actor forward, the teacher's from verl's teacher server):
   - ``distillation.distillation_loss.loss_mode=kdrl``: KDRL's KD term, ``beta(step) * kd_mask * k`` with ``k`` the
     ``KDRLConfig.kl_estimator`` (k2 by default), the beta schedule and the reward-guided mask of ``KDRLConfig``.
     With ``use_task_rewards=True`` verl adds it to its own GRPO/PPO policy loss (KDRL's joint form); the per-token
     term is divided by ``distillation_loss_coef`` so the total is ``pg + beta(step) * kd`` whatever that coefficient.
     With ``use_task_rewards=False`` it is pure on-policy KD (coefficient 1, mask still applied).
   - ``loss_mode=kdrl_trrd``: TRRD, the clipped surrogate with the log-ratio to the geometric mixture of the old
     policy and the teacher, with verl's advantages, clip range (``clip_ratio_low/high``), dual clip
     (``clip_ratio_c``) and rollout importance weights. It replaces verl's policy loss, so it needs
     ``use_task_rewards=False``.
   Both need ``use_policy_gradient=False`` (verl's other mode feeds ``-loss`` to a policy loss as an advantage) and
   ``loss_max_clamp=null`` (verl clamps per-token losses to +-10 by default, which would cut the TRRD surrogate).

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
from dataclasses import fields
from typing import Any, Optional

import torch

from kdrl_kernels import KDRLConfig, fused_linear_logprobs
from kdrl_kernels import objectives as O

__all__ = ["install", "set_config", "get_config", "kdrl_backend_logprobs", "forward_with_kdrl_backend",
           "kdrl_distillation_loss", "trrd_distillation_loss", "BACKEND", "KDRL_LOSS", "TRRD_LOSS", "ENV_CONFIG"]

BACKEND = "kdrl"
KDRL_LOSS = "kdrl"
TRRD_LOSS = "kdrl_trrd"
ENV_CONFIG = "KDRL_VERL_CONFIG"
# model types for which verl has a model-specific fused forward (vision-language); ours is the dense-text one
_VERL_SPECIAL_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "qwen3_5", "qwen3_5_moe")

_config: Optional[KDRLConfig] = None
_installed = False


def set_config(config: Optional[KDRLConfig] = None, **config_fields) -> KDRLConfig:
    """Set the :class:`KDRLConfig` the registered losses use (``set_config(cfg)`` or ``set_config(beta=...)``)."""
    global _config
    if config is not None and config_fields:
        raise ValueError("pass either a KDRLConfig or keyword fields, not both")
    if config is not None and not isinstance(config, KDRLConfig):
        raise TypeError(f"config must be a KDRLConfig, got {type(config).__name__}")
    _config = config if config is not None else KDRLConfig(**config_fields)
    return _config


def get_config() -> KDRLConfig:
    """The config set by :func:`set_config` / :func:`install`, else the JSON in ``$KDRL_VERL_CONFIG``, else defaults."""
    if _config is not None:
        return _config
    raw = os.environ.get(ENV_CONFIG, "").strip()
    if not raw:
        return KDRLConfig()
    try:
        values = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"${ENV_CONFIG} must hold KDRLConfig fields as a JSON object: {e}") from None
    known = {f.name for f in fields(KDRLConfig)}
    if not isinstance(values, dict) or set(values) - known:
        raise ValueError(f"${ENV_CONFIG}: unknown KDRLConfig fields {sorted(set(values) - known)}"
                         if isinstance(values, dict) else f"${ENV_CONFIG} must be a JSON object")
    return KDRLConfig(**values)


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
# (b) KDRL and TRRD through verl's distillation-loss registry


def _padded(x, data):
    from verl.workers.utils.padding import no_padding_2_padding
    return no_padding_2_padding(x, data)


def _dense(x):
    return x.to_padded_tensor(0) if getattr(x, "is_nested", False) else x


def _inputs(distillation_config, model_output, data, name):
    """Student / teacher log-probs and the response mask as ``(B, R)``, as verl's own estimator loss reads them."""
    loss_cfg = distillation_config.distillation_loss
    if loss_cfg.use_policy_gradient:
        raise ValueError(f"loss_mode={name} needs distillation.distillation_loss.use_policy_gradient=False "
                         "(it is a loss, not a reward for verl's policy gradient)")
    if loss_cfg.loss_max_clamp is not None:
        raise ValueError(f"loss_mode={name} needs distillation.distillation_loss.loss_max_clamp=null "
                         "(verl would clamp the per-token loss)")
    s = _padded(model_output["log_probs"], data).float()
    t = _padded(data["teacher_logprobs"], data).squeeze(-1).float()
    mask = data["response_mask"]
    mask = (mask.bool().to_padded_tensor(False) if mask.is_nested else mask.bool())
    if not (s.shape == t.shape == mask.shape):
        raise ValueError(f"student {tuple(s.shape)}, teacher {tuple(t.shape)} and response mask "
                         f"{tuple(mask.shape)} log-probs must have one shape")
    return s, t.detach(), mask


def _step(data):
    from verl.utils import tensordict_utils as tu
    step = tu.get_non_tensor_data(data=data, key="global_steps", default=None)
    return None if step is None else int(step)


def _masked_mean(x, mask):
    n = mask.sum()
    return float((x * mask).sum() / n) if n > 0 else 0.0


def _sequence_kd_weight(cfg, data, batch, device):
    if cfg.kd_mask == "none":
        return torch.ones(batch, device=device)
    if cfg.kd_mask == "group_all_wrong":
        raise NotImplementedError("kd_mask='group_all_wrong' is not offered in verl: a loss sees one micro-batch, "
                                  "which need not hold every response of a group; use 'incorrect' or 'none'")
    if "token_level_scores" not in data:
        raise ValueError(f"kd_mask={cfg.kd_mask!r} needs the batch's token_level_scores (the task reward)")
    scores = _dense(data["token_level_scores"]).float()
    correct = scores.sum(-1) > 0  # KDRLLoss's convention: a response is correct when its reward is > 0
    return O.kd_sequence_mask(correct, None, cfg.kd_mask).to(device)


def kdrl_distillation_loss(config, distillation_config, model_output, data):
    """verl ``DistillationLossFn`` for ``loss_mode=kdrl``: per-token ``beta(step) / coef * kd_mask * k`` ``(B, R)``."""
    cfg = get_config()
    if cfg.kl_estimator == "exact":
        raise ValueError("kl_estimator='exact' needs the teacher's hidden states; verl provides its log-probs only")
    loss_cfg = distillation_config.distillation_loss
    expected = "kdrl" if loss_cfg.use_task_rewards else "kd"
    if cfg.objective != expected:
        raise ValueError(f"loss_mode={KDRL_LOSS} with use_task_rewards={loss_cfg.use_task_rewards} is "
                         f"KDRLConfig(objective={expected!r}), got objective={cfg.objective!r}")
    s, t, mask = _inputs(distillation_config, model_output, data, KDRL_LOSS)
    step = _step(data)
    if cfg.beta_schedule != "constant" and step is None:
        raise ValueError(f"beta_schedule={cfg.beta_schedule!r} needs the batch's global_steps; none was found")
    if loss_cfg.use_task_rewards:
        coef = float(loss_cfg.distillation_loss_coef)
        if coef <= 0:
            raise ValueError("distillation_loss_coef must be > 0 with loss_mode=kdrl (the KD weight is beta)")
        beta = O.beta_at(step, cfg.beta, cfg.beta_schedule, cfg.beta_min, cfg.beta_decay, cfg.total_steps)
        weight = beta / coef
    else:
        beta, weight = 1.0, 1.0
    kd = O.kl_estimator(s, t, cfg.kl_estimator)
    seq_w = _sequence_kd_weight(cfg, data, s.shape[0], s.device)
    losses = weight * seq_w[:, None] * kd
    m = mask.float()
    metrics = {"kdrl/beta": float(beta), f"kdrl/{cfg.kl_estimator}": _masked_mean(kd.detach(), m),
               "kdrl/kd_mask_frac": _masked_mean(seq_w[:, None].expand_as(m), m)}
    return losses, metrics


def trrd_distillation_loss(config, distillation_config, model_output, data):
    """verl ``DistillationLossFn`` for ``loss_mode=kdrl_trrd``: TRRD's clipped surrogate per token ``(B, R)``."""
    cfg = get_config()
    if cfg.objective != "trrd":
        raise ValueError(f"loss_mode={TRRD_LOSS} is KDRLConfig(objective='trrd'), got objective={cfg.objective!r}")
    s, t, mask = _inputs(distillation_config, model_output, data, TRRD_LOSS)
    if distillation_config.distillation_loss.use_task_rewards:
        raise ValueError(f"loss_mode={TRRD_LOSS} replaces verl's policy loss: set "
                         "distillation.distillation_loss.use_task_rewards=False (advantages still come from rewards)")
    old = _dense(data["old_log_probs"]).float().detach()
    adv = _dense(data["advantages"]).float()
    clip_low = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
    clip_high = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
    dual = config.get("clip_ratio_c", 3.0)
    log_ratio = O.trrd_log_ratio(s, old, t, cfg.trrd_alpha, cfg.trrd_clamp)
    losses = O.clipped_surrogate(log_ratio, adv, clip_low, clip_high, dual)
    weights = data.get("rollout_is_weights", None)
    if weights is not None:
        losses = losses * _dense(weights).float()
    m = mask.float()
    clipped = O.clip_mask(log_ratio.detach(), adv, clip_low, clip_high, dual).float()
    metrics = {"kdrl/trrd_clipfrac": _masked_mean(clipped, m),
               "kdrl/teacher_log_ratio": _masked_mean((s - t).detach(), m)}
    return losses, metrics


def _register_losses():
    from verl.trainer.distillation import losses as L

    for name, fn in ((KDRL_LOSS, kdrl_distillation_loss), (TRRD_LOSS, trrd_distillation_loss)):
        if L.DISTILLATION_LOSS_REGISTRY.get(name) is fn:
            continue
        if name in L.DISTILLATION_LOSS_REGISTRY:
            raise ValueError(f"verl already has a distillation loss named {name!r}")
        L.register_distillation_loss(L.DistillationLossSettings(names=[name], use_estimator=True))(fn)


def install(config: Optional[KDRLConfig] = None, **config_fields: Any) -> None:
    """Register the ``kdrl`` fused backend and the ``kdrl`` / ``kdrl_trrd`` distillation losses in verl."""
    global _installed
    if config is not None or config_fields:
        set_config(config, **config_fields)
    if _installed:
        return
    import verl.models.transformers.monkey_patch as mp

    if not hasattr(mp.patch_forward_with_backends, "_kdrl_original"):
        mp.patch_forward_with_backends = _wrap_patch_forward_with_backends(mp.patch_forward_with_backends)
    _register_losses()
    _installed = True


def uninstall() -> None:
    """Undo the backend patch (the registered losses stay: verl's registry has no removal)."""
    global _installed
    import verl.models.transformers.monkey_patch as mp

    original = getattr(mp.patch_forward_with_backends, "_kdrl_original", None)
    if original is not None:
        mp.patch_forward_with_backends = original
    _installed = False


try:  # importing this module is the install (that is how verl's external-module hook uses it)
    import verl  # noqa: F401
except ImportError:  # verl is not installed: the functions above stay importable for documentation and tests
    pass
else:
    install()
