"""The trainer's configuration: plain dataclasses, loaded from YAML, overridden with ``--set section.key=value``.

Every field carries its documentation in ``metadata["help"]``; ``python -m kdrl.train --describe`` prints them all.
The loss section becomes a ``kdrl_kernels.KDRLConfig`` (its own docstring documents those fields) through
:func:`loss_config`, which adds the fields derived from other sections (``temperature`` from
``rollout.temperature``, ``total_steps`` from ``run.steps``) and refuses duplicates of trainer knobs; the trainer
never re-declares the loss library's options. :func:`validate` builds it at load time, before any model is loaded.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdrl_kernels import KDRLConfig, registry

__all__ = ["TrainConfig", "ModelConfig", "DataConfig", "RolloutConfig", "OptimConfig", "RunConfig", "ConfigError",
           "build_config", "load_config", "validate", "loss_config", "describe"]


class ConfigError(ValueError):
    """A bad setting or an unusable run directory, found at start: ``python -m kdrl.train`` prints its message as
    one line and exits 2. A ValueError, so callers catching that keep working."""


def opt(default, help: str):
    """A dataclass field with a default and its one-line documentation."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    """Which student and teacher to load and how the student is trained."""
    student: str = opt("smollm2-135m-instruct", "student: hub id, local directory, or a kdrl.models registry name")
    teacher: str | None = opt(None, "teacher (same tokenizer as the student); null for GRPO, which needs none")
    teacher_backend: str = opt("hf", "how the teacher scores the sampled tokens: hf (a torch copy here; hidden states, "
                                     "every estimator and the exact KL) or vllm (a vLLM engine's prompt_logprobs, "
                                     "kdrl.trainer.teacher: k1/k2/k3, shaping and TRRD only, rollout.temperature 1)")
    dtype: str = opt("bfloat16", "dtype of the model weights used in forward/backward (bfloat16 or float32)")
    master_fp32: bool = opt(True, "keep an fp32 master copy of the trainable weights and fp32 optimizer state")
    lora_rank: int = opt(0, "0 = full fine-tuning; > 0 = LoRA adapters of this rank on all linear layers (peft)")
    lora_alpha: float = opt(32.0, "LoRA scaling numerator (the update is scaled by alpha / rank)")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")


@dataclass
class DataConfig:
    """Where the prompts come from."""
    task: str = opt("gsm8k_train", "training set for kdrl.data.load_task: gsm8k_train or math_train")
    limit: int | None = opt(None, "use only the first N problems (before shuffling), N >= 1; null = all")
    prompt_style: str = opt("boxed", "style for kdrl.prompts.build_messages")
    shuffle: bool = opt(True, "visit problems in a seeded random order (reshuffled every epoch)")


@dataclass
class RolloutConfig:
    """How responses are sampled and rewarded."""
    backend: str = opt("hf", "generation backend for kdrl.generation.make_generator: hf (transformers) or vllm")
    prompts_per_step: int = opt(2, "prompts per optimizer step")
    group_size: int = opt(4, "G: sampled responses per prompt (the group of group-normalised advantages)")
    max_new_tokens: int = opt(256, "response token budget")
    temperature: float = opt(1.0, "sampling temperature; also the loss temperature (student, teacher and old "
                                  "log-probs are all scored at the distribution the rollouts were sampled from)")
    top_p: float = opt(1.0, "nucleus sampling threshold, in (0, 1]; 1 = off")
    scale_advantages: bool = opt(True, "divide advantages by the group std; false = Dr. GRPO (centring only)")
    grader_timeout: float = opt(3.0, "seconds allowed to kdrl.grading.grade per response")
    vllm_kwargs: dict = opt({}, "extra keyword arguments for the vLLM engine (e.g. gpu_memory_utilization)")


@dataclass
class OptimConfig:
    """Optimizer, batching and schedule."""
    lr: float = opt(1e-6, "AdamW learning rate (constant after warmup), >= 0; 0 keeps the weights fixed (a "
                          "diagnostic run: the loss is measured at the rollout policy on every step)")
    warmup_steps: int = opt(0, "linear warmup from 0 over this many optimizer steps (>= 0; 0 = none)")
    weight_decay: float = opt(0.0, "AdamW decoupled weight decay (>= 0)")
    betas: list = opt([0.9, 0.999], "AdamW betas: two numbers in [0, 1)")
    eps: float = opt(1e-8, "AdamW epsilon (> 0)")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this value (> 0); 0 = no clipping (explicit: "
                                "a negative value is an error, not 'off')")
    micro_batch_size: int = opt(4, "sequences per forward/backward; gradients accumulate over the rollout batch")
    updates_per_rollout: int = opt(1, "optimizer steps per rollout batch (> 1 splits it into mini-batches; "
                                      "then the ratio to the rollout policy is no longer 1 and clipping binds)")


@dataclass
class RunConfig:
    """Length of the run, outputs, checkpoints and evaluation."""
    steps: int = opt(10, "number of rollout steps to run")
    seed: int = opt(0, "seed for data order, sampling and initialisation of LoRA adapters")
    output_dir: str = opt("runs/kdrl", "where metrics.jsonl, samples.jsonl, checkpoints/, curves.png, final/ and "
                                       "TensorBoard logs go (all listed at start)")
    save_every: int = opt(1, "write a checkpoint every N steps (and at the end); 0 = only at the end. Each holds "
                             "the trainable weights + AdamW state, ~12 bytes per trainable parameter")
    keep_checkpoints: int = opt(2, "how many most recent checkpoints to keep on disk (>= 1; older ones are deleted)")
    resume: bool = opt(True, "continue from the newest intact checkpoint in output_dir if there is one; false: "
                             "start at step 0, which a directory holding a run refuses unless --fresh is passed "
                             "(that moves the old run aside, never deletes it)")
    tensorboard: bool = opt(False, "also write TensorBoard scalars (needs the tensorboard package)")
    progress: bool = opt(True, "print progress on stdout: start-up phases, the files written, one line per step "
                               "(false: quiet; the JSONL files are written either way)")
    plot: bool = opt(True, "at the end, write <output_dir>/curves.png with kdrl.trainer.plot (needs matplotlib)")
    eval_every: int | None = opt(0, "evaluate every N steps (0 or null = never): greedy accuracy on eval_task")
    eval_task: str = opt("gsm8k", "benchmark for periodic evaluation (kdrl.data.load_task name)")
    eval_limit: int | None = opt(50, "problems per periodic evaluation, >= 1; null = the whole eval_task")
    eval_max_new_tokens: int = opt(400, "token budget of the periodic evaluation")
    eval_at_start: bool = opt(False, "also evaluate before the first step: recorded as step 0 in metrics.jsonl, with "
                                     "a step-0 checkpoint so a resumed run does not evaluate again")
    eval_kl: bool = opt(False, "the evaluation also measures the exact reverse KL(student || teacher) per response "
                               "token on its greedy responses (eval_kl in metrics.jsonl): needs model.teacher with "
                               "teacher_backend hf, which is then loaded for any objective, GRPO included")
    threads: int = opt(0, "torch intra-op threads; 0 = leave torch's default")
    export_final: bool = opt(True, "at the end, save the student (LoRA merged) with its tokenizer to "
                                   "<output_dir>/final, a model directory the evaluation harness can load")


@dataclass
class TrainConfig:
    """The whole configuration; YAML files mirror these sections."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    loss: KDRLConfig = field(default_factory=lambda: {"objective": "grpo"},
                             metadata={"help": "the fields of kdrl_kernels.KDRLConfig (objective, beta, ...); a "
                                               "mapping until validate() makes it the run's KDRLConfig, with "
                                               "temperature from rollout.temperature (see loss_config)"})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_config(tree: dict) -> "TrainConfig":
    """A ``TrainConfig`` from a mapping of sections (a YAML file's, or a checkpoint's saved config), not validated;
    unknown keys and non-numbers in numeric fields are errors naming the field."""
    return _build(TrainConfig, tree, "")


