"""KDRL / TRRD / on-policy KD inside TRL's ``GRPOTrainer``, for multi-GPU runs under accelerate or torchrun.

TRL keeps doing what it does well (sampling, with vLLM if configured; reward functions; group advantages; the
vLLM importance-sampling ratio; data-parallel bookkeeping); this subclass changes four things:
- after scoring, it records which completions are correct (reward > ``correct_threshold``) and the teacher's
  log-probs of the sampled tokens (teacher forward without logits: ``kdrl_kernels.fused_linear_logprobs``), or the
  teacher's final hidden states when the exact KL is asked for;
- every per-token log-prob TRL asks for (the old policy's, for its importance sampling) comes from the final
  hidden states through ``kdrl_kernels.fused_linear_logprobs``;
- the loss is ``kdrl_kernels.KDRLLoss`` on the policy's final hidden states and lm_head weight, so the
  ``(tokens x vocab)`` logits are never formed (the model's forward is asked for one position's logits only),
  normalised as TRL normalises its ``loss_type`` and with TRL's vLLM importance-sampling ratio on the
  policy-gradient term;
- the loss's metrics (k2, clip fraction, beta, entropy, ...) are reduced across processes and logged as
  ``kdrl/<name>``.
Checked against TRL 1.16 (its ``_generate_and_score_completions`` / ``_calculate_rewards`` /
``_get_per_token_logps_and_entropies`` / ``_compute_loss`` hooks). TRL settings this loss does not implement are
refused at construction, not ignored. Data parallel (DDP, ZeRO-1/2) works; FSDP / ZeRO-3 do not, since the lm_head
weight is read outside the module's forward. Multi-GPU: ``accelerate launch --num_processes 8 my_script.py`` (see
kdrl/README.md).
"""
from __future__ import annotations

import dataclasses

import torch
from trl import GRPOTrainer

from kdrl_kernels import KDRLConfig, KDRLLoss, fused_linear_logprobs
from kdrl_kernels.objectives import KL_ESTIMATORS

__all__ = ["KDRLGRPOTrainer", "correctness_reward", "LOSS_TYPES"]

# TRL loss_type -> the KDRLLoss aggregation whose value, times a scalar, is TRL's normalised loss (see _loss_scale).
LOSS_TYPES = {"grpo": "seq_mean", "bnpo": "token_mean", "dr_grpo": "dr_grpo", "dapo": "token_mean",
              "luspo": "token_mean"}
# Per-token metrics averaged over all processes' tokens; the others are combined as named in _reduce_metrics.
_SUMMED, _MIN, _MAX, _RANK_MEAN = {"num_tokens"}, {"ratio_min"}, {"ratio_max"}, {"loss", "pg_loss", "kd_loss", "beta"}
# The multimodal inputs TRL 1.16 can put in a batch; the hidden-state path scores text-only models.
_MULTIMODAL = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
               "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")


def correctness_reward(completions, answer, truncated=None, **kwargs) -> list[float]:
    """TRL reward function: 1.0 where the completion's final answer matches the dataset's ``answer`` column.

    ``completions`` are strings or (conversational datasets) lists of messages; uses ``kdrl.grading``, the
    evaluation harness's grader. ``truncated``: one bool per completion, True where it hit the length limit (then
    only a closed box earns credit); ``KDRLGRPOTrainer`` passes it. A plain ``GRPOTrainer`` does not, and then
    every completion counts as finished (an unclosed box still never earns credit).
    """
    from kdrl.grading import grade_many
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    cut = [bool(t) for t in truncated] if truncated is not None else False
    return [float(ok) for ok in grade_many(texts, [str(a) for a in answer], truncated=cut)]


def completion_hidden(model, input_ids, attention_mask, logits_to_keep):
    """``(B, logits_to_keep, d)`` final hidden states predicting the last ``logits_to_keep`` tokens of ``input_ids``,
    via the model's own forward (so DDP's hooks run) with ``logits_to_keep=1``: the full logits are never computed.
    Positions count only attended tokens, so left-padded prompts keep the positions they were sampled at."""
    positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, logits_to_keep=1,
                output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1][:, -logits_to_keep - 1:-1]


