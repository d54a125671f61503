"""The run directory: one writer at a time, and no run ever deleted to make room for another.

- ``<output_dir>/.lock`` (:mod:`kdrl.runlock`, shared with the evaluation harness) is held by the process that
  writes the run: a second run into the same directory is refused at start, naming the first; a stale lock of a
  killed process is taken over with a message.
- Starting at step 0 (``run.resume=false``, or nothing to resume) in a directory that holds a run is refused;
  ``--fresh`` moves the old run aside to ``<output_dir>.old-<YYYYmmdd-HHMMSS>`` first, whole, by one rename.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from kdrl.runlock import LOCK_NAME, RunLock, RunLockError

from kdrl.trainer.checkpoint import list_checkpoints, newest_intact_checkpoint, remove_partial_checkpoints
from kdrl.trainer.config import ConfigError

__all__ = ["RUN_OUTPUTS", "run_contents", "move_aside", "open_run_dir", "hold"]

_HINT = "choose another run.output_dir"
# What a run writes at the top of its directory (kdrl/README.md lists them): --fresh moves only such directories.
RUN_OUTPUTS = ("metrics.jsonl", "samples.jsonl", "checkpoints", "final", "curves.png", "tensorboard",
               "config_changes.jsonl", LOCK_NAME)


def _warn(message: str) -> None:
    print(f"kdrl.train: {message}", file=sys.stderr, flush=True)


def _count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:  # in chunks: a long run's samples.jsonl is large
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
    return n


def run_contents(output_dir: str | Path) -> list[str]:
    """What of a run ``output_dir`` holds, one phrase per item (``[]``: nothing, the directory may be used).

    Empty logs, the lock file and an empty ``checkpoints/`` do not count: a run killed before its first step
    leaves them. Files that are no run's output count too (and stop ``--fresh`` from moving the directory).
    """
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for entry in sorted(out.iterdir()):
        name = entry.name
        if name == LOCK_NAME or (name in ("metrics.jsonl", "samples.jsonl") and entry.stat().st_size == 0):
            continue
        if name.endswith(".jsonl") and entry.is_file():
            lines = _count_lines(entry)
            found.append(f"{name} ({lines} line{'' if lines == 1 else 's'})")
        elif name == "checkpoints" and entry.is_dir():
            steps = [p.name for p in list_checkpoints(out)]
            others = [p.name for p in entry.iterdir() if p.name not in steps and not p.name.startswith(".tmp-")]
            if steps or others:
                found.append(f"checkpoints/ ({', '.join(steps + others)})")
        else:
            found.append(name + ("/" if entry.is_dir() else ""))
    return found


def move_aside(output_dir: str | Path) -> Path:
    """Rename ``output_dir`` to ``<output_dir>.old-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``... if taken); returns it.

    Refuses (ConfigError) a directory holding files that no run writes, so a mistyped output_dir (a home or a
    source directory) is never moved.
    """
    out = Path(output_dir).resolve()
    foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_OUTPUTS)
    if foreign:
        raise ConfigError(f"--fresh moves a run directory aside, but {out} also holds {', '.join(foreign[:5])}"
                          f"{' ...' if len(foreign) > 5 else ''}, which no run writes: choose another run.output_dir")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = out.with_name(f"{out.name}.old-{stamp}"), 1
    while target.exists():
        n += 1
        target = out.with_name(f"{out.name}.old-{stamp}-{n}")
    try:
        os.rename(out, target)
    except OSError as err:
        raise ConfigError(f"--fresh could not move {out} aside to {target} ({err.strerror or err}): move it "
                          "yourself, or choose another run.output_dir") from None
    return target


def hold(lock: RunLock, warn=_warn) -> RunLock:
    """Acquire ``lock`` (again, after a release); another live holder or an unusable directory is a ConfigError
    naming ``run.output_dir``."""
    try:
        lock.acquire(warn)
    except RunLockError as err:
        raise ConfigError(f"run.output_dir: {err}") from None
    return lock


def _acquire(out: Path, warn) -> RunLock:
    return hold(RunLock(out, hint=_HINT), warn)


def open_run_dir(output_dir: str | Path, *, resume: bool, fresh: bool, warn=_warn) -> tuple[RunLock, Path | None]:
    """Lock ``output_dir`` and decide where the run starts: returns the held lock and the checkpoint to resume
    from (None: step 0). Runs before any model is loaded.

    - ``fresh``: a run already there is moved aside (:func:`move_aside`) and this one starts at step 0;
    - else, with ``resume``, the newest intact checkpoint (damaged ones are reported and set aside);
    - starting at step 0 in a directory that holds a run is refused, saying what it holds and what to do.
    Leftovers of an interrupted checkpoint write (``checkpoints/.tmp-step_*``) are removed with a message.
    """
    out = Path(output_dir)
    lock = _acquire(out, warn)
    try:
        if fresh and run_contents(out):
            aside = move_aside(out)
            lock.release()  # the old run's lock file moved with it; emptied, it marks that run as not running
            lock = _acquire(out, warn)
            warn(f"--fresh: moved the previous run in {out} to {aside} (nothing deleted); starting at step 0")
        for tmp in remove_partial_checkpoints(out):
            warn(f"removed {tmp}: a checkpoint whose writing was interrupted (never the newest: the run continues "
                 "from the newest complete one)")
        ckpt = newest_intact_checkpoint(out, warn) if resume and not fresh else None
        held = run_contents(out) if ckpt is None else []
        if held:
            why = ("run.resume=false starts at step 0" if not resume
                   else "it has no intact checkpoint to resume from, so this run would start at step 0")
            raise ConfigError(f"{out} holds a run ({'; '.join(held)}) and {why}: pass --fresh to move that run "
                              f"aside to {out}.old-<time> and start over, or choose another run.output_dir")
    except BaseException:
        lock.release()
        raise
    return lock, ckpt