def _build(cls, values: dict, where: str):
    """Instantiate dataclass ``cls`` from a dict, recursing into nested dataclasses; unknown keys are errors."""
    if not isinstance(values, dict):
        got = "null" if values is None else type(values).__name__
        raise ValueError(f"config section {where.rstrip('.') or 'root'} must be a mapping, got {got}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)} in {where or 'root'}; known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        sub = known[name].type
        sub_cls = {"ModelConfig": ModelConfig, "DataConfig": DataConfig, "RolloutConfig": RolloutConfig,
                   "OptimConfig": OptimConfig, "RunConfig": RunConfig}.get(sub if isinstance(sub, str) else "")
        kwargs[name] = _build(sub_cls, value, f"{where}{name}.") if sub_cls else _coerce(known[name], value, where)
    return cls(**kwargs)


_EXPECTED = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
             "list": "a list", "dict": "a mapping"}


def _coerce(f: dataclasses.Field, value, where: str):
    """Check ``value`` against the field's annotation and convert what is unambiguous: an integral number for an
    int field (``1e3``, ``4.0``), an int for a float field, numeric strings (YAML reads ``1e-6``, without a dot,
    as a string). A value of another type is a ValueError naming the field: ``run.steps=2.5`` would otherwise run
    3 steps, ``rollout.group_size=2.5`` fail deep inside torch."""
    name = f"{where}{f.name}"
    if name == "loss":  # kdrl_kernels.KDRLConfig's keywords: checked by loss_config
        return value
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    base, optional = kind.split("|")[0].strip(), kind.replace(" ", "").endswith("|None")
    expected = _EXPECTED.get(base)
    if expected is None:
        return value
    if value is None:
        if optional:
            return None
        raise ValueError(f"{name} must be {expected}, got null")
    bad = ValueError(f"{name} must be {expected}{' or null' if optional else ''}, got {value!r}")
    if base in ("int", "float"):
        if isinstance(value, bool):
            raise bad
        if isinstance(value, str):
            try:
                value = int(value) if base == "int" and value.strip().lstrip("+-").isdigit() else float(value)
            except ValueError:
                raise bad from None
        if not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        if base == "int":
            if isinstance(value, float) and not value.is_integer():
                raise bad
            return int(value)
        return float(value)
    if not isinstance(value, {"bool": bool, "str": str, "list": list, "dict": dict}[base]):
        raise bad
    return value


