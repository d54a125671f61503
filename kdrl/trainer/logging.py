"""What a run writes and prints: ``metrics.jsonl`` (one JSON line per step), ``samples.jsonl`` (every sampled
response), optional TensorBoard, and one human-readable line per step on stdout.

A step's records are appended (and fsynced) before its checkpoint is committed, and on resume both JSONL files
are cut back to the checkpoint's step: whatever the kill point, each step is recorded exactly once (a step
logged but not checkpointed is cut and logged again by its rerun). An incomplete last line is cut with a message.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from kdrl.jsonl import append_lines, split_lines

__all__ = ["MetricsLogger", "SampleLog", "Progress", "read_metrics", "read_jsonl", "cut_jsonl", "step_line",
           "time_split"]


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of a JSONL file, in order ([] when it does not exist). A line that is not JSON (a partial last
    line of a killed run, a hand edit) is skipped with a warning on stderr naming it, never a reason to fail."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            print(f"kdrl.train: {path}:{number} is not a JSON record ({err.msg}); skipped", file=sys.stderr)
    return records


read_metrics = read_jsonl  # the metrics log is a JSONL file like any other


def cut_jsonl(path: str | Path, last_step: int, warn=None) -> None:
    """Drop the records of ``path`` whose ``step`` is after ``last_step`` (creates an empty file if missing).

    A last line without its newline is what a kill or a full disk leaves in the middle of an append: it is cut,
    with a message through ``warn`` (default: stderr). Lines that are not JSON elsewhere are kept as they are
    (with a message): they are not this run's to delete. The file is replaced atomically (write + rename).
    """
    path = Path(path)
    warn = warn or (lambda message: print(f"kdrl.train: {message}", file=sys.stderr, flush=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.read_bytes() if path.exists() else b""
    lines, tail = split_lines(raw, _is_json)  # a whole record that only lacks its newline is kept (with one)
    if tail:
        warn(f"{path}: cut an incomplete last line ({len(tail)} bytes without a newline: the write of a step's "
             "records was interrupted); that step is rerun")
    kept, dropped = [], 0
    for number, line in enumerate(lines, 1):
        try:
            step = json.loads(line).get("step", 0) if line.strip() else None
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            warn(f"{path}:{number} is not a JSON record; kept as it is")
            step = None
        if step is not None and step > last_step:
            dropped += 1
            continue
        kept.append(line + b"\n")
    if raw.endswith(b"\n") and not dropped:
        return  # nothing to change: leave the file untouched
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(b"".join(kept))
    os.replace(tmp, path)


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
        return True
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


class Progress:
    """Timestamped progress messages on stdout (``[kdrl.train +12.3s] loading the student ...``), flushed at once.

    ``enabled=False`` silences them (metrics and samples are still written).
    """

    def __init__(self, enabled: bool = True, start: float | None = None, stream=None):
        self.enabled = enabled
        self.start = time.perf_counter() if start is None else start
        self.stream = stream

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[kdrl.train +{time.perf_counter() - self.start:.1f}s] {message}",
                  file=self.stream or sys.stdout, flush=True)


# The time_* metrics grouped into the split shown on each step's line.
TIME_SPLIT = {
    "rollout": ("time_generation", "time_grading"),
    "teacher": ("time_teacher",),
    "update": ("time_old_logprobs", "time_student_fwd_bwd", "time_optimizer"),
    "other": ("time_weight_sync", "time_eval", "time_checkpoint"),
}


def time_split(metrics: dict) -> dict[str, float]:
    """Seconds of the step per group of :data:`TIME_SPLIT` plus ``total`` (their sum: the step's wall time)."""
    split = {name: sum(float(metrics.get(k) or 0.0) for k in keys) for name, keys in TIME_SPLIT.items()}
    split["total"] = sum(split.values())
    return split


def _g(x) -> str:
    """A short number: 0.25, 160, 2.1e-03."""
    if x is None:
        return "-"
    x = float(x)
    if x == 0 or 1e-2 <= abs(x) < 1e4:
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return f"{x:.1e}"


def _f(x, digits: int) -> str:
    return "-" if x is None else f"{float(x):.{digits}f}"


def step_line(step: int, total_steps: int, metrics: dict) -> str:
    """The one line a step prints, e.g.

    ``step 3/10  reward 0.250  acc 0.250  len 87.5  beta*kd 1.3e-03 (kd 0.65)  clip 0.000  beta 2.0e-03  grad 0.41
    | 12.1 s/step: rollout 7.2, teacher 1.3, update 3.4, other 0.2``: ``beta*kd`` is the KD term as it enters the
    loss (``kd_term``; for kdrl_shaping, the mean penalty subtracted from the advantage), ``kd`` the raw estimate
    (``kd_raw``). Objectives without a KD term show ``beta*kd -`` (trrd adds the k2 to the teacher for information).
    ``grad`` is the gradient norm before clipping (0 when nothing moved the student).
    The seconds are the step's wall time, rollout / teacher / update / other as grouped in :data:`TIME_SPLIT`.
    """
    m = metrics
    parts = [f"step {step}/{total_steps}", f"reward {_f(m.get('reward_mean'), 3)}", f"acc {_f(m.get('accuracy'), 3)}",
             f"len {_f(m.get('len_mean'), 1)}"]
    if m.get("kd_term") is not None:
        parts.append(f"beta*kd {_g(m['kd_term'])} (kd {_g(m.get('kd_raw'))})")
    elif m.get("k2") is not None:
        parts.append(f"beta*kd - (k2 to teacher {_g(m['k2'])})")
    else:
        parts.append("beta*kd -")
    parts += [f"clip {_f(m.get('clip_frac'), 3)}", f"beta {_g(m.get('beta'))}", f"grad {_g(m.get('grad_norm'))}"]
    split = time_split(m)
    timing = (f"| {split['total']:.1f} s/step: rollout {split['rollout']:.1f}, teacher {split['teacher']:.1f}, "
              f"update {split['update']:.1f}, other {split['other']:.1f}")
    return "  ".join(parts) + "  " + timing


class MetricsLogger:
    """Write step metrics to ``<output_dir>/metrics.jsonl`` (+ TensorBoard) and print one line per step.

    Args:
        output_dir: run directory.
        total_steps: the run's last step (shown on each line).
        start_step: steps already done (resume); records of later steps are dropped from the JSONL file.
        tensorboard: also write scalars with ``torch.utils.tensorboard`` (needs the ``tensorboard`` package).
        progress: print :func:`step_line` on stdout after each step.
    """

    def __init__(self, output_dir: str | Path, total_steps: int, start_step: int = 0,
                 tensorboard: bool = False, progress: bool = True):
        self.path = Path(output_dir) / "metrics.jsonl"
        cut_jsonl(self.path, start_step)
        self.total_steps, self.progress = total_steps, progress
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise RuntimeError("run.tensorboard=true needs the tensorboard package "
                                   "(pip install tensorboard)") from err
            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=start_step + 1)

    def log(self, step: int, metrics: dict, suffix: str = "") -> None:
        """Record one finished step (:meth:`write`) and print its line (:meth:`show`)."""
        self.write(step, metrics)
        self.show(step, metrics, suffix)

    def write(self, step: int, metrics: dict) -> None:
        """Append the step's record to the JSONL file (fsynced) and TensorBoard; ``metrics`` maps names to floats
        (non-numbers go to the JSONL file only)."""
        append_lines(self.path, json.dumps({"step": step, **metrics}) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()

    def show(self, step: int, metrics: dict, suffix: str = "") -> None:
        """Print :func:`step_line` (with ``run.progress``); ``suffix`` is appended (e.g. where the checkpoint went)."""
        if self.progress:
            print(step_line(step, self.total_steps, metrics) + suffix, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class SampleLog:
    """``<output_dir>/samples.jsonl``: one record per sampled response (step, prompt, response, reward, ...).

    ``start_step``: steps already done (resume); records of later steps are dropped, so a step rerun after an
    interruption appears once.
    """

    def __init__(self, output_dir: str | Path, start_step: int = 0):
        self.path = Path(output_dir) / "samples.jsonl"
        cut_jsonl(self.path, start_step)

    def write(self, records: list[dict]) -> None:
        append_lines(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
