"""A study's configuration: one shared trainer config, the arms that override it, the final evaluation, the report.

YAML layout (``configs/study_gsm8k.yaml`` is the example)::

    output_dir: runs/study_gsm8k     # arms in <output_dir>/<arm>/, evaluations in <output_dir>/evals/
    train: {model: ..., rollout: ..., run: ...}   # a kdrl.train config shared by every arm
    arms: {kdrl: {loss: {...}}, grpo: {loss: {...}}}   # arm -> overrides (deep-merged into train), in order
    eval: {tasks: gsm8k, limit: 300, max_new_tokens: 512}   # evals/run.py on each final model and the start
                                     # (backend: auto / vllm / hf, as evals/run.py --backend)
    report: docs/study_gsm8k.md      # optional: the page whose generated section the report rewrites

Every arm's trainer config is built and validated (``kdrl.trainer.config``) before anything runs; a bad field is
a :class:`StudyError` naming the arm and the field.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from evals.tasks import parse_tasks
from kdrl.trainer.config import TrainConfig, build_config, validate

__all__ = ["StudyError", "Study", "load_study", "arm_tree"]

_ARM = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_EVAL_KEYS = {"tasks": str, "limit": int, "max_new_tokens": int, "backend": str}


class StudyError(ValueError):
    """A bad study file or setting, found before any work; ``study/run.py`` prints it as one line, exit 2."""


@dataclass
class Study:
    """A loaded study. ``arms``: arm name -> the full trainer config tree of that arm (what its config file holds);
    ``configs``: arm name -> that tree built and validated once, a ``TrainConfig`` (its loss a ``KDRLConfig``)."""
    path: Path
    output_dir: Path
    arms: dict[str, dict]
    configs: dict[str, TrainConfig]
    eval: dict = field(default_factory=dict)
    report: Path | None = None

    def arm_dir(self, arm: str) -> Path:
        return self.output_dir / arm

    @property
    def eval_dir(self) -> Path:
        return self.output_dir / "evals"

    @property
    def student(self) -> str:
        """The starting student every arm trains from (they share it: checked at load)."""
        return next(iter(self.arms.values()))["model"]["student"]


def _merge(base: dict, over: dict) -> dict:
    """``over`` deep-merged into a copy of ``base`` (mappings merge, anything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def arm_tree(train: dict, overrides: dict, output_dir: Path) -> dict:
    """The trainer config tree of one arm: ``train`` with ``overrides`` merged in and ``run.output_dir`` set."""
    tree = _merge(train, overrides or {})
    tree.setdefault("run", {})["output_dir"] = str(output_dir)
    return tree


def _mapping(value, where: str) -> dict:
    if not isinstance(value, dict):
        got = "nothing" if value is None else type(value).__name__
        raise StudyError(f"{where} must be a mapping, got {got}")
    return value


def load_study(path: str | Path) -> Study:
    """Read and check a study file; every arm's trainer config is validated. Raises StudyError."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text())
    except OSError as err:
        raise StudyError(f"study file {path}: cannot be read ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise StudyError(f"study file {path} is not valid YAML: {' '.join(str(err).split())}") from None
    tree = _mapping(tree, f"study file {path}")
    unknown = set(tree) - {"output_dir", "train", "arms", "eval", "report"}
    if unknown:
        raise StudyError(f"study file {path}: unknown key(s) {sorted(unknown)}; known: arms, eval, output_dir, "
                         "report, train")
    if not tree.get("output_dir"):
        raise StudyError(f"study file {path}: output_dir must name a directory")
    out = Path(tree["output_dir"])
    train = _mapping(tree.get("train"), "train")
    arms_in = _mapping(tree.get("arms"), "arms")
    if not arms_in:
        raise StudyError("arms must name at least one arm")
    arms, configs = {}, {}
    for name, overrides in arms_in.items():
        if not isinstance(name, str) or not _ARM.fullmatch(name) or name == "evals":
            raise StudyError(f"arms: {name!r} is not a usable arm name (letters, digits, _ and -; not 'evals')")
        arm = arm_tree(train, _mapping(overrides or {}, f"arms.{name}"), out / name)
        try:
            cfg = build_config(arm)
            validate(cfg)
        except (ValueError, TypeError) as err:
            raise StudyError(f"arms.{name}: {err}") from None
        arms[name], configs[name] = arm, cfg
    students = {a["model"]["student"] for a in arms.values()}
    if len(students) != 1:
        raise StudyError(f"every arm must train the same student (the paired comparison's start), got {sorted(students)}")
    ev = _mapping(tree.get("eval") or {}, "eval")
    for key, value in ev.items():
        if key not in _EVAL_KEYS:
            raise StudyError(f"eval.{key}: unknown; known: {', '.join(_EVAL_KEYS)}")
        if _EVAL_KEYS[key] is str:
            ok = isinstance(value, str) and (key != "backend" or value in ("auto", "vllm", "hf"))
        else:
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        if not ok:
            expected = {"tasks": "a comma list of tasks", "backend": "auto, vllm or hf"}.get(key, "an integer >= 1")
            raise StudyError(f"eval.{key} must be {expected}, got {value!r}")
    try:  # a mistyped task would otherwise fail only at the eval stage, hours of training later
        parse_tasks(ev.get("tasks", "gsm8k"))
    except ValueError as err:
        raise StudyError(f"eval.tasks: {err}") from None
    report = tree.get("report")
    return Study(path=path, output_dir=out, arms=arms, configs=configs, eval={"tasks": "gsm8k", **ev},
                 report=Path(report) if report else None)
