"""The training loop (``python -m kdrl.train`` is its command line).

One step = sample G responses for each of a few prompts -> grade them -> group-normalised advantages ->
teacher hidden states of the sampled tokens (no gradient) -> student forward/backward through
``kdrl_kernels.KDRLLoss`` in micro-batches -> optimizer step -> push the new weights to the generator ->
log, checkpoint, maybe evaluate. GRPO, on-policy KD, KDRL (joint / shaping, constant or annealed beta,
reward-guided masks) and TRRD differ only in the ``loss`` section of the config.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

from kdrl.models import EXPORT_CARD, model_source
from kdrl.trainer.checkpoint import checkpoint_bytes, commit_checkpoint, load_checkpoint, write_checkpoint
from kdrl.trainer.config import ConfigError, TrainConfig, validate
from kdrl.trainer.logging import MetricsLogger, Progress, SampleLog
from kdrl.trainer.resume import config_changes
from kdrl.trainer.rollout import PromptSampler, RolloutBatch, build_batch, rollout_metrics
from kdrl.trainer.rundir import hold, open_run_dir
from kdrl.trainer.step import (MasterWeights, Timer, backward_microbatches, hidden_states, kd_groups_whole,
                               optimizer_step, release_free_memory)
from kdrl_kernels import KDRLLoss, registry, teacher_head

__all__ = ["Trainer", "write_export_card"]


def write_export_card(path: Path, cfg: TrainConfig, step: int, objective: str) -> None:
    """``<path>/kdrl_model.json``: what the exported model was trained from and how (``kdrl.models.model_source``
    reads it, so evaluation results and leaderboards label its weights)."""
    m = cfg.model
    card = {"base_model": m.student, "base_source": model_source(m.student), "objective": objective, "steps": step,
            "trained": (f"LoRA rank {m.lora_rank} merged" if m.lora_rank else "full fine-tuning") + f", {m.dtype}",
            "teacher": m.teacher, "run_dir": str(cfg.run.output_dir)}
    (Path(path) / EXPORT_CARD).write_text(json.dumps(card, indent=1) + "\n")


def _size(n_bytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes:.0f} B"


def _millions(params) -> str:
    return f"{sum(p.numel() for p in params) / 1e6:.1f}M"


def _untied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop later names of tensors that share storage (tied embeddings / lm_head): safetensors refuses aliases,
    and loaders of tied models take the embedding alone."""
    seen, out = set(), {}
    for name, tensor in state.items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            out[name] = tensor
    return out


def _eval_suffix(metrics: dict) -> str:
    """`` | eval acc 0.281 len 250.3 cut 0.031 kl 0.270`` for a record with an evaluation, else ''."""
    if "eval_accuracy" not in metrics:
        return ""
    kl = f" kl {metrics['eval_kl']:.4f}" if metrics.get("eval_kl") is not None else ""
    return (f"  | eval acc {metrics['eval_accuracy']:.3f} len {metrics['eval_len_mean']:.1f} "
            f"cut {metrics.get('eval_truncated_frac', 0.0):.3f}{kl}")