def _set(tree: dict, dotted: str, raw: str) -> None:
    """Apply one ``section.key=value`` override; the value is parsed as YAML (numbers, bools, null, lists)."""
    keys = dotted.split(".")
    if not all(keys):
        raise ValueError(f"--set expects section.key=value, got {dotted}={raw}")
    node = tree
    for depth, k in enumerate(keys[:-1]):
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {dotted}: {'.'.join(keys[:depth + 1])} is not a section")
    try:
        node[keys[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ValueError(f"--set {dotted}: the value {raw!r} is not valid YAML ({_one_line(err)})") from None


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _read_yaml(path: str | Path) -> dict:
    """The config file's mapping; a missing, unreadable, empty or non-mapping file is a ValueError naming it."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ValueError(f"config file {path}: cannot be read ({err.strerror or err})") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"config file {path} is not valid YAML: {_one_line(err)}") from None
    if tree is None:  # an empty file used to train the defaults silently (SmolLM2, GRPO, into runs/kdrl)
        raise ValueError(f"config file {path} is empty: expected a mapping of sections (model, data, rollout, "
                         "optim, run, loss); to train with the defaults, omit --config")
    if not isinstance(tree, dict):
        raise ValueError(f"config file {path} must hold a mapping of sections, got {type(tree).__name__}")
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML file (or start from the defaults), apply ``key=value`` overrides, validate and return.

    Raises ValueError (one line naming the file or the field, the value and what is expected) for any bad input.
    """
    tree: dict[str, Any] = {} if path is None else _read_yaml(path)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects section.key=value, got {item!r}")
        key, raw = item.split("=", 1)
        _set(tree, key.strip(), raw)
    cfg = build_config(tree)
    validate(cfg)  # also turns the loss section into the run's KDRLConfig
    return cfg


def loss_config(cfg: TrainConfig) -> KDRLConfig:
    """The ``kdrl_kernels.KDRLConfig`` of the run: the ``loss`` section plus the fields derived from elsewhere.

    - ``temperature`` is ``rollout.temperature``: the ratio and the KD terms are computed under the distribution the
      rollouts were sampled from. Setting ``loss.temperature`` to another value is an error.
    - ``total_steps`` (cosine beta schedule) defaults to ``run.steps``: the schedule advances once per rollout step.
    - ``scale_rewards`` is ``rollout.scale_advantages`` (the trainer computes the advantages); another value is an
      error.
    - An objective without a teacher has no KD term: ``log_exact_kl`` is dropped (there is no teacher to compare with).
    The section may be a mapping (YAML) or a KDRLConfig (whose fields are then all taken as given).
    Raises ValueError naming the field when the loss section is invalid.
    """
    if isinstance(cfg.loss, KDRLConfig):
        loss = dataclasses.asdict(cfg.loss)
    elif isinstance(cfg.loss, dict):
        loss = dict(cfg.loss)
    else:
        raise ValueError(f"loss must be a mapping of KDRLConfig fields, got {type(cfg.loss).__name__}")
    scale = cfg.rollout.scale_advantages
    if loss.get("scale_rewards", scale) != scale:
        raise ValueError(f"loss.scale_rewards={loss['scale_rewards']} disagrees with rollout.scale_advantages={scale}: "
                         "the trainer computes the advantages; set rollout.scale_advantages only")
    loss["scale_rewards"] = scale
    t = cfg.rollout.temperature
    if "temperature" in loss and float(loss["temperature"]) != float(t):
        raise ValueError(f"loss.temperature={loss['temperature']} differs from rollout.temperature={t}: the loss "
                         "temperature is the rollout temperature; set rollout.temperature only")
    loss["temperature"] = t
    if loss.get("beta_schedule") == "cosine" and loss.get("total_steps") is None:
        loss["total_steps"] = cfg.run.steps
    if loss.get("objective") in registry.OBJECTIVES and not registry.get_objective(loss["objective"]).needs_teacher:
        loss["log_exact_kl"] = False
    try:
        return KDRLConfig.from_dict(loss, where="loss.")
    except (TypeError, ValueError) as err:
        raise ValueError(f"invalid loss section: {err}") from None


def _check_types(cfg: TrainConfig) -> None:
    """Apply the field checks of :func:`_coerce` to a config built in Python rather than loaded (normalising
    ``4.0`` to ``4`` and the like in place)."""
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(sub):
            continue
        for f in dataclasses.fields(sub):
            setattr(sub, f.name, _coerce(f, getattr(sub, f.name), f"{section.name}."))


def validate(cfg: TrainConfig) -> None:
    """Reject settings that cannot work, naming the field, the value and the allowed range (ValueError).

    Pure: reads no file and loads no model (the run directory is checked when the trainer starts).
    """
    from kdrl.data import BENCHMARKS, TRAINING_SETS
    from kdrl.prompts import STYLES
    _check_types(cfg)
    m, d, r, o, run = cfg.model, cfg.data, cfg.rollout, cfg.optim, cfg.run
    tasks = TRAINING_SETS + BENCHMARKS
    chat_styles = tuple(style for style in STYLES if style != "fewshot")  # the trainer renders chat templates
    betas_ok = (len(o.betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                          for b in o.betas))
    checks = [
        (bool(m.student), "model.student must name a model (hub id, directory or kdrl.models registry name), got ''"),
        (m.dtype in ("bfloat16", "float32"), f"model.dtype must be bfloat16 or float32, got {m.dtype!r}"),
        (m.lora_rank >= 0, f"model.lora_rank must be >= 0 (0 = full fine-tuning), got {m.lora_rank}"),
        (m.lora_alpha > 0, f"model.lora_alpha must be > 0, got {m.lora_alpha}"),
        (d.task in tasks, f"data.task must be one of {', '.join(tasks)} (kdrl.data), got {d.task!r}"),
        (d.limit is None or d.limit >= 1, f"data.limit must be >= 1 or null (all problems), got {d.limit}"),
        (d.prompt_style in chat_styles, f"data.prompt_style must be one of {', '.join(chat_styles)} (the chat "
                                        f"styles of kdrl.prompts), got {d.prompt_style!r}"),
        (r.backend in ("hf", "vllm"), f"rollout.backend must be hf or vllm, got {r.backend!r}"),
        (r.group_size >= 2, f"rollout.group_size must be >= 2 for group-normalised advantages, got {r.group_size}"),
        (r.prompts_per_step >= 1, f"rollout.prompts_per_step must be >= 1, got {r.prompts_per_step}"),
        (r.max_new_tokens >= 1, f"rollout.max_new_tokens must be >= 1, got {r.max_new_tokens}"),
        (r.temperature > 0, f"rollout.temperature must be > 0 for sampling, got {r.temperature}"),
        (0 < r.top_p <= 1, f"rollout.top_p must be in (0, 1] (1 = no nucleus truncation), got {r.top_p}"),
        (r.grader_timeout > 0, f"rollout.grader_timeout must be > 0 seconds, got {r.grader_timeout}"),
        (o.lr >= 0, f"optim.lr must be >= 0 (0 keeps the weights fixed), got {o.lr}"),
        (o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0 (0 = no warmup), got {o.warmup_steps}"),
        (o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}"),
        (betas_ok, f"optim.betas must be two numbers in [0, 1), got {o.betas!r}"),
        (o.eps > 0, f"optim.eps must be > 0, got {o.eps}"),
        (o.grad_clip >= 0, f"optim.grad_clip must be > 0, or 0 for no clipping, got {o.grad_clip}"),
        (o.micro_batch_size >= 1, f"optim.micro_batch_size must be >= 1, got {o.micro_batch_size}"),
        (o.updates_per_rollout >= 1, f"optim.updates_per_rollout must be >= 1, got {o.updates_per_rollout}"),
        (o.updates_per_rollout < 1 or (r.prompts_per_step * r.group_size) % o.updates_per_rollout == 0,
         f"optim.updates_per_rollout must divide rollout.prompts_per_step * rollout.group_size "
         f"({r.prompts_per_step} * {r.group_size}), got {o.updates_per_rollout}"),
        (run.steps >= 0, f"run.steps must be >= 0, got {run.steps}"),
        (run.seed >= 0, f"run.seed must be >= 0, got {run.seed}"),
        (bool(run.output_dir), "run.output_dir must name a directory, got ''"),
        (run.save_every >= 0, f"run.save_every must be >= 0 (0 = only at the end), got {run.save_every}"),
        (run.keep_checkpoints >= 1, f"run.keep_checkpoints must be >= 1, got {run.keep_checkpoints}"),
        (run.eval_every is None or run.eval_every >= 0,
         f"run.eval_every must be >= 0 (0 or null = never), got {run.eval_every}"),
        (run.eval_task in tasks, f"run.eval_task must be one of {', '.join(tasks)} (kdrl.data), got {run.eval_task!r}"),
        (run.eval_limit is None or run.eval_limit >= 1,
         f"run.eval_limit must be >= 1 or null (the whole task), got {run.eval_limit}"),
        (run.eval_max_new_tokens >= 1, f"run.eval_max_new_tokens must be >= 1, got {run.eval_max_new_tokens}"),
        (run.threads >= 0, f"run.threads must be >= 0 (0 = torch's default), got {run.threads}"),
        (isinstance(cfg.loss, KDRLConfig) or (isinstance(cfg.loss, dict) and "objective" in cfg.loss),
         "loss must be a mapping with an 'objective'"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    lc = cfg.loss = loss_config(cfg)  # the loss library's own checks, before any model is loaded
    if lc.needs_teacher and not cfg.model.teacher:
        raise ValueError(f"loss.objective={lc.objective!r} needs model.teacher")
    _validate_teacher_backend(cfg, lc)


def _validate_teacher_backend(cfg: TrainConfig, lc) -> None:
    """A served teacher gives one log-prob per sampled token at temperature 1: refuse what needs more."""
    backend = cfg.model.teacher_backend
    if backend not in ("hf", "vllm"):
        raise ValueError(f"model.teacher_backend must be hf or vllm, got {backend!r}")
    if cfg.run.eval_kl and not cfg.model.teacher:
        raise ValueError("run.eval_kl=true measures the KL to the teacher: set model.teacher")
    if cfg.run.eval_kl and backend == "vllm":
        raise ValueError("run.eval_kl=true needs the teacher's hidden states (the exact KL): set "
                         "model.teacher_backend=hf, or run.eval_kl=false")
    if backend == "hf" or not lc.needs_teacher:
        return
    if lc.kl_in_loss:
        raise ValueError("model.teacher_backend=vllm gives the teacher's log-probs of the sampled tokens only: "
                         "loss.kl_estimator=exact needs its full distribution; use k1, k2 or k3, or teacher_backend=hf")
    if lc.log_exact_kl:
        raise ValueError("model.teacher_backend=vllm cannot log the exact KL (it needs the teacher's hidden states): "
                         "set loss.log_exact_kl=false, or teacher_backend=hf")
    if cfg.rollout.temperature != 1.0:
        raise ValueError(f"model.teacher_backend=vllm scores at temperature 1 (vLLM's prompt log-probs are raw), but "
                         f"rollout.temperature={cfg.rollout.temperature} is the loss temperature: set it to 1, or "
                         "teacher_backend=hf")


def describe(cls=TrainConfig, prefix: str = "") -> str:
    """Every field with its default and documentation, one per line (``--describe``)."""
    lines = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory() if callable(f.default_factory) else None):
            lines.append(f"[{prefix}{f.name}] {f.default_factory.__doc__ or ''}".rstrip())
            lines.append(describe(type(f.default_factory()), f"{prefix}{f.name}."))
            continue
        if f.name == "loss" and cls is TrainConfig:  # a mapping of the loss library's own, documented fields
            lines.append(f"[loss] {f.metadata['help']}; default objective grpo")
            lines.append(describe(KDRLConfig, "loss."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {prefix}{f.name} = {default!r}: {f.metadata.get('help', '')}")
    return "\n".join(lines)
