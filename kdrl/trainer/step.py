"""One training step's primitives, shared by the trainer (:mod:`kdrl.trainer.loop`) and the testbed: hidden
states aligned with the sampled tokens, fp32 master weights, and the micro-batched forward/backward through
``kdrl_kernels.KDRLLoss`` whose summed gradient equals the whole batch's."""
from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import math
import time
from contextlib import contextmanager

import torch

from kdrl.trainer.rollout import RolloutBatch
from kdrl_kernels import KDRLLoss
from kdrl_kernels.registry import reduce_metrics

__all__ = ["decoder", "hidden_states", "Timer", "MasterWeights", "backward_microbatches", "kd_groups_whole",
           "optimizer_step", "release_free_memory"]


def decoder(model):
    """The transformer body (no LM head) of a causal LM, also through a peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


def hidden_states(model, batch: RolloutBatch) -> torch.Tensor:
    """``(B, T, d)`` final hidden states aligned with ``batch.targets`` (column ``P - 1 + t`` predicts token t)."""
    p = batch.prompt_width
    out = decoder(model)(input_ids=batch.input_ids[:, :-1], attention_mask=batch.attention_mask[:, :-1],
                         position_ids=batch.position_ids[:, :-1], use_cache=False)
    return out.last_hidden_state[:, p - 1:]


class Timer(dict):
    """Accumulates wall-clock seconds per phase: ``with timer("generation"): ...``."""

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - start


class MasterWeights:
    """fp32 master copies of trainable low-precision parameters; the optimizer updates the copies.

    After each backward, :meth:`accumulate` adds the model's (bf16) gradients into fp32 ``.grad`` of the masters
    and frees the model's, so gradient accumulation over micro-batches happens in fp32; :meth:`publish` writes
    the updated masters back into the model. With ``enabled=False`` the optimizer acts on the model's own tensors.
    """

    def __init__(self, named_params: dict[str, torch.nn.Parameter], enabled: bool):
        self.model_params = named_params
        self.enabled = enabled
        self.params = ({n: torch.nn.Parameter(p.detach().float().clone()) for n, p in named_params.items()}
                       if enabled else named_params)

    def accumulate(self) -> None:
        if not self.enabled:
            return
        for name, p in self.model_params.items():
            if p.grad is not None:
                master = self.params[name]
                master.grad = p.grad.float() if master.grad is None else master.grad.add_(p.grad)
                p.grad = None

    @torch.no_grad()
    def publish(self) -> None:
        if self.enabled:
            for name, p in self.model_params.items():
                p.copy_(self.params[name])


# Each micro-batch's share of the mini-batch's normaliser, per aggregation mode of KDRLConfig.
_SHARES = {"token_mean": lambda m: float(m.sum()), "seq_mean": lambda m: float((m.sum(-1) > 0).sum()),
           "dr_grpo": lambda m: float(m.shape[0])}


def backward_microbatches(model, loss_fn: KDRLLoss, batch: RolloutBatch, *, micro_batch_size: int,
                          teacher_hidden=None, teacher_weight=None, teacher_logprobs=None, old_logprobs=None,
                          step: int | None = None, after_backward=None) -> dict:
    """Forward/backward ``batch`` in micro-batches; the summed gradient equals that of the loss on the whole batch.

    ``KDRLLoss`` normalises each call by its own rows (tokens, sequences or B * T, per ``aggregation``), so each
    micro-loss is scaled by its share of the batch's normaliser before backward. ``teacher_hidden (B, T, d_t)``,
    ``teacher_logprobs (B, T)`` and ``old_logprobs (B, T)`` are sliced along with the batch. ``after_backward()`` runs after each backward
    (the fp32 master accumulation). Returns the batch's loss metrics, reduced as ``kdrl_kernels.registry.METRICS``
    says (the micro-batches weighted by their shares).
    """
    if loss_fn.config.kd_mask == "group_all_wrong":
        batch = kd_groups_whole(batch)
    share = _SHARES[loss_fn.config.aggregation]
    total = max(share(batch.mask), 1.0)
    weight = model.get_output_embeddings().weight
    parts, shares = [], []
    for i in range(0, len(batch), micro_batch_size):
        part, rows = batch.rows(i, i + micro_batch_size), slice(i, i + micro_batch_size)
        scale = share(part.mask) / total
        if scale == 0.0:
            continue
        loss, metrics = loss_fn(
            hidden_states(model, part), weight, part.targets, part.mask,
            advantages=part.advantages, correct=part.correct, group_ids=part.group_ids,
            old_logprobs=None if old_logprobs is None else old_logprobs[rows],
            teacher_hidden=None if teacher_hidden is None else teacher_hidden[rows],
            teacher_logprobs=None if teacher_logprobs is None else teacher_logprobs[rows],
            teacher_weight=teacher_weight, step=step)
        (loss * scale).backward()
        if after_backward is not None:
            after_backward()
        parts.append(metrics)
        shares.append(scale)
    return reduce_metrics(parts, shares)


def kd_groups_whole(batch: RolloutBatch) -> RolloutBatch:
    """``batch`` with ``correct`` replaced by "some response of my group is correct", computed over all its rows.

    ``kd_mask=group_all_wrong`` decides per group, but ``KDRLLoss`` only sees the rows of one micro-batch; with this
    per-group value a micro-batch (or update mini-batch) that holds part of a group gets the whole group's answer.
    Idempotent. Use only for ``group_all_wrong`` (``incorrect`` needs the per-response value).
    """
    solved = torch.zeros(int(batch.group_ids.max()) + 1).index_add_(0, batch.group_ids, batch.correct.float())
    return dataclasses.replace(batch, correct=solved[batch.group_ids] > 0)


def optimizer_step(optimizer: torch.optim.Optimizer, params, *, lr: float, step: int, warmup_steps: int,
                   grad_clip: float) -> float:
    """Linear warmup of the learning rate over ``warmup_steps`` optimizer steps (``step`` counts from 0), clipping
    of the global gradient norm of ``params`` to ``grad_clip`` (0 = off), the optimizer step, and gradients freed.
    Returns the gradient norm before clipping."""
    for group in optimizer.param_groups:
        group["lr"] = lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else lr
    norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None],
                                          grad_clip if grad_clip > 0 else math.inf)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


_LIBC = None


def _available_fraction() -> float:
    """MemAvailable / MemTotal from /proc/meminfo (1.0 where it cannot be read)."""
    try:
        info = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        return int(info["MemAvailable"].split()[0]) / int(info["MemTotal"].split()[0])
    except (OSError, KeyError, ValueError, ZeroDivisionError):
        return 1.0


def release_free_memory(below: float = 0.25) -> bool:
    """When less than ``below`` of the machine's memory is available, give the heap's free pages back to the
    system (glibc ``malloc_trim``; a no-op elsewhere). Returns whether it trimmed.

    Every step allocates tensors of new shapes (responses differ in length) and glibc keeps what they free inside
    its heap: a KDRL run on the real pair grew by about 0.1 GB per step (13 to 16 GB in 18 steps) beside a vLLM
    engine holding 6 GB of the same 24. Trimming gives back about 10 GB, but the next step then touches those pages
    afresh, which in this VM cost 15-20 s (the update went from 22-30 s to 42-49 s when trimming every step; a
    fixed low mmap threshold was worse, 58-63 s): so only when memory runs short, every few dozen steps.
    """
    global _LIBC
    if _available_fraction() >= below:
        return False
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
            _LIBC = libc if libc is not None and hasattr(libc, "malloc_trim") else False
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)
    return bool(_LIBC)
