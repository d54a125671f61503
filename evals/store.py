"""Per-sample JSONL files of a run, append-only, so an interrupted run resumes without redoing or losing samples.

Layout of a run directory:
    config.json            settings that define the run (a resumed run must have the same ones)
    samples/<task>.jsonl   one graded sample per line, appended (and fsynced) after each generation chunk
    results.json           metrics, written at the end
A line cut off by an interruption (no trailing newline or invalid JSON) is dropped on the next start; the
problem it belonged to is generated again. Samples are keyed by (problem id, sample index).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["RunStore"]


class RunStore:
    def __init__(self, run_dir: str | os.PathLike):
        self.dir = Path(run_dir)
        (self.dir / "samples").mkdir(parents=True, exist_ok=True)

    # -- configuration ------------------------------------------------------------------------------------
    def check_config(self, config: dict) -> None:
        """Write config.json on the first start; on a resume, refuse settings that differ from the stored ones."""
        path = self.dir / "config.json"
        config = json.loads(json.dumps(config))  # compare as stored: tuples become lists
        if path.exists():
            stored = json.loads(path.read_text())
            diff = {k: (stored.get(k), config.get(k)) for k in set(stored) | set(config) if stored.get(k) != config.get(k)}
            if diff:
                raise ValueError(f"run directory {self.dir} holds a run with other settings {diff} "
                                 "(stored, requested); pass another --run-name or delete the directory")
            return
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
        tmp.replace(path)

    # -- samples ------------------------------------------------------------------------------------------
    def path(self, task: str) -> Path:
        return self.dir / "samples" / f"{task}.jsonl"

    def load(self, task: str) -> list[dict]:
        """Complete records of a task; a truncated last line is removed from the file."""
        path = self.path(task)
        if not path.exists():
            return []
        raw = path.read_bytes()
        records, good_bytes = [], 0
        for line in raw.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
            good_bytes += len(line)
        if good_bytes != len(raw):
            with open(path, "r+b") as f:  # drop the partial tail so appends start on a clean line
                f.truncate(good_bytes)
        return records

    def append(self, task: str, records: list[dict]) -> None:
        if not records:
            return
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with open(self.path(task), "a", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

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
        tmp = self.path(task).with_suffix(".rewrite")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        tmp.replace(self.path(task))

    def write_json(self, name: str, obj: dict) -> Path:
        path = self.dir / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False))
        tmp.replace(path)
        return path
