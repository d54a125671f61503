"""The actor's batch as verl 0.9.1's v1 trainer assembles it, run through verl's own code on CPU without Ray.

What runs is verl's: the agent loop's ``_agent_loop_postprocess`` (what a rollout writes to the TransferQueue:
prompts, responses, response mask, ``rm_scores``, teacher log-probs as the teacher server returns them, the
per-sample ``global_steps``), the trainer's ``_compute_advantage`` (GRPO advantages from ``rm_scores``) and
``_update_actor`` (the extra info it hands the actor), the worker's ``TrainingWorker.train_mini_batch`` and
``train_batch`` (mini-batches, default keys, global token count), the FSDP engine's ``forward_backward_batch``
(micro-batches, packed ``use_remove_padding`` input with ``shift_labels``, the model forward, the output slicing)
and the loss entry ``distillation_ppo_loss``.

What stands in (the pieces that need Ray, a GPU or a server): an in-memory TransferQueue (``FakeTQ``, put/get by
key with verl's own ``list_of_dict_to_tensordict``), the teacher server (its output format, ``(S, 1)`` with the
log-prob of token ``c + 1`` at position ``c`` and a 0 at the end, filled from a tiny teacher model), the old-policy
log-prob pass (the trainer writes ``old_log_probs`` as ``_compute_old_log_prob`` would), and the FSDP wrapping (the
engine object is built without ``__init__``: a plain module, one process, a gloo group of one).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from types import SimpleNamespace

import torch
from tensordict import TensorDict
from tensordict.tensorclass import NonTensorData, NonTensorStack

from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput
from verl.trainer.ppo.v1 import agent_loop_tq, trainer_base
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync as PPOTrainer
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
from verl.workers.engine_workers import TrainingWorker
from transfer_queue import KVBatchMeta

VERL_CONFIG_DIR = os.path.join(os.path.dirname(trainer_base.__file__), "..", "..", "config")


class FakeTQ:
    """TransferQueue's key-value calls the trainer and the agent loop use, in memory."""

    def __init__(self):
        self.rows: dict = {}

    def kv_batch_put(self, keys, partition_id, fields=None, tags=None):
        for i, key in enumerate(keys):
            row = self.rows.setdefault((partition_id, key), {})
            if fields is not None:
                for name in fields.keys():
                    value = fields.get(name)
                    if isinstance(value, NonTensorStack):
                        row[name] = value[i].data if hasattr(value[i], "data") else value.tolist()[i]
                    elif isinstance(value, NonTensorData):
                        row[name] = value.data
                    else:
                        row[name] = value[i]
        return KVBatchMeta(keys=list(keys), tags=list(tags) if tags else [{} for _ in keys],
                           partition_id=partition_id)

    async def async_kv_batch_put(self, keys, partition_id, fields=None, tags=None):
        return self.kv_batch_put(keys, partition_id, fields, tags)

    async def async_kv_put(self, *args, **kwargs):
        return None

    def kv_batch_get(self, keys, partition_id, select_fields=None):
        rows = [self.rows[(partition_id, k)] for k in keys]
        names = select_fields if select_fields is not None else list(rows[0])
        names = [n for n in names if all(n in r for r in rows)]  # TQ returns the fields the rows hold
        return tu.list_of_dict_to_tensordict([{n: r[n] for n in names} for r in rows])

    def materialize(self, meta: KVBatchMeta) -> TensorDict:
        """What the worker receives for ``meta`` (verl.utils.transferqueue_utils._async_meta_to_realdata): every
        field of the rows, then the batch's extra info as non-tensor data."""
        td = self.kv_batch_get(meta.keys, meta.partition_id)
        for key, val in meta.extra_info.items():
            tu.assign_non_tensor_data(tensor_dict=td, key=key, val=val)
        return td