def _refuse_multimodal(inputs: dict, aux_loss: bool = False):
    given = sorted(k for k, v in inputs.items() if v is not None)
    if given or aux_loss:
        raise NotImplementedError(f"KDRLGRPOTrainer scores text-only models ({', '.join(given) or 'aux loss'})")


def _head(model):
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


class KDRLGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose loss is ``KDRLLoss(kdrl_config)``, normalised as TRL's ``loss_type``.

    Args (besides GRPOTrainer's):
        kdrl_config: the loss (objective grpo | kd | kdrl | kdrl_shaping | trrd, kl_estimator k1/k2/k3/exact,
            beta schedule, kd_mask, ...). Its clip range and temperature must equal TRL's (``epsilon``,
            ``epsilon_high``, ``temperature``); its ``aggregation`` is left at the default, since TRL's
            ``loss_type`` decides the normaliser.
        teacher_model: a causal LM sharing the policy's tokenizer (needed unless the objective is grpo).
        correct_threshold: a completion counts as correct (for reward-guided KD masks) when its summed
            weighted reward exceeds this.
    ``loss_type`` may be one of ``LOSS_TYPES`` (grpo, bnpo, dr_grpo, dapo, luspo with token-level importance
    sampling); with ``objective="grpo"`` the loss and gradients equal TRL's own for the same batch (tested).
    TRL's reference-model KL (``beta``), cispo / sapo / vespo, sequence-level importance sampling, ``delta``,
    entropy masks or bonuses, off-policy masks and MoE auxiliary losses are refused.
    """

    def __init__(self, *args, kdrl_config: KDRLConfig, teacher_model=None, correct_threshold: float = 0.5,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if kdrl_config.needs_teacher and teacher_model is None:
            raise ValueError(f"kdrl_config.objective={kdrl_config.objective!r} needs teacher_model")
        self._check_supported(kdrl_config)
        self.kdrl_loss = KDRLLoss(dataclasses.replace(kdrl_config, aggregation=LOSS_TYPES[self.loss_type],
                                                      max_len=self.max_completion_length))
        self.correct_threshold = correct_threshold
        self.teacher = None
        if teacher_model is not None:
            self.teacher = teacher_model.to(self.accelerator.device).eval().requires_grad_(False)
        self._last_rewards = None

    @property
    def _needs_teacher_hidden(self) -> bool:
        cfg = self.kdrl_loss.config
        return cfg.kl_in_loss or cfg.log_exact_kl

    def _check_supported(self, cfg: KDRLConfig):
        """Refuse TRL settings this loss does not implement, rather than silently train something else."""
        args = self.args
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r} is not supported by KDRLGRPOTrainer; use one of "
                             f"{sorted(LOSS_TYPES)} (cispo, sapo and vespo have their own surrogates)")
        refused = {
            "beta != 0 (TRL's KL to a reference model; the teacher's KD term is kdrl_config.beta)": self.beta != 0.0,
            "importance_sampling_level='sequence'": self.importance_sampling_level != "token",
            "delta (two-sided clipping)": args.delta is not None,
            "top_entropy_quantile < 1": self.top_entropy_quantile < 1.0,
            "entropy_coef / use_adaptive_entropy (entropy bonus)": self._entropy_bonus_enabled,
            "off_policy_mask_threshold": self.off_policy_mask_threshold is not None,
            "a MoE router auxiliary loss (set router_aux_loss_coef=0)": self.aux_loss_enabled,
        }
        bad = [name for name, on in refused.items() if on]
        if bad:
            raise ValueError(f"KDRLGRPOTrainer does not implement {', '.join(bad)}")
        mismatched = [f"{ours}={getattr(cfg, ours)} but TRL's {theirs}={value}" for ours, theirs, value in (
            ("eps_low", "epsilon", self.epsilon_low), ("eps_high", "epsilon_high", self.epsilon_high),
            ("temperature", "temperature", self.temperature)) if getattr(cfg, ours) != value]
        if cfg.aggregation != "token_mean" or cfg.max_len is not None:
            mismatched.append(f"aggregation={cfg.aggregation!r}, max_len={cfg.max_len}: TRL's loss_type decides the "
                              "normaliser, leave them at their defaults")
        if not cfg.scale_rewards:
            mismatched.append("scale_rewards=False: TRL computes the advantages; set GRPOConfig(scale_rewards='none')")
        if mismatched:
            raise ValueError("kdrl_config disagrees with the GRPOConfig: " + "; ".join(mismatched))
        text_config = self.accelerator.unwrap_model(self.model).config.get_text_config()
        scaled = [name for name in ("final_logit_softcapping", "logit_scale", "output_multiplier",
                                    "lm_head_multiplier", "logits_scaling")
                  if getattr(text_config, name, None) not in (None, 1.0)]
        if scaled:
            raise ValueError(f"the model's logits are transformed after the lm_head ({', '.join(scaled)}); "
                             "kdrl_kernels scores hidden @ weight.T / temperature only")

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # Reward functions get every input column as a keyword: add "truncated" (no eos/pad at the end, as TRL's
        # own mask_truncated_completions decides), so correctness_reward knows which completions were cut.
        stops = {*self.eos_token_ids, self._tokenizer.pad_token_id}
        inputs = [{**x, "truncated": bool(ids) and ids[-1] not in stops}
                  for x, ids in zip(inputs, completion_ids_list)]
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_rewards = rewards_per_func  # (all processes' completions, reward functions)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        n = out["completion_ids"].shape[0]
        start = self.accelerator.process_index * n
        rewards = (self._last_rewards * self.reward_weights.to(self._last_rewards.device)).nansum(dim=1)
        out["correct"] = rewards[start:start + n] > self.correct_threshold
        if self.teacher is not None:
            out.update(self._teacher_inputs(out))
        return out

    @torch.no_grad()
    def _teacher_inputs(self, batch) -> dict:
        """``teacher_hidden`` ``(B, T, d_t)`` when the exact KL is needed, else ``teacher_logprobs`` ``(B, T)``;
        the teacher runs ``per_device_train_batch_size`` sequences at a time."""
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        t = batch["completion_ids"].shape[1]
        step = self.args.per_device_train_batch_size
        hidden = torch.cat([completion_hidden(self.teacher, input_ids[i:i + step], attention[i:i + step], t)
                            for i in range(0, input_ids.shape[0], step)])
        if self._needs_teacher_hidden:
            return {"teacher_hidden": hidden}
        targets = batch["completion_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        weight, bias = self._teacher_head()
        return {"teacher_logprobs": fused_linear_logprobs(hidden, weight, targets, bias=bias,
                                                          temperature=self.temperature,
                                                          backend=self.kdrl_loss.config.backend)}

    def _teacher_head(self):
        """The teacher's lm_head, cut to the policy's vocabulary if the config allows dropping padding rows."""
        weight, bias = _head(self.teacher)
        vocab = _head(self.accelerator.unwrap_model(self.model))[0].shape[0]
        if weight.shape[0] == vocab:
            return weight, bias
        if weight.shape[0] > vocab and self.kdrl_loss.config.truncate_teacher_vocab:
            return weight[:vocab], None if bias is None else bias[:vocab]
        raise ValueError(f"teacher lm_head has {weight.shape[0]} rows, the policy's {vocab}: set "
                         "truncate_teacher_vocab=True if the extra teacher rows are padding")

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        """TRL's per-token log-prob hook (old-policy log-probs for importance sampling), from hidden states."""
        _refuse_multimodal(multimodal, compute_aux_loss)
        weight, bias = _head(self.accelerator.unwrap_model(model))
        batch_size = batch_size or input_ids.shape[0]
        logps, entropies = [], []
        for i in range(0, input_ids.shape[0], batch_size):
            ids, att = input_ids[i:i + batch_size], attention_mask[i:i + batch_size]
            hidden = completion_hidden(model, ids, att, logits_to_keep).to(weight.dtype)
            targets = ids[:, -logits_to_keep:].masked_fill(att[:, -logits_to_keep:] == 0, -100)
            out = fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=self.temperature,
                                        backend=self.kdrl_loss.config.backend, return_entropy=compute_entropy)
            logp, entropy = out if compute_entropy else (out, None)
            logps.append(logp)
            entropies.append(entropy)
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None

    def _loss_scale(self, mask, inputs, mode):
        """The factor turning KDRLLoss's value (aggregated as ``LOSS_TYPES[loss_type]``) into TRL's loss, division
        for gradient accumulation included."""
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        b = mask.shape[0]
        if self.loss_type == "dapo":  # the generation batch's token count, cut to one accumulation window
            normaliser = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normaliser = normaliser * accumulation / self.args.steps_per_generation
            return mask.sum() / normaliser
        if self.loss_type == "grpo":  # TRL's mean runs over all B sequences, KDRLLoss's over the non-empty ones
            return (mask.sum(-1) > 0).sum() / (b * accumulation)
        if self.loss_type == "luspo":  # sum over each sequence's tokens, mean over sequences
            return mask.sum() / (b * accumulation)
        return 1.0 / accumulation  # bnpo: local token mean; dr_grpo: / (B * max_completion_length)

    def _compute_loss(self, model, inputs):
        _refuse_multimodal({k: inputs.get(k) for k in _MULTIMODAL})
        mask = inputs["completion_mask"].bool()
        if "tool_mask" in inputs:
            mask = mask & inputs["tool_mask"].bool()
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        weight, bias = _head(self.accelerator.unwrap_model(model))
        hidden = completion_hidden(model, input_ids, attention, mask.shape[1]).to(weight.dtype)
        pg_weights = None
        if self.use_vllm and self.vllm_importance_sampling_correction:  # TRL's (B, T) or sequence-level (B, 1)
            pg_weights = inputs["importance_sampling_ratio"].float().expand(mask.shape)
        teacher = {}
        if "teacher_hidden" in inputs:
            t_weight, t_bias = self._teacher_head()
            teacher = dict(teacher_hidden=inputs["teacher_hidden"], teacher_weight=t_weight, teacher_bias=t_bias)
        elif "teacher_logprobs" in inputs:
            teacher = dict(teacher_logprobs=inputs["teacher_logprobs"])
        loss, metrics = self.kdrl_loss(
            hidden, weight, inputs["completion_ids"], mask, advantages=inputs["advantages"], bias=bias,
            correct=inputs.get("correct"), old_logprobs=inputs.get("old_per_token_logps"), pg_weights=pg_weights,
            step=self.state.global_step, **teacher)
        mode = "train" if self.model.training else "eval"
        for key, value in self._reduce_metrics(metrics).items():
            self._metrics[mode][f"kdrl/{key}"].append(value)
        return loss * self._loss_scale(mask, inputs, mode)

    def _metric_names(self) -> list[str]:
        """The names KDRLLoss returns for this trainer's config (fixed, so every process gathers the same vector)."""
        cfg = self.kdrl_loss.config
        names = ["loss", "num_tokens", "beta", "pg_loss", "kd_loss", "clip_frac", "ratio_mean", "ratio_min",
                 "ratio_max", "logp_mean"]
        if self.teacher is not None:
            names += list(KL_ESTIMATORS) + ["teacher_logp_mean"]
        if cfg.kl_in_loss or cfg.log_exact_kl:
            names.append("exact_kl")
        if cfg.compute_entropy:
            names.append("entropy")
        return names

    def _reduce_metrics(self, metrics: dict) -> dict:
        """This micro-batch's KDRLLoss metrics over all processes, with one ``accelerator.gather``: per-token means
        weighted by each process's token count (as TRL's own token metrics), ``num_tokens`` summed, ``ratio_min`` /
        ``ratio_max`` the extremes, and the losses and beta the mean over processes (DDP averages their gradients).
        A process with no tokens contributes only its count."""
        names = self._metric_names()
        unknown = set(metrics) - set(names)
        if unknown:
            raise RuntimeError(f"KDRLLoss returned metrics {sorted(unknown)} the cross-process reduction does not know")
        device = self.accelerator.device
        local = torch.tensor([metrics.get(k, float("nan")) for k in names], dtype=torch.float64, device=device)
        table = self.accelerator.gather(local[None]).reshape(-1, len(names))  # (processes, metrics)
        counts = table[:, names.index("num_tokens")]
        has_tokens = counts > 0
        out = {}
        for j, name in enumerate(names):
            col = table[:, j]
            if name in _SUMMED:
                out[name] = float(col.sum())
            elif name in _RANK_MEAN:
                out[name] = float(col.nanmean())
            elif not bool(has_tokens.any()):
                continue
            elif name in _MIN:
                out[name] = float(col[has_tokens].min())
            elif name in _MAX:
                out[name] = float(col[has_tokens].max())
            else:
                out[name] = float((col[has_tokens] * counts[has_tokens]).sum() / counts[has_tokens].sum())
        return out
