"""KDRL / TRRD / on-policy KD inside TRL's ``GRPOTrainer``, for multi-GPU runs under accelerate or torchrun.

TRL keeps doing what it does well (sampling, with vLLM if configured; reward functions; group advantages;
data-parallel bookkeeping); this subclass changes three things:
- after scoring, it records which completions are correct (reward > ``correct_threshold``) and the teacher's
  log-probs of the sampled tokens (teacher forward without logits: ``kdrl_kernels.fused_linear_logprobs``);
- the loss is ``kdrl_kernels.KDRLLoss`` on the policy's final hidden states and lm_head weight, so the
  ``(tokens x vocab)`` logits are never formed (the model's forward is asked for one position's logits only);
- the loss's metrics (k2, clip fraction, beta, entropy, ...) are logged as ``kdrl/<name>``.
Checked against TRL 1.16 (its ``_generate_and_score_completions`` / ``_calculate_rewards`` / ``_compute_loss``
hooks). Data parallel (DDP, ZeRO-1/2) works; FSDP / ZeRO-3 do not, since the lm_head weight is read outside
the module's forward. Multi-GPU: ``accelerate launch --num_processes 8 my_script.py`` (see kdrl/README.md).
"""
from __future__ import annotations

import torch
from trl import GRPOTrainer

from kdrl_kernels import KDRLConfig, KDRLLoss, fused_linear_logprobs

__all__ = ["KDRLGRPOTrainer", "correctness_reward"]


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


def _hidden_and_positions(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """``(B, T, d)`` final hidden states predicting ``completion_ids`` (``(B, T)``), via the model's own forward
    (so DDP's hooks run) with ``logits_to_keep=1``: the full logits are never computed."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention = torch.cat([prompt_mask, completion_mask], dim=1)
    positions = (attention.cumsum(-1) - 1).clamp_min(0)  # left-padded prompts keep their true positions
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, logits_to_keep=1,
                output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1][:, prompt_ids.shape[1] - 1:-1]


class KDRLGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose loss is ``KDRLLoss(kdrl_config)``.

    Args (besides GRPOTrainer's):
        kdrl_config: the loss (objective grpo | kd | kdrl | kdrl_shaping | trrd, beta schedule, kd_mask, ...).
            ``kl_estimator="exact"`` is not available here (only the teacher's log-probs are kept).
        teacher_model: a causal LM sharing the policy's tokenizer (needed unless the objective is grpo).
        correct_threshold: a completion counts as correct (for reward-guided KD masks) when its summed
            weighted reward exceeds this.
    TRL's own ``beta``/``loss_type`` settings are ignored: the KDRL config decides the loss.
    """

    def __init__(self, *args, kdrl_config: KDRLConfig, teacher_model=None, correct_threshold: float = 0.5,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if kdrl_config.needs_teacher and teacher_model is None:
            raise ValueError(f"kdrl_config.objective={kdrl_config.objective!r} needs teacher_model")
        if kdrl_config.kl_estimator == "exact" or kdrl_config.log_exact_kl:
            raise ValueError("KDRLGRPOTrainer keeps teacher log-probs only: use kl_estimator k1/k2/k3 and "
                             "log_exact_kl=False (kdrl.train supports the exact KL)")
        self.kdrl_loss = KDRLLoss(kdrl_config)
        self.correct_threshold = correct_threshold
        self.teacher = None
        if teacher_model is not None:
            self.teacher = teacher_model.to(self.accelerator.device).eval().requires_grad_(False)
        self._last_rewards = None

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
            with torch.no_grad():
                hidden = _hidden_and_positions(self.teacher, out["prompt_ids"], out["prompt_mask"],
                                               out["completion_ids"], out["completion_mask"])
                targets = out["completion_ids"].masked_fill(out["completion_mask"] == 0, -100)
                t_logp = fused_linear_logprobs(hidden, self._teacher_weight(), targets)
            out["teacher_logprobs"] = t_logp
        return out

    def _teacher_weight(self) -> torch.Tensor:
        """The teacher's lm_head, cut to the policy's vocabulary if the config allows dropping padding rows."""
        weight = self.teacher.get_output_embeddings().weight
        vocab = self.accelerator.unwrap_model(self.model).get_output_embeddings().weight.shape[0]
        if weight.shape[0] == vocab:
            return weight
        if weight.shape[0] > vocab and self.kdrl_loss.config.truncate_teacher_vocab:
            return weight[:vocab]
        raise ValueError(f"teacher lm_head has {weight.shape[0]} rows, the policy's {vocab}: set "
                         "truncate_teacher_vocab=True if the extra teacher rows are padding")

    def _compute_loss(self, model, inputs):
        mask = inputs["completion_mask"].bool()
        if "tool_mask" in inputs:
            mask = mask & inputs["tool_mask"].bool()
        hidden = _hidden_and_positions(model, inputs["prompt_ids"], inputs["prompt_mask"],
                                       inputs["completion_ids"], inputs["completion_mask"])
        weight = self.accelerator.unwrap_model(model).get_output_embeddings().weight
        loss, metrics = self.kdrl_loss(
            hidden, weight, inputs["completion_ids"], mask, advantages=inputs["advantages"],
            correct=inputs.get("correct"), old_logprobs=inputs.get("old_per_token_logps"),
            teacher_logprobs=inputs.get("teacher_logprobs"), step=self.state.global_step)
        mode = "train" if self.model.training else "eval"
        for key, value in metrics.items():
            self._metrics[mode][f"kdrl/{key}"].append(value)
        # Like TRL's own losses: each accumulated micro-batch contributes 1/accumulation of the step's gradient.
        return loss / (self.current_gradient_accumulation_steps if mode == "train" else 1.0)