def launch_config(overrides):
    """verl's own Hydra launch config (ppo_trainer.yaml) with ``overrides``, as ``main_ppo`` composes it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=os.path.abspath(VERL_CONFIG_DIR), version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(overrides))


def rollout_fields(fake_tq, prompts, responses, rewards, teacher_logprobs, step, n):
    """Run verl's agent-loop post-processing for each response (``n`` per prompt) into ``fake_tq``; returns keys."""
    stub = SimpleNamespace(processor=None)

    async def _no_score(outputs, kwargs):
        return None

    async def _teacher(output, prompt_ids, response_ids, validate, sample_kwargs):
        # the teacher server's answer as verl's vLLM teacher returns it (extract_prompt_logprobs): (S, 1)
        output.extra_fields["teacher_ids"] = torch.tensor(prompt_ids[1:] + response_ids + [0])[:, None]
        output.extra_fields["teacher_logprobs"] = sample_kwargs.pop("_teacher")[:, None]

    stub._compute_score = _no_score
    stub._compute_teacher_logprobs = _teacher
    stub._compute_multi_modal_inputs = lambda output, input_ids: {}
    worker_cls = agent_loop_tq.AgentLoopWorkerTQ.__ray_metadata__.modified_class
    stub._compute_position_ids = lambda *a, **k: worker_cls._compute_position_ids(stub, *a, **k)
    # AgentLoopWorkerTQ is a Ray actor class: take the method from the class Ray wraps (its tracing wrapper calls
    # the method unchanged when no trace context is passed)
    postprocess = agent_loop_tq.AgentLoopWorkerTQ.__ray_metadata__.modified_class.__dict__["_agent_loop_postprocess"]
    keys = []
    for i, (p, r, rew, t) in enumerate(zip(prompts, responses, rewards, teacher_logprobs)):
        out = AgentLoopOutput(prompt_ids=p, response_ids=r, response_mask=[1] * len(r), reward_score=float(rew),
                              num_turns=2, metrics=AgentLoopMetrics())
        uid = f"p{i // n}"
        kwargs = dict(uid=uid, session_id=i % n, global_steps=step, index=i // n, data_source="test", _teacher=t)
        asyncio.run(postprocess(stub, out, False, **kwargs))
        keys.append(f"{uid}_{i % n}_0")
    return keys


class _Profiler:
    rank = 0

    def check_enable(self):
        return False

    def step(self):
        return None


class _RecordingSGD(torch.optim.SGD):
    """lr 0: records the gradients of the update instead of moving the weights."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.grads = []

    def step(self, closure=None):
        self.grads.append({id(p): p.grad.detach().clone() for g in self.param_groups for p in g["params"]
                           if p.grad is not None})


def engine_for(model, micro_batch_size):
    """verl's FSDP engine object around a plain module on CPU (its __init__ builds FSDP from a model path)."""
    eng = FSDPEngineWithLMHead.__new__(FSDPEngineWithLMHead)
    eng.module = model
    eng.optimizer = _RecordingSGD(model.parameters())
    eng.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(eng.optimizer, lambda _: 1.0)
    eng.optimizer_config = SimpleNamespace(clip_grad=1e9)
    eng.engine_config = SimpleNamespace(forward_only=False, use_dynamic_bsz=False, max_token_len_per_gpu=None,
                                        micro_batch_size_per_gpu=micro_batch_size, use_fused_kernels=True,
                                        entropy_checkpointing=False, entropy_from_logits_with_chunking=False)
    eng.ulysses_device_mesh = None
    eng.ulysses_sequence_parallel_size = 1
    eng.use_ulysses_sp = False
    eng.ulysses_parallel_group = None
    eng.pad_to_length = False
    eng._autocast_dtype = torch.float32
    eng.scaler = None
    eng._qat_enabled = False
    eng._is_offload_param = eng._is_offload_optimizer = False
    eng.mode = None
    return eng


def ensure_process_group():
    if not torch.distributed.is_initialized():
        path = tempfile.mktemp(prefix="verl_v1_gloo_")
        torch.distributed.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)


@contextlib.contextmanager
def cpu_device():
    """verl's platform layer falls back to CUDA where no accelerator is found (verl/utils/device.py:120 ->
    verl/plugin/platform/platform_cuda.py:73, ``torch.cuda.current_device()``): point the engine's device look-ups
    at the CPU for the duration."""
    from verl.workers import engine_workers
    from verl.workers.engine import base
    from verl.workers.engine.fsdp import transformer_impl

    memory = SimpleNamespace(max_memory_allocated=lambda: 0, max_memory_reserved=lambda: 0)
    patches = [(transformer_impl, "get_device_id", lambda: "cpu"), (transformer_impl, "get_device_name", lambda: "cpu"),
               (base, "get_device_name", lambda: "cpu"), (engine_workers, "get_torch_device", lambda: memory)]
    saved = [(m, n, getattr(m, n)) for m, n, _ in patches]
    for m, n, v in patches:
        setattr(m, n, v)
    try:
        yield
    finally:
        for m, n, v in saved:
            setattr(m, n, v)


def update_actor(config, fake_tq, meta, model, loss_fn, micro_batch_size):
    """verl's trainer ``_update_actor`` -> (worker) ``train_mini_batch`` -> engine -> ``loss_fn``.

    Returns ``(actor_metrics, batches)``: the trainer's reduced metrics and the TensorDicts the loss saw.
    """
    ensure_process_group()
    seen = []

    def recording_loss(model_output, data, dp_group=None):
        seen.append(data)
        return loss_fn(model_output=model_output, data=data, dp_group=dp_group)

    worker = TrainingWorker.__new__(TrainingWorker)
    worker.engine = engine_for(model, micro_batch_size)
    worker.engine_config = worker.engine.engine_config
    worker.model_config = {"use_remove_padding": True}
    worker.loss_fn = recording_loss
    worker.profiler = _Profiler()
    worker.flops_counter = None
    worker.device_name = "cpu"

    def _update(batch):
        out = TrainingWorker.train_mini_batch(worker, fake_tq.materialize(batch))
        out = out.copy()
        metrics = tu.get(out, "metrics")
        metrics["mfu"] = [0.0]
        return {"metrics": metrics}

    trainer = PPOTrainer.__new__(PPOTrainer)
    trainer.config = config
    trainer.distillation_config = omega_conf_to_dataclass(config.distillation)
    trainer.actor_rollout_wg = SimpleNamespace(update_actor=_update)
    metrics: dict = {}
    with cpu_device():
        PPOTrainer._update_actor(trainer, meta, metrics)
    return metrics, seen, worker.engine.optimizer.grads


def compute_advantage(config, fake_tq, meta):
    """verl's trainer ``_compute_advantage`` (GRPO from ``rm_scores``) on the rows in ``fake_tq``."""
    trainer = PPOTrainer.__new__(PPOTrainer)
    trainer.config = config
    metrics: dict = {}
    return PPOTrainer._compute_advantage(trainer, meta, metrics)


@contextlib.contextmanager
def fake_tq():
    """An in-memory TransferQueue in place of the real one in verl's trainer and agent loop, for a ``with`` block."""
    fake, saved = FakeTQ(), (trainer_base.tq, agent_loop_tq.tq)
    trainer_base.tq = agent_loop_tq.tq = fake
    try:
        yield fake
    finally:
        trainer_base.tq, agent_loop_tq.tq = saved


__all__ = ["FakeTQ", "launch_config", "rollout_fields", "update_actor", "compute_advantage", "fake_tq",
           "cpu_device"]
