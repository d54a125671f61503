"""Per-step metrics: one JSON line per step in ``metrics.jsonl``, optional TensorBoard, a tqdm progress bar.

On resume the JSONL file is cut back to the checkpointed step, so a step that was logged but not checkpointed
before an interruption is logged once, by its rerun, not twice.
"""
from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

__all__ = ["MetricsLogger", "read_metrics"]

# What the progress bar shows (when present in the step's metrics).
_BAR_KEYS = {"reward_mean": "r", "accuracy": "acc", "len_mean": "len", "k2": "k2", "loss": "loss",
             "time_step": "s/step"}


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a ``metrics.jsonl`` file, in order."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLogger:
    """Write step metrics to ``<output_dir>/metrics.jsonl`` (+ TensorBoard) and drive a progress bar.

    Args:
        output_dir: run directory.
        total_steps: the run's last step (for the bar).
        start_step: steps already done (resume); records of later steps are dropped from the JSONL file.
        tensorboard: also write scalars with ``torch.utils.tensorboard`` (needs the ``tensorboard`` package).
        progress: show the tqdm bar.
    """

    def __init__(self, output_dir: str | Path, total_steps: int, start_step: int = 0,
                 tensorboard: bool = False, progress: bool = True):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= start_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise RuntimeError("run.tensorboard=true needs the tensorboard package "
                                   "(pip install tensorboard)") from err
            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=start_step + 1)
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not progress, desc="train", unit="step")

    def log(self, step: int, metrics: dict) -> None:
        """Record one finished step; ``metrics`` maps names to floats (non-numbers go to the JSONL file only)."""
        record = {"step": step, **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()
        self.bar.set_postfix({short: f"{metrics[k]:.4g}" for k, short in _BAR_KEYS.items()
                              if isinstance(metrics.get(k), (int, float))})
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
