"""Per-sample JSONL files of a run, append-only, so an interrupted run resumes without redoing or losing samples.

Layout of a run directory:
    config.json            settings that define the run (a resumed run must have the same ones)
    samples/<task>.jsonl   one graded sample per line, appended (and fsynced) after each generation chunk
    results.json           metrics, written at the end
    .lock                  held (flock) by the run writing here: a second run into the same folder is refused
Nothing is created before the run has really started (`create=False`, then `start(config)` once the model is
loaded), so a run refused at start leaves no folder behind.

A partial LAST line (an interrupted or disk-full write: no trailing newline and not a whole record) is cut on the
next start, with a message; its sample is generated again. A garbled line elsewhere (say, a hand edit or a
corrupted block) is skipped with a warning and left in the file as it is: the lines after it stay and count, and
only the sample it held is generated again. Samples are keyed by (problem id, sample index).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tqdm.auto import tqdm

from kdrl import runlock
from kdrl.jsonl import append_lines, split_lines

__all__ = ["RunStore"]


def _note(msg: str) -> None:
    """A message on stderr that does not share a line with a progress bar."""
    tqdm.write(msg, file=sys.stderr)


def _record(line: bytes) -> dict | None:
    """The sample a JSONL line holds, or None when the line is not one (bad JSON, bad UTF-8, no id/sample)."""
    try:
        rec = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        return None
    return rec if isinstance(rec, dict) and "id" in rec and "sample" in rec else None


_PROCESS_LOCKS: list = []  # the run directories this process holds


class RunStore:
    def __init__(self, run_dir: str | os.PathLike, create: bool = True):
        self.dir = Path(run_dir)
        self._warned: set[tuple[Path, int]] = set()  # garbled lines already reported (load runs every chunk)
        if create:
            self._mkdirs()

    def _mkdirs(self) -> None:
        (self.dir / "samples").mkdir(parents=True, exist_ok=True)

    # -- one writer -----------------------------------------------------------------------------------------
    def holder(self) -> str | None:
        """Who holds this run directory (PID, host, start, command), or None when no live process does. Reads only.
        The lock (:mod:`kdrl.runlock`, the trainer's too) is an flock, which the kernel drops when its process ends,
        however it ends."""
        return runlock.holder(self.dir)

    def lock(self) -> None:
        """Hold this run directory for the rest of the process (ValueError naming the holder when another has it)."""
        self._mkdirs()
        self._lock = runlock.RunLock(self.dir, hint="pass another --run-name (rerunning this one once that run has "
                                                     "ended resumes it)")
        self._lock.acquire()
        _PROCESS_LOCKS.append(self._lock)  # held until the process ends, however it ends, even if the store is dropped

    # -- configuration ------------------------------------------------------------------------------------
    def check_config(self, config: dict, write: bool = True) -> None:
        """On a resume, refuse settings that differ from the stored ones (ValueError naming them). With `write`,
        create the run directory and write config.json on the first start; without, only compare."""
        path = self.dir / "config.json"
        config = json.loads(json.dumps(config))  # compare as stored: tuples become lists
        if path.exists():
            stored = json.loads(path.read_text())
            diff = {k: (stored.get(k), config.get(k)) for k in set(stored) | set(config) if stored.get(k) != config.get(k)}
            if diff:
                raise ValueError(f"run directory {self.dir} holds a run with other settings {diff} "
                                 "(stored, requested); pass another --run-name (or move that directory aside)")
            return
        if not write:
            return
        self._mkdirs()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
        tmp.replace(path)

    # -- samples ------------------------------------------------------------------------------------------
    def path(self, task: str) -> Path:
        return self.dir / "samples" / f"{task}.jsonl"

    def load(self, task: str) -> list[dict]:
        """Valid records of a task, in file order.

        A garbled line is skipped with a warning (once per line) and kept in the file; the lines after it count.
        A last line without its newline is a write cut short: kept (newline added) when it is a whole record, else
        cut from the file with a message, so that the next append starts on a clean line.
        """
        path = self.path(task)
        if not path.exists():
            return []
        raw = path.read_bytes()
        lines, partial = split_lines(raw, lambda line: _record(line) is not None)
        records = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            rec = _record(line)
            if rec is not None:
                records.append(rec)
            elif (path, i) not in self._warned:
                self._warned.add((path, i))
                _note(f"warning: {path}: line {i} is not a valid sample record ({line[:60]!r}...): skipped, "
                      "left in the file as it is; the sample it held will be generated again")
        if partial:
            with open(path, "r+b") as f:
                f.truncate(len(raw) - len(partial))
            if partial.strip():
                _note(f"{path}: cut a partial last line ({len(partial)} bytes, from a write that was interrupted "
                      "or ran out of space); its sample will be generated again")
        elif raw and not raw.endswith(b"\n"):  # a whole record that lost only its newline
            with open(path, "ab") as f:
                f.write(b"\n")
        return records

    def append(self, task: str, records: list[dict]) -> None:
        if not records:
            return
        self._mkdirs()
        append_lines(self.path(task), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))

    def add_timing(self, task: str, samples: int, seconds: float, tokens: int) -> dict:
        """Accumulate generation time over invocations (timing.json), so a resumed run reports the throughput of
        all its generation, not only of the last invocation. Returns the task's totals."""
        path = self.dir / "timing.json"
        timing = json.loads(path.read_text()) if path.exists() else {}
        t = timing.setdefault(task, {"samples": 0, "seconds": 0.0, "tokens": 0})
        t["samples"] += samples
        t["seconds"] = round(t["seconds"] + seconds, 3)
        t["tokens"] += tokens
        self.write_json("timing.json", timing)
        return t

    def timing(self, task: str) -> dict:
        path = self.dir / "timing.json"
        timing = json.loads(path.read_text()) if path.exists() else {}
        return timing.get(task, {"samples": 0, "seconds": 0.0, "tokens": 0})

    def rewrite(self, task: str, records: list[dict]) -> None:
        """Replace a task's samples atomically (used to re-grade stored samples with a newer grader)."""
        self._mkdirs()
        tmp = self.path(task).with_suffix(".rewrite")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        tmp.replace(self.path(task))

    def write_json(self, name: str, obj: dict) -> Path:
        self._mkdirs()
        path = self.dir / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False))
        tmp.replace(path)
        return path
