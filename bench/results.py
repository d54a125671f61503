"""Result records, run metadata and the CSV/JSONL files they are appended to.

One record per (case, provider) per run. Every record carries the run's metadata (machine, thread count,
versions, git SHA, run id), so rows appended by different runs stay self-describing in one file.
"""
from __future__ import annotations

import csv
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# CSV column order; JSONL records hold the same keys (plus nothing else), so both files are equivalent.
FIELDS = [
    "run_id", "timestamp", "preset", "workload", "model", "d", "d_t", "vocab", "n_tokens", "seq_len", "dtype",
    "device", "provider", "speed_ok", "flop_model", "repeats", "time_median_s", "time_p20_s", "time_p80_s",
    "tokens_per_s", "gflops_useful", "gflops_executed", "extra_peak_mb", "extra_peak_excl_grads_mb",
    "time_vs_naive", "mem_vs_naive", "loss", "loss_err", "note", "mem_method", "threads", "machine", "cpu", "git_sha",
    "torch", "triton", "liger_kernel", "python", "kdrl_kernels",
]


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_sha() -> str:
    """HEAD of the repository, with ``-dirty`` when tracked files differ from it; ``unknown`` outside git."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def metadata(threads: int, device: str = "cpu") -> dict:
    """Machine, threads, versions and git SHA of this run."""
    import torch
    kk = None
    try:
        import kdrl_kernels
        kk = getattr(kdrl_kernels, "__version__", None)
    except ImportError:
        pass
    gpu = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else None
    return {
        "machine": f"{platform.node()} ({os.cpu_count()} cpus{', ' + gpu if gpu else ''})",
        "cpu": cpu_name(), "threads": threads, "git_sha": git_sha(), "torch": torch.__version__,
        "triton": _version("triton"), "liger_kernel": _version("liger_kernel") or _version("liger-kernel"),
        "python": platform.python_version(), "kdrl_kernels": kk,
    }


def new_run_id() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def append(records, out_dir):
    """Append records to ``out_dir/results.jsonl`` and ``out_dir/results.csv`` (header written once)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jsonl, csv_path = out / "results.jsonl", out / "results.csv"
    for path in (jsonl, csv_path):  # a record cut by a crash mid-write stays on a line of its own (load skips it)
        if path.exists() and path.stat().st_size:
            with open(path, "rb+") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
    with open(jsonl, "a") as f:
        for rec in records:
            f.write(json.dumps({k: rec.get(k) for k in FIELDS}) + "\n")
    new = not csv_path.exists() or csv_path.stat().st_size == 0
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        for rec in records:
            writer.writerow({k: rec.get(k) for k in FIELDS})
    return jsonl, csv_path


def load(out_dir, run_id=None):
    """Records of ``out_dir/results.jsonl`` (of one run when ``run_id`` is given). A line that is not a record (one
    cut short by a crash, a hand edit) is skipped with a warning on stderr; the lines after it count."""
    path = Path(out_dir) / "results.jsonl"
    if not path.exists():
        return []
    recs = []
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:  # bad JSON or bad UTF-8
                rec = None
            if isinstance(rec, dict):
                recs.append(rec)
            else:
                print(f"warning: {path}: line {i} is not a result record: skipped", file=sys.stderr)
    return [r for r in recs if run_id is None or r.get("run_id") == run_id]


def case_record(case, provider, timing, mem, meta, run_id, preset, useful_flops, executed_flops, mem_method,
                loss=None):
    """One result row. ``timing``: ``timing.summarize`` dict plus "loss" (None: not timed, then ``loss`` is the
    loss of its single step); ``mem``: (incl, excl) bytes or None."""
    rec = dict(case.as_dict(), run_id=run_id, preset=preset, provider=provider.name, speed_ok=provider.speed_ok,
               flop_model=provider.flop_model_for(case),
               timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), mem_method=mem_method,
               **meta)
    if timing:
        med = timing["median"]
        rec.update(repeats=timing["n"], time_median_s=med, time_p20_s=timing["p20"], time_p80_s=timing["p80"],
                   tokens_per_s=case.n_tokens / med, gflops_useful=useful_flops / med / 1e9,
                   gflops_executed=executed_flops / med / 1e9, loss=timing.get("loss"))
    elif loss is not None:
        rec.update(loss=loss)
    if mem:
        rec.update(extra_peak_mb=mem[0] / 2**20, extra_peak_excl_grads_mb=mem[1] / 2**20)
    return rec


def add_ratios(records):
    """Fill ``time_vs_naive`` / ``mem_vs_naive`` from the naive record of the same case and run."""
    base = {(r["run_id"], r["workload"], r["model"], r["vocab"], r["n_tokens"], r["dtype"], r["device"]): r
            for r in records if r["provider"] == "naive"}
    for r in records:
        b = base.get((r["run_id"], r["workload"], r["model"], r["vocab"], r["n_tokens"], r["dtype"], r["device"]))
        if b is None:
            continue
        if r.get("time_median_s") and b.get("time_median_s"):
            r["time_vs_naive"] = r["time_median_s"] / b["time_median_s"]
        if r.get("extra_peak_mb") is not None and b.get("extra_peak_mb"):
            r["mem_vs_naive"] = r["extra_peak_mb"] / b["extra_peak_mb"]
    return records