class Trainer:
    """Holds the models, optimizer, generator and data position of one run. :meth:`run` trains to the end.

    From construction to the end of :meth:`run` (or :meth:`close`) the run directory is locked: a second Trainer
    on it, in this process or another, is refused. ``fresh``: move a run already in ``run.output_dir`` aside and
    start at step 0 (``--fresh``). Start-up problems (config, run directory, checkpoint) raise ConfigError.
    """

    def __init__(self, cfg: TrainConfig, allow_config_change: bool = False, started: float | None = None,
                 fresh: bool = False):
        try:
            validate(cfg)  # every configuration error before any model is loaded
        except (ValueError, TypeError) as err:
            raise ConfigError(str(err)) from None
        self.cfg = cfg
        self.say = say = Progress(cfg.run.progress, start=started)
        self.output_dir = Path(cfg.run.output_dir)
        self.loss_fn = KDRLLoss(cfg.loss)  # validate() made the loss section the run's KDRLConfig
        lc = self.loss_fn.config
        say(f"config ok: {registry.describe(lc)}; {cfg.rollout.prompts_per_step} prompts x "
            f"{cfg.rollout.group_size} samples x <= {cfg.rollout.max_new_tokens} tokens per step, "
            f"{cfg.run.steps} step{'' if cfg.run.steps == 1 else 's'}")
        for line in self.output_lines():
            say(line)
        # One writer per directory, no run overwritten, the newest intact checkpoint (kdrl.trainer.rundir).
        self._lock, ckpt = open_run_dir(self.output_dir, resume=cfg.run.resume, fresh=fresh)
        try:
            if ckpt is not None:
                self._check_resume(ckpt, allow_config_change)
            self._load(cfg, ckpt)
        except BaseException:
            self._lock.release()
            raise

    def _load(self, cfg: TrainConfig, ckpt: Path | None) -> None:
        """Models, optimizer, data, the checkpoint ``ckpt`` (if any) and the generator."""
        from kdrl.data import load_task
        from kdrl.models import load_model_and_tokenizer, resolve_model
        say, lc = self.say, self.loss_fn.config
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        torch.manual_seed(cfg.run.seed)
        if registry.teacher_input(lc) == "none" and cfg.model.teacher and not cfg.run.eval_kl:
            print(f"kdrl.train: loss.objective={lc.objective} reads no teacher: model.teacher={cfg.model.teacher!r} "
                  "is not loaded", file=sys.stderr)
        dtype = getattr(torch, cfg.model.dtype)
        say(f"loading the student {cfg.model.student} ({cfg.model.dtype}) ...")
        t0 = time.perf_counter()
        self.student_path = resolve_model(cfg.model.student)
        self.model, self.tokenizer = load_model_and_tokenizer(self.student_path, dtype=dtype)
        say(f"student loaded from {self.student_path}: {_millions(self.model.parameters())} parameters "
            f"({time.perf_counter() - t0:.1f}s)")
        self.teacher = self.teacher_server = None
        if lc.needs_teacher and cfg.model.teacher_backend == "vllm":
            from kdrl.trainer.teacher import serve_teacher
            self.teacher_server = serve_teacher(cfg, self.tokenizer, say)
        elif lc.needs_teacher or cfg.run.eval_kl:  # eval_kl: the teacher is measured against, never trained to
            say(f"loading the teacher {cfg.model.teacher} ({cfg.model.dtype}) ...")
            t0 = time.perf_counter()
            self.teacher, teacher_tok = load_model_and_tokenizer(resolve_model(cfg.model.teacher), dtype=dtype)
            self.teacher.requires_grad_(False).eval()
            if teacher_tok.get_vocab() != self.tokenizer.get_vocab():
                raise ConfigError(f"model.teacher={cfg.model.teacher!r} must share the student's tokenizer (the KD "
                                  "terms compare log-probs of the same token ids)")
            try:  # a padded teacher vocabulary needs loss.truncate_teacher_vocab: say so now, not at step 1
                teacher_head(self.model.get_output_embeddings().weight.shape[0],
                             self.teacher.get_output_embeddings().weight, truncate=lc.truncate_teacher_vocab)
            except ValueError as err:
                raise ConfigError(f"model.teacher={cfg.model.teacher!r}: {err} (loss.truncate_teacher_vocab)") from None
            say(f"teacher loaded: {_millions(self.teacher.parameters())} parameters "
                f"({time.perf_counter() - t0:.1f}s)")
        self._setup_trainable(cfg)
        n_train = sum(p.numel() for p in self.master.params.values())
        n_bytes = sum(p.numel() * p.element_size() for p in self.master.params.values())
        say(f"training {'LoRA adapters' if cfg.model.lora_rank else 'all weights'}: {n_train / 1e6:.2f}M "
            f"parameters; a checkpoint is ~{_size(3 * n_bytes)} (weights + AdamW's two moments)")
        self.problems = load_task(cfg.data.task, limit=cfg.data.limit)
        say(f"{len(self.problems)} problems from {cfg.data.task}")
        self.sampler = PromptSampler(self.problems, seed=cfg.run.seed, shuffle=cfg.data.shuffle)
        self.step = 0
        self.resumed = ckpt is not None  # a step-0 checkpoint holds the start evaluation (run.eval_at_start)
        if ckpt is not None:
            state = load_checkpoint(ckpt, self.master.params, self.optimizer, verify=False)  # open_run_dir did
            self.master.publish()
            self.sampler.load_state_dict(state["sampler"])
            self.step = state["step"]
            say(f"resumed from {ckpt} at step {self.step}")
        say(f"starting the {cfg.rollout.backend} generator ...")
        t0 = time.perf_counter()
        self.generator = self._make_generator()
        say(f"generator ready ({time.perf_counter() - t0:.1f}s)")
        self._first_step = True

    def output_lines(self) -> list[str]:
        """Where everything this run writes goes, one line each (printed at start)."""
        run, out = self.cfg.run, self.output_dir
        every = f"every {run.save_every} steps and at the end" if run.save_every else "at the end"
        lines = [f"run directory {out}/",
                 f"  per-step metrics   {out / 'metrics.jsonl'}",
                 f"  sampled responses  {out / 'samples.jsonl'}",
                 f"  checkpoints        {out / 'checkpoints'}/step_NNNNNN ({every}; the newest "
                 f"{run.keep_checkpoints} kept)"]
        if run.plot:
            lines.append(f"  curves (at end)    {out / 'curves.png'}")
        lines.append(f"  plot any time      python -m kdrl.trainer.plot {out / 'metrics.jsonl'}")
        if run.export_final:
            lines.append(f"  final model        {out / 'final'}/ (at the end"
                         + (", LoRA merged)" if self.cfg.model.lora_rank else ")"))
        if run.tensorboard:
            lines.append(f"  TensorBoard        {out / 'tensorboard'}/")
        return lines

    def _check_resume(self, ckpt: Path, allow_config_change: bool) -> None:
        """Say what is resumed; refuse a changed training config unless ``allow_config_change`` (then log it)."""
        try:
            state = json.loads((ckpt / "state.json").read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{ckpt / 'state.json'} cannot be read ({type(err).__name__}: {err})") from None
        print(f"kdrl.train: resuming from {ckpt} (step {state['step']}); records of later steps in metrics.jsonl "
              "and samples.jsonl are dropped", file=sys.stderr)
        changes = config_changes(state.get("config") or {}, self.cfg.to_dict())
        if not changes:
            return
        listing = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
        if not allow_config_change:
            raise ConfigError(f"resuming {ckpt} with a changed config ({listing}): use another run.output_dir, "
                              "pass --fresh to move this run aside and start over, or pass --allow-config-change "
                              "to continue with the new values")
        print(f"kdrl.train: config changed on resume at step {state['step']}: {listing} (recorded in "
              f"{self.output_dir / 'config_changes.jsonl'})", file=sys.stderr)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with (self.output_dir / "config_changes.jsonl").open("a") as f:
            f.write(json.dumps({"step": state["step"], "checkpoint": str(ckpt),
                                "changes": {k: {"old": a, "new": b} for k, (a, b) in changes.items()}}) + "\n")

    def _setup_trainable(self, cfg: TrainConfig) -> None:
        """Wrap with LoRA if asked, pick the trainable tensors, build fp32 masters and the AdamW optimizer."""
        if cfg.model.lora_rank:
            from peft import LoraConfig, get_peft_model
            self.model = get_peft_model(self.model, LoraConfig(
                r=cfg.model.lora_rank, lora_alpha=cfg.model.lora_alpha, target_modules="all-linear"))
        if cfg.model.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
            if cfg.model.lora_rank:  # frozen embeddings: checkpointed blocks still need an input that wants grad
                self.model.enable_input_require_grads()
        self.model.train()
        trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        low_precision = next(iter(trainable.values())).dtype != torch.float32
        self.master = MasterWeights(trainable, enabled=cfg.model.master_fp32 and low_precision)
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(list(self.master.params.values()), lr=o.lr, betas=tuple(o.betas),
                                           eps=o.eps, weight_decay=o.weight_decay)

    def _make_generator(self):
        """The rollout engine: its own copy of the student, refreshed by ``update_weights`` after each step."""
        from kdrl.generation import make_generator
        r = self.cfg.rollout
        kw = r.vllm_kwargs if r.backend == "vllm" else {}
        gen = make_generator(self.student_path, backend=r.backend, dtype=self.cfg.model.dtype, **kw)
        if self.step:  # resumed: the engine loaded the initial weights
            gen.update_weights(self.rollout_weights())
        return gen

    @torch.no_grad()
    def rollout_weights(self, changed_only: bool = False) -> dict[str, torch.Tensor]:
        """The student's current weights under the plain model's names (LoRA adapters merged in).

        ``changed_only``: with LoRA, only the adapted layers' merged weights (the rest never changes).
        Merging is out of place, ``W + scale * B @ A`` in fp32: peft's in-place merge/unmerge would round the
        bf16 base weights a little more on every step.
        """
        if not self.cfg.model.lora_rank:
            return _untied(self.model.state_dict())
        from peft.tuners.lora import LoraLayer
        base = self.model.get_base_model()
        state = {} if changed_only else {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items()
                                         if "lora_" not in k}
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer):
                w = module.get_base_layer().weight
                delta = sum(module.get_delta_weight(a).float() for a in module.active_adapters)
                state[f"{name}.weight"] = (w.float() + delta).to(w.dtype)
        return _untied(state)

    # ---- one step -------------------------------------------------------------------------------------------
    def prompts(self, problems) -> list[str]:
        from kdrl.prompts import build_messages
        return [self.tokenizer.apply_chat_template(build_messages(p.question, style=self.cfg.data.prompt_style),
                                                   tokenize=False, add_generation_prompt=True) for p in problems]

    def rollout(self, timer: Timer) -> RolloutBatch:
        """Sample G responses per prompt with the current weights, grade them, build the padded batch."""
        from kdrl.generation import SamplingConfig
        from kdrl.grading import grade_many
        r = self.cfg.rollout
        problems = self.sampler.next(r.prompts_per_step)
        texts = self.prompts(problems)
        if self._first_step:
            self.say(f"step {self.step + 1}: sampling {len(texts)} prompts x {r.group_size} responses (<= "
                     f"{r.max_new_tokens} tokens) ...")
        sampling = SamplingConfig(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                  n=r.group_size, seed=self.cfg.run.seed * 100_003 + self.step)
        with timer("generation"):
            groups = self.generator.generate(texts, sampling, progress=False)
        with timer("grading"):
            flat = [c for g in groups for c in g]
            cut = [c.finish_reason == "length" for c in flat]  # hit max_new_tokens: no credit from a fallback
            ok = grade_many([c.text for c in flat], [p.answer for p in problems for _ in range(r.group_size)],
                            truncated=cut, timeout=r.grader_timeout)
        G = r.group_size
        prompt_ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        batch = build_batch(prompt_ids, [[c.token_ids for c in g] for g in groups],
                            [ok[i * G:(i + 1) * G] for i in range(len(groups))],
                            [cut[i * G:(i + 1) * G] for i in range(len(groups))],
                            pad_id=self._pad_id(), scale_advantages=r.scale_advantages)
        lengths = batch.mask.sum(-1).tolist()
        self.samples = [{"step": self.step + 1, "group": i, "prompt": p.question, "gold": p.answer,
                         "response": c.text, "reward": float(batch.rewards[i * G + j]),
                         "length": int(lengths[i * G + j]), "advantage": float(batch.advantages[i * G + j]),
                         "truncated": c.finish_reason == "length"}
                        for i, (p, g) in enumerate(zip(problems, groups)) for j, c in enumerate(g)]
        return batch

    def _pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    @torch.no_grad()
    def teacher_signal(self, batch: RolloutBatch) -> dict:
        """The teacher's view of the sampled tokens, for ``KDRLLoss``, computed in micro-batches without logits.

        The exact KL needs the teacher's distribution over the vocabulary at every token, so then its hidden states
        ``(B, T, d_t)`` (+ lm_head weight) are kept; otherwise only its log-probs ``(B, T)`` float32, which frees the
        hidden states at once and keeps the teacher's fp32 lm_head out of the student's backward (less memory).
        """
        if self.teacher_server is not None:  # model.teacher_backend=vllm: sampled-token log-probs, temperature 1
            return {"teacher_logprobs": self.teacher_server.logprobs(batch)}
        if self.teacher is None or registry.teacher_input(self.loss_fn.config) == "none":
            return {}  # no teacher, or one loaded only for the evaluation's KL (run.eval_kl)
        from kdrl_kernels import fused_linear_logprobs
        lc, mb = self.loss_fn.config, self.cfg.optim.micro_batch_size
        weight = self.teacher.get_output_embeddings().weight
        parts = [batch.rows(i, i + mb) for i in range(0, len(batch), mb)]
        if registry.teacher_input(lc) == "hidden":
            return {"teacher_hidden": torch.cat([hidden_states(self.teacher, p) for p in parts]),
                    "teacher_weight": weight}
        weight, _ = teacher_head(self.model.get_output_embeddings().weight.shape[0], weight,
                                 truncate=lc.truncate_teacher_vocab)
        return {"teacher_logprobs": torch.cat([
            fused_linear_logprobs(hidden_states(self.teacher, p), weight, p.targets.masked_fill(~p.mask, -100),
                                  temperature=lc.temperature)
            for p in parts])}

    @torch.no_grad()
    def old_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """``(B, T)`` float32 log-probs of the sampled tokens under the rollout policy (before any update)."""
        from kdrl_kernels import fused_linear_logprobs
        weight = self.model.get_output_embeddings().weight
        mb, out = self.cfg.optim.micro_batch_size, []
        for i in range(0, len(batch), mb):
            part = batch.rows(i, i + mb)
            targets = part.targets.masked_fill(~part.mask, -100)
            out.append(fused_linear_logprobs(hidden_states(self.model, part), weight, targets,
                                             temperature=self.loss_fn.config.temperature))
        return torch.cat(out)

    def train_step(self) -> dict:
        """Run one full step (rollout -> update(s) -> weight sync); returns the step's metrics."""
        timer, cfg = Timer(), self.cfg
        t_start = time.perf_counter()
        batch = self.rollout(timer)
        rollout_stats = rollout_metrics(batch)
        lc = self.loss_fn.config
        if lc.kd_mask == "group_all_wrong":  # decided on the whole rollout batch, before any split
            batch = kd_groups_whole(batch)
        first, say = self._first_step, self.say
        if first:
            say(f"step {self.step + 1}: {len(batch)} responses sampled and graded "
                f"({timer.get('generation', 0):.1f}s + {timer.get('grading', 0):.1f}s)"
                + (", teacher forward ..." if self.teacher is not None or self.teacher_server is not None else ""))
        with timer("teacher"):
            teacher = self.teacher_signal(batch)
        old = None
        n_updates = cfg.optim.updates_per_rollout
        if n_updates > 1:  # later mini-batches are off-policy: anchor the ratio at the rollout policy
            with timer("old_logprobs"):
                old = self.old_logprobs(batch)
        size = len(batch) // n_updates
        if first:
            say(f"step {self.step + 1}: student forward/backward and update ...")
        updates = []
        for u in range(n_updates):
            mini = batch.rows(u * size, (u + 1) * size)
            opt_step = self.step * n_updates + u  # warmup counts optimizer steps; the beta schedule rollout steps
            rows = slice(u * size, (u + 1) * size)
            with timer("student_fwd_bwd"):
                m = backward_microbatches(
                    self.model, self.loss_fn, mini, micro_batch_size=cfg.optim.micro_batch_size,
                    **{k: v if k == "teacher_weight" else v[rows] for k, v in teacher.items()},
                    old_logprobs=None if old is None else old[rows], step=self.step,
                    after_backward=self.master.accumulate)
            with timer("optimizer"):
                m["grad_norm"] = self._optimizer_step(opt_step)
            updates.append(m)
        with timer("weight_sync"):  # the hf generator takes a partial state dict: only what LoRA changed
            self.generator.update_weights(self.rollout_weights(changed_only=cfg.rollout.backend == "hf"))
        del batch, mini, teacher, old  # this step's tensors, before the heap may be trimmed
        trimmed = release_free_memory()
        self.step += 1
        sums = registry.reduce_metrics(updates)  # each update weighs 1 / n_updates
        sums.update(registry.kd_signal(lc, sums))
        self._first_step = False
        metrics = {**rollout_stats, **sums, "lr": self.optimizer.param_groups[0]["lr"]}
        metrics.update({f"time_{k}": v for k, v in timer.items()})
        metrics["time_step"] = time.perf_counter() - t_start
        metrics["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
        metrics["heap_trimmed"] = trimmed
        return metrics

    def _optimizer_step(self, opt_step: int) -> float:
        """Warmup, gradient clipping, AdamW step, write masters back to the model. Returns the gradient norm."""
        o = self.cfg.optim
        norm = optimizer_step(self.optimizer, self.master.params.values(), lr=o.lr, step=opt_step,
                              warmup_steps=o.warmup_steps, grad_clip=o.grad_clip)
        self.master.publish()
        return norm

    # ---- evaluation, checkpoints, the run ---------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Greedy accuracy, mean response length and truncation rate on ``run.eval_task`` with the shared grader;
        with ``run.eval_kl`` also the exact KL to the teacher on those responses (:meth:`eval_kl`)."""
        from kdrl.data import load_task
        from kdrl.generation import SamplingConfig
        from kdrl.grading import grade_many
        run = self.cfg.run
        problems = load_task(run.eval_task, limit=run.eval_limit)
        texts = self.prompts(problems)
        outs = [o[0] for o in self.generator.generate(texts, SamplingConfig(
            max_new_tokens=run.eval_max_new_tokens, temperature=0.0, n=1), progress=False)]
        cut = [o.finish_reason == "length" for o in outs]
        ok = grade_many([o.text for o in outs], [p.answer for p in problems], truncated=cut)
        metrics = {"eval_accuracy": sum(ok) / len(ok),
                   "eval_len_mean": sum(len(o.token_ids) for o in outs) / len(outs),
                   "eval_truncated_frac": sum(cut) / len(cut)}
        if run.eval_kl:
            metrics["eval_kl"] = self.eval_kl(texts, [o.token_ids for o in outs])
        return metrics

    @torch.no_grad()
    def eval_kl(self, prompts: list[str], responses: list[list[int]]) -> float:
        """Mean over response tokens of the exact reverse KL(student || teacher) at the loss temperature, from
        hidden states (``kdrl_kernels.fused_linear_kl``: no logits). Rows go through in micro-batches of similar
        length, each padded only to its own longest row."""
        from kdrl_kernels import fused_linear_kl
        lc, mb = self.loss_fn.config, self.cfg.optim.micro_batch_size
        prompt_ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(prompt_ids[i]) + len(responses[i]))
        w_s = self.model.get_output_embeddings().weight
        w_t = self.teacher.get_output_embeddings().weight
        total, tokens = 0.0, 0
        for start in range(0, len(order), mb):
            rows = order[start:start + mb]
            part = build_batch([prompt_ids[i] for i in rows], [[responses[i]] for i in rows],
                               [[False] for _ in rows], [[False] for _ in rows], pad_id=self._pad_id())
            kl = fused_linear_kl(hidden_states(self.model, part), w_s, hidden_states(self.teacher, part), w_t,
                                 kind="reverse", temperature=lc.temperature, mask=part.mask,
                                 truncate_teacher_vocab=lc.truncate_teacher_vocab)
            total += float(kl[part.mask].double().sum())
            tokens += int(part.mask.sum())
        return total / max(tokens, 1)

    def save(self, commit: bool = True) -> Path:
        """Checkpoint the current step and return its directory; ``commit=False`` only writes it (to
        ``checkpoints/.tmp-step_N``: :func:`kdrl.trainer.checkpoint.commit_checkpoint` makes it the newest)."""
        tmp = write_checkpoint(self.output_dir, self.step, self.master.params, self.optimizer,
                               {"sampler": self.sampler.state_dict(), "config": self.cfg.to_dict()})
        return commit_checkpoint(tmp, keep=self.cfg.run.keep_checkpoints) if commit else tmp

    def close(self) -> None:
        """Release the run directory (:meth:`run` does at its end; a later :meth:`run` takes it again)."""
        self._lock.release()

    def run(self) -> list[dict]:
        """Train from the current step to ``run.steps``; returns the metrics of the steps run here."""
        run, say = self.cfg.run, self.say
        hold(self._lock)
        try:
            return self._run(run, say)
        finally:
            self._lock.release()

    def _run(self, run, say) -> list[dict]:
        """:meth:`run` while the run directory is locked."""
        logger = MetricsLogger(self.output_dir, run.steps, self.step, run.tensorboard, run.progress)
        samples = SampleLog(self.output_dir, self.step)
        history = []
        try:
            if run.eval_at_start and self.step == 0 and not self.resumed:
                self._evaluate_at_start(logger)
            while self.step < run.steps:
                metrics = self.train_step()
                if run.eval_every and self.step % run.eval_every == 0:
                    t0 = time.perf_counter()
                    metrics.update(self.evaluate())
                    metrics["time_eval"] = time.perf_counter() - t0
                suffix = _eval_suffix(metrics)
                written = None
                if (run.save_every and self.step % run.save_every == 0) or self.step == run.steps:
                    t0 = time.perf_counter()
                    written = self.save(commit=False)
                    metrics["time_checkpoint"] = time.perf_counter() - t0
                    size = checkpoint_bytes(written)
                    metrics["checkpoint_mb"] = size / 1e6
                    suffix += f"  | saved step_{self.step:06d} ({_size(size)})"
                # The step's records reach the disk before its checkpoint is committed: killed before the commit,
                # the run resumes from the previous checkpoint and cuts these records (the step reruns and logs
                # them once); killed after it, records and checkpoint are both there. Never lost, never twice.
                samples.write(self.samples)
                logger.write(self.step, metrics)
                if written is not None:
                    commit_checkpoint(written, keep=run.keep_checkpoints)
                logger.show(self.step, metrics, suffix)
                history.append(metrics)
        finally:
            logger.close()
        if run.export_final and self.step == run.steps:
            say(f"exporting the student to {self.output_dir / 'final'} ...")
            self.export(self.output_dir / "final")
        if run.plot and history:
            self._plot(logger.path)
        return history

    def _evaluate_at_start(self, logger: MetricsLogger) -> None:
        """``run.eval_at_start``: evaluate the initial student, record it as step 0 and commit a step-0 checkpoint
        with it (a resume then starts after this evaluation instead of repeating it)."""
        self.say("step 0: evaluating the initial student (run.eval_at_start) ...")
        t0 = time.perf_counter()
        metrics = self.evaluate()
        metrics["time_eval"] = time.perf_counter() - t0
        written = self.save(commit=False)
        logger.write(0, metrics)
        commit_checkpoint(written, keep=self.cfg.run.keep_checkpoints)
        self.say(f"step 0/{self.cfg.run.steps} (before training){_eval_suffix(metrics)}  | {metrics['time_eval']:.1f} "
                 f"s  | saved step_{0:06d}")

    def _plot(self, metrics_path: Path) -> None:
        """``curves.png`` beside the metrics; a missing matplotlib is reported, not fatal (the run is done)."""
        from kdrl.trainer.logging import read_metrics
        from kdrl.trainer.plot import plot
        out = self.output_dir / "curves.png"
        try:
            plot(read_metrics(metrics_path), out, title=str(self.output_dir))
        except ImportError as err:
            print(f"kdrl.train: no curves.png ({err}); install matplotlib and run python -m kdrl.trainer.plot "
                  f"{metrics_path}", file=sys.stderr)
            return
        self.say(f"curves written to {out}")

    def export(self, path: Path) -> Path:
        """Save the student as a plain transformers model directory (LoRA merged) with its tokenizer."""
        base = self.model.get_base_model() if self.cfg.model.lora_rank else self.model
        base.save_pretrained(path, state_dict=self.rollout_weights())
        self.tokenizer.save_pretrained(path)
        write_export_card(path, self.cfg, self.step, registry.describe(self.loss_fn.config))
        return path
