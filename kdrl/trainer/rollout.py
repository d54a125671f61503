"""Rollouts: prompts -> G sampled responses each -> rewards -> group-normalised advantages -> a padded batch.

The batch layout puts every response at the same column: prompts are left-padded to width ``P``, responses
right-padded to width ``T``, so ``input_ids`` is ``(B, P + T)`` and the hidden state at column ``P - 1 + t``
predicts response token ``t``. Position ids count real tokens only, so left padding does not shift positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kdrl_kernels.objectives import group_advantages

__all__ = ["RolloutBatch", "PromptSampler", "build_batch", "rollout_metrics"]


@dataclass
class RolloutBatch:
    """One step's sampled data. ``B = prompts * G`` rows, grouped consecutively (row ``i`` is in group ``i // G``).

    input_ids ``(B, P+T)`` int64, attention_mask ``(B, P+T)`` int64, position_ids ``(B, P+T)`` int64;
    targets ``(B, T)`` int64 (response tokens, pad after the end), mask ``(B, T)`` bool (True on response tokens);
    rewards ``(B,)`` float32, correct ``(B,)`` bool, group_ids ``(B,)`` int64, advantages ``(B,)`` float32;
    truncated ``(B,)`` bool (hit the token budget); prompt_width ``P``.
    """
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    rewards: torch.Tensor
    correct: torch.Tensor
    group_ids: torch.Tensor
    advantages: torch.Tensor
    truncated: torch.Tensor
    prompt_width: int

    def __len__(self) -> int:
        return self.targets.shape[0]

    def rows(self, start: int, stop: int) -> "RolloutBatch":
        """Rows ``start:stop`` (all columns kept, so every slice has the same ``P`` and ``T``)."""
        fields = {k: (v[start:stop] if torch.is_tensor(v) else v) for k, v in vars(self).items()}
        return RolloutBatch(**fields)


class PromptSampler:
    """Yields training problems in a seeded order, reshuffled each epoch; its position is saved in checkpoints."""

    def __init__(self, problems: list, seed: int = 0, shuffle: bool = True):
        if not problems:
            raise ValueError("PromptSampler needs at least one problem")
        self.problems, self.seed, self.shuffle = problems, seed, shuffle
        self.epoch, self.index = 0, 0

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.problems)))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.problems), generator=g).tolist()

    def next(self, n: int) -> list:
        """The next ``n`` problems (crossing into a new, reshuffled epoch when needed)."""
        out, order = [], self._order()
        while len(out) < n:
            if self.index == len(order):
                self.epoch, self.index = self.epoch + 1, 0
                order = self._order()
            out.append(self.problems[order[self.index]])
            self.index += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def build_batch(prompt_ids: list[list[int]], responses: list[list[list[int]]], correct: list[list[bool]],
                truncated: list[list[bool]], pad_id: int, scale_advantages: bool = True) -> RolloutBatch:
    """Pad prompts and responses into a :class:`RolloutBatch` and compute group-normalised advantages.

    prompt_ids: one token list per prompt; responses / correct / truncated: per prompt, G entries each
    (G may not vary between prompts). Rewards are 1.0 for a correct response, else 0.0.
    ``scale_advantages=False`` gives Dr. GRPO's unscaled advantages.
    """
    if len(prompt_ids) != len(responses):
        raise ValueError(f"responses must have one group per prompt: {len(responses)} groups, "
                         f"{len(prompt_ids)} prompts")
    group = {len(g) for g in responses}
    if len(group) != 1:
        raise ValueError(f"every prompt needs the same number of responses, got group sizes {sorted(group)}")
    rows = [(p, r) for p, rs in zip(prompt_ids, responses) for r in rs]
    width_p = max(len(p) for p, _ in rows)
    width_t = max(1, max(len(r) for _, r in rows))
    n = len(rows)
    input_ids = torch.full((n, width_p + width_t), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for i, (p, r) in enumerate(rows):
        input_ids[i, width_p - len(p):width_p] = torch.tensor(p, dtype=torch.long)
        input_ids[i, width_p:width_p + len(r)] = torch.tensor(r, dtype=torch.long)
        attention[i, width_p - len(p):width_p + len(r)] = 1
    position_ids = (attention.cumsum(-1) - 1).clamp_min(0)
    mask = attention[:, width_p:].bool()
    rewards = torch.tensor([float(c) for cs in correct for c in cs])
    group_ids = torch.arange(len(prompt_ids)).repeat_interleave(group.pop())
    return RolloutBatch(
        input_ids=input_ids, attention_mask=attention, position_ids=position_ids,
        targets=input_ids[:, width_p:].clone(), mask=mask, rewards=rewards, correct=rewards > 0,
        group_ids=group_ids, advantages=group_advantages(rewards, group_ids, scale=scale_advantages),
        truncated=torch.tensor([t for ts in truncated for t in ts]), prompt_width=width_p)


def _mean(x: torch.Tensor) -> float | None:
    return float(x.float().mean()) if x.numel() else None  # None (JSON null): e.g. no correct response


def rollout_metrics(batch: RolloutBatch) -> dict[str, float]:
    """Reward and length statistics of a batch (lengths in response tokens; None when a subset is empty)."""
    lengths = batch.mask.sum(-1).float()
    groups_solved = torch.zeros(int(batch.group_ids.max()) + 1).index_add_(0, batch.group_ids, batch.rewards)
    return {
        "reward_mean": _mean(batch.rewards),
        "reward_std": float(batch.rewards.std(unbiased=False)),
        "accuracy": _mean(batch.correct),
        "len_mean": _mean(lengths),
        "len_correct": _mean(lengths[batch.correct]),
        "len_incorrect": _mean(lengths[~batch.correct]),
        "truncated_frac": _mean(batch.truncated),
        # Groups where all G responses agree give zero advantage: no policy-gradient signal from them.
        "zero_adv_group_frac": _mean((groups_solved == 0) | (groups_solved == batch.rewards.numel() /
                                                             groups_solved.numel())),
    }
