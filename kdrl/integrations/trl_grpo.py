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
- the loss's metrics (k2, clip fraction, beta, entropy, ...) are reduced across processes as
  ``kdrl_kernels.registry`` declares and logged as ``kdrl/<name>``, beside TRL's own ``entropy`` and
  ``clip_ratio/*``, computed as TRL computes them.
What an objective needs (teacher log-probs or hidden states), which metrics it reports and how they reduce are read
from ``kdrl_kernels.registry``, so an objective registered there works here unchanged. Checked against TRL 1.16:
the hooks overridden (``HOOKS``) are compared with the installed TRL at construction (``trl_hooks``). Every
``KDRLConfig`` field is either honoured or refused at construction with the reason (kdrl/README.md lists them).
Data parallel (DDP, ZeRO-1/2) works; FSDP / ZeRO-3 are refused, since the lm_head weight is read outside the
module's forward. Multi-GPU: ``accelerate launch --num_processes 8 my_script.py`` (see kdrl/README.md).
"""
from __future__ import annotations

import dataclasses

import torch
from trl import GRPOTrainer

from kdrl_kernels import KDRLConfig, KDRLLoss, fused_linear_logprobs, teacher_head
from kdrl_kernels import registry as R

from .trl_hooks import check_trl_hooks

__all__ = ["KDRLGRPOTrainer", "correctness_reward", "LOSS_TYPES", "HOOKS", "ATTRIBUTES"]

# TRL loss_type -> the KDRLLoss aggregation whose value, times a scalar, is TRL's normalised loss (see _loss_scale).
LOSS_TYPES = {"grpo": "seq_mean", "bnpo": "token_mean", "dr_grpo": "dr_grpo", "dapo": "token_mean",
              "luspo": "token_mean"}
# TRL 1.16's GRPOTrainer methods this subclass overrides (or, compute_loss, relies on to call _compute_loss), with
# the parameters it was written for, and the attributes it reads; checked at construction (kdrl/integrations/trl_hooks).
HOOKS = {
    "compute_loss": "(self, model, inputs, return_outputs=False, num_items_in_batch=None)",
    "_compute_loss": "(self, model, inputs)",
    "_calculate_rewards": "(self, inputs, prompts, completions, completion_ids_list)",
    "_generate_and_score_completions": "(self, inputs)",
    "_get_per_token_logps_and_entropies": (
        "(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False, "
        "compute_aux_loss=False, pixel_values=None, image_grid_thw=None, num_images=None, pixel_attention_mask=None, "
        "spatial_shapes=None, num_tiles=None, image_sizes=None, token_type_ids=None, mm_token_type_ids=None, "
        "image_position_ids=None)"),
}
ATTRIBUTES = ("loss_type", "epsilon_low", "epsilon_high", "temperature", "beta", "importance_sampling_level",
              "top_entropy_quantile", "_entropy_bonus_enabled", "off_policy_mask_threshold", "aux_loss_enabled",
              "use_vllm", "vllm_importance_sampling_correction", "eos_token_ids", "_tokenizer", "reward_weights",
              "num_generations", "num_generations_eval", "max_completion_length", "_metrics", "is_fsdp_enabled")
# TRL's clip metrics (its _compute_loss, loss types grpo/bnpo/dr_grpo/dapo/luspo), gathered beside ours: the counts of
# low / high / either-clipped tokens, and each process's least per-sequence low-clip share and largest high one.
_CLIP_COLUMNS = ("clip_low_sum", "clip_high_sum", "clip_region_sum", "clip_low_min", "clip_high_max")
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


def _check_config(cfg: KDRLConfig, has_teacher: bool):
    """Refuse the ``KDRLConfig`` fields TRL decides itself, or that would fail at the first step, before TRL builds
    anything. (Fields compared with the GRPOConfig are checked in ``_check_supported``.)"""
    if not isinstance(cfg, KDRLConfig):
        raise TypeError(f"kdrl_config must be a KDRLConfig, got {type(cfg).__name__}")
    needs = R.teacher_input(cfg)
    if needs != "none" and not has_teacher:
        why = "log_exact_kl=True" if needs == "hidden" and not R.get_objective(cfg.objective).needs_teacher else (
            f"objective={cfg.objective!r}")
        raise ValueError(f"kdrl_config ({why}) needs teacher_model")
    default = KDRLConfig()
    refused = {
        f"aggregation={cfg.aggregation!r} / max_len={cfg.max_len}: TRL's loss_type decides the normaliser "
        "(and dr_grpo's length is GRPOConfig.max_completion_length)":
            (cfg.aggregation, cfg.max_len) != (default.aggregation, default.max_len),
        f"scale_rewards={cfg.scale_rewards}: TRL computes the advantages, set GRPOConfig(scale_rewards=...)":
            cfg.scale_rewards != default.scale_rewards,
        f"adv_eps={cfg.adv_eps}: TRL computes the advantages with its own epsilon":
            cfg.adv_eps != default.adv_eps,
    }
    bad = [reason for reason, on in refused.items() if on]
    if bad:
        raise ValueError("kdrl_config does not apply under TRL: " + "; ".join(bad))


class KDRLGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose loss is ``KDRLLoss(kdrl_config)``, normalised as TRL's ``loss_type``.

    Args (besides GRPOTrainer's):
        kdrl_config: the loss (any objective of ``kdrl_kernels.registry``, kl_estimator k1/k2/k3/exact, beta
            schedule, kd_mask, dual_clip, ...). Its clip range and temperature must equal TRL's (``epsilon``,
            ``epsilon_high``, ``temperature``); ``aggregation``, ``max_len``, ``scale_rewards`` and ``adv_eps`` stay
            at their defaults, since TRL's ``loss_type`` decides the normaliser and TRL computes the advantages.
        teacher_model: a causal LM sharing the policy's tokenizer (needed when the objective reads a teacher).
        correct_threshold: a completion counts as correct (for reward-guided KD masks) when its summed
            weighted reward exceeds this.
        trl_clip_metrics: log TRL's ``clip_ratio/*``. When TRL keeps old log-probs (``num_iterations > 1``,
            ``steps_per_generation`` above the accumulation steps, vLLM importance sampling) they need the current
            log-probs, which ``KDRLLoss`` keeps to itself: one more no-grad lm_head pass per micro-batch (measured
            on a 2-core CPU at 512 tokens x 151,936 vocabulary: 28% (fp32) to 46% (bf16) of the loss's own
            forward + backward). False skips it and those metrics.
    ``loss_type`` may be one of ``LOSS_TYPES`` (grpo, bnpo, dr_grpo, dapo, luspo with token-level importance
    sampling); with ``objective="grpo"`` the loss and gradients equal TRL's own for the same batch (tested).
    TRL's reference-model KL (``beta``), cispo / sapo / vespo, sequence-level importance sampling, ``delta``,
    entropy masks or bonuses, off-policy masks and MoE auxiliary losses are refused.
    """

    def __init__(self, *args, kdrl_config: KDRLConfig, teacher_model=None, correct_threshold: float = 0.5,
                 trl_clip_metrics: bool = True, **kwargs):
        check_trl_hooks(GRPOTrainer, HOOKS)
        _check_config(kdrl_config, teacher_model is not None)
        super().__init__(*args, **kwargs)
        check_trl_hooks(GRPOTrainer, HOOKS, ATTRIBUTES, self)
        self._check_supported(kdrl_config)
        self.kdrl_loss = KDRLLoss(dataclasses.replace(kdrl_config, aggregation=LOSS_TYPES[self.loss_type],
                                                      max_len=self.max_completion_length))
        self.correct_threshold = correct_threshold
        self.trl_clip_metrics = bool(trl_clip_metrics)
        self.teacher = None
        if teacher_model is not None:
            self.teacher = teacher_model.to(self.accelerator.device).eval().requires_grad_(False)
        self._last_rewards = None

    def _check_supported(self, cfg: KDRLConfig):
        """Refuse TRL settings this loss does not implement, rather than silently train something else."""
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
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
            "FSDP (the lm_head weight is read outside the module's forward, so it must not be sharded)":
                self.is_fsdp_enabled,
            "DeepSpeed ZeRO-3 (the lm_head weight must not be partitioned)": is_deepspeed_zero3_enabled(),
        }
        bad = [name for name, on in refused.items() if on]
        if bad:
            raise ValueError(f"KDRLGRPOTrainer does not implement {', '.join(bad)}")
        mismatched = [f"{ours}={getattr(cfg, ours)} but TRL's {theirs}={value}" for ours, theirs, value in (
            ("eps_low", "epsilon", self.epsilon_low), ("eps_high", "epsilon_high", self.epsilon_high),
            ("temperature", "temperature", self.temperature)) if getattr(cfg, ours) != value]
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
        """TRL's batch plus ``correct`` ``(B,)`` bool (this completion's reward > ``correct_threshold``),
        ``group_correct`` ``(B,)`` bool (some completion of its group, on any process, is correct: what
        ``kd_mask="group_all_wrong"`` needs, since TRL shuffles a group's completions over micro-batches) and the
        teacher's input."""
        out = super()._generate_and_score_completions(inputs)
        n = out["completion_ids"].shape[0]
        start = self.accelerator.process_index * n
        rewards = (self._last_rewards * self.reward_weights.to(self._last_rewards.device)).nansum(dim=1)
        correct = rewards > self.correct_threshold  # every process's completions, groups consecutive as in TRL
        group = self.num_generations if self.model.training else self.num_generations_eval
        group_correct = correct.view(-1, group).any(dim=1).repeat_interleave(group)
        out["correct"], out["group_correct"] = correct[start:start + n], group_correct[start:start + n]
        if self.teacher is not None:
            out.update(self._teacher_inputs(out))
        return out

    @torch.no_grad()
    def _teacher_inputs(self, batch) -> dict:
        """``teacher_hidden`` ``(B, T, d_t)`` when the objective reads the teacher's whole distribution
        (``registry.teacher_input == "hidden"``), else ``teacher_logprobs`` ``(B, T)`` float32; the teacher runs
        ``per_device_train_batch_size`` sequences at a time."""
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        t = batch["completion_ids"].shape[1]
        step = self.args.per_device_train_batch_size
        hidden = torch.cat([completion_hidden(self.teacher, input_ids[i:i + step], attention[i:i + step], t)
                            for i in range(0, input_ids.shape[0], step)])
        cfg = self.kdrl_loss.config
        if R.teacher_input(cfg) == "hidden":
            return {"teacher_hidden": hidden}
        targets = batch["completion_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        weight, bias = self._teacher_head()
        return {"teacher_logprobs": fused_linear_logprobs(hidden, weight, targets, bias=bias,
                                                          temperature=self.temperature, backend=cfg.backend,
                                                          chunk_size=cfg.chunk_size)}

    def _teacher_head(self):
        """The teacher's lm_head, cut to the policy's vocabulary if ``truncate_teacher_vocab`` allows it."""
        weight, bias = _head(self.teacher)
        vocab = _head(self.accelerator.unwrap_model(self.model))[0].shape[0]
        return teacher_head(vocab, weight, bias, truncate=self.kdrl_loss.config.truncate_teacher_vocab)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        """TRL's per-token log-prob hook (old-policy log-probs for importance sampling), from hidden states."""
        _refuse_multimodal(multimodal, compute_aux_loss)
        weight, bias = _head(self.accelerator.unwrap_model(model))
        cfg = self.kdrl_loss.config
        batch_size = batch_size or input_ids.shape[0]
        logps, entropies = [], []
        for i in range(0, input_ids.shape[0], batch_size):
            ids, att = input_ids[i:i + batch_size], attention_mask[i:i + batch_size]
            hidden = completion_hidden(model, ids, att, logits_to_keep).to(weight.dtype)
            targets = ids[:, -logits_to_keep:].masked_fill(att[:, -logits_to_keep:] == 0, -100)
            out = fused_linear_logprobs(hidden, weight, targets, bias=bias, temperature=self.temperature,
                                        backend=cfg.backend, chunk_size=cfg.chunk_size,
                                        return_entropy=compute_entropy)
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
        cfg = self.kdrl_loss.config
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
        correct, group_ids = inputs.get("correct"), None
        if cfg.kd_mask == "group_all_wrong":
            # The micro-batch holds only part of each group, so the group's verdict was taken over the whole
            # generation batch at scoring time: each sequence stands for its own group, "correct" = its group's.
            correct = inputs["group_correct"]
            group_ids = torch.arange(mask.shape[0], device=mask.device)
        old = inputs.get("old_per_token_logps")
        loss, metrics = self.kdrl_loss(
            hidden, weight, inputs["completion_ids"], mask, advantages=inputs["advantages"], bias=bias,
            correct=correct, group_ids=group_ids, old_logprobs=old, pg_weights=pg_weights,
            step=self.state.global_step, **teacher)
        clip = self._trl_clip_stats(hidden, weight, bias, inputs, mask, old)
        mode = "train" if self.model.training else "eval"
        for key, value in self._reduce_metrics(metrics, clip).items():
            self._metrics[mode][key].append(value)
        return loss * self._loss_scale(mask, inputs, mode)

    @torch.no_grad()
    def _trl_clip_stats(self, hidden, weight, bias, inputs, mask, old) -> list[float]:
        """This process's share of TRL's ``clip_ratio/*`` metrics (``_CLIP_COLUMNS``), computed as TRL's
        ``_compute_loss`` does: TRL's ratio ``exp(log p - old log p)`` against ``1 -/+ epsilon`` with the advantage's
        sign. TRL's ratio is 1 on-policy (``old`` None); off-policy it needs the current log-probs, one more no-grad
        pass over the lm_head (the loss's own pass keeps them inside ``KDRLLoss``)."""
        if not self.trl_clip_metrics:
            return [0.0, 0.0, 0.0, float("nan"), float("nan")]
        if old is None:
            ratio = torch.ones(mask.shape, device=mask.device)
        else:
            cfg = self.kdrl_loss.config
            targets = inputs["completion_ids"].masked_fill(~mask, -100)
            logp = fused_linear_logprobs(hidden.detach(), weight.detach(), targets,
                                         bias=None if bias is None else bias.detach(), temperature=self.temperature,
                                         backend=cfg.backend, chunk_size=cfg.chunk_size)
            ratio = torch.exp(logp - old.float())
        adv = inputs["advantages"]
        adv = adv[:, None] if adv.dim() == 1 else adv
        low = (ratio < 1 - self.epsilon_low) & (adv < 0) & mask
        high = (ratio > 1 + self.epsilon_high) & (adv > 0) & mask
        per_seq = mask.sum(-1)  # TRL's masked_seq_mean: NaN for a sequence without tokens, skipped by nanmin/nanmax
        low_seq, high_seq = (x.sum(-1) / per_seq for x in (low.float(), high.float()))
        extreme = (lambda x, f: float(f(x[per_seq > 0])) if bool((per_seq > 0).any()) else float("nan"))
        return [float(low.sum()), float(high.sum()), float((low | high).sum()), extreme(low_seq, torch.min),
                extreme(high_seq, torch.max)]

    def _metric_names(self) -> list[str]:
        """The names KDRLLoss returns for this trainer's config (fixed, so every process gathers the same vector)."""
        return R.metric_names(self.kdrl_loss.config, teacher=self.teacher is not None)

    def _reduce_metrics(self, metrics: dict, clip: list) -> dict:
        """This micro-batch's metrics over all processes, with one ``accelerator.gather``: KDRLLoss's as
        ``registry.reduce_metrics`` reduces processes (equal shares: DDP averages their gradients), logged as
        ``kdrl/<name>``; TRL's ``entropy`` (the token-weighted mean over processes, as TRL's ``global_masked_mean``)
        and ``clip_ratio/*`` as TRL's ``_compute_loss`` computes them. NaN marks a metric a process did not report."""
        names = self._metric_names()
        unknown = set(metrics) - set(names)
        if unknown:
            raise RuntimeError(f"KDRLLoss returned metrics {sorted(unknown)} the cross-process reduction does not know")
        device = self.accelerator.device
        local = torch.tensor([metrics.get(k, float("nan")) for k in names] + clip, dtype=torch.float64, device=device)
        table = self.accelerator.gather(local[None]).reshape(-1, local.numel()).cpu()  # (processes, columns)
        parts = [{k: v for k, v in zip(names, row[:len(names)].tolist()) if v == v} for row in table]
        out = {f"kdrl/{k}": v for k, v in R.reduce_metrics(parts).items()}
        tokens = max(float(table[:, names.index("num_tokens")].sum()), 1.0)
        clip_table = dict(zip(_CLIP_COLUMNS, table[:, len(names):].T))
        if self.kdrl_loss.config.compute_entropy:
            out["entropy"] = out.get("kdrl/entropy", 0.0)  # TRL logs 0 when no process has tokens
        if not self.trl_clip_metrics:
            return out
        out["clip_ratio/low_mean"] = float(clip_table["clip_low_sum"].sum()) / tokens
        out["clip_ratio/high_mean"] = float(clip_table["clip_high_sum"].sum()) / tokens
        out["clip_ratio/region_mean"] = float(clip_table["clip_region_sum"].sum()) / tokens
        out["clip_ratio/low_min"] = _nan_extreme(clip_table["clip_low_min"], torch.min)
        out["clip_ratio/high_max"] = _nan_extreme(clip_table["clip_high_max"], torch.max)
        return out


def _nan_extreme(column, f) -> float:
    """TRL's nanmin / nanmax: NaN when every entry is NaN."""
    kept = column[~column.isnan()]
    return float(f(kept)) if kept.numel() else float("nan")
