"""Each provider in a process of its own, still timed round-robin (A B C, B C A, ...), for its best showing.

Why: in one process, a torch.compile'd provider (Liger) slowed the eager ones that ran after it (naive's Qwen-shape
bf16 KDRL step: 10.8 s in the same process as Liger, 6.1-6.4 s without it). Compiled CPU kernels bring their own
OpenMP thread pool and state into the process; whatever the exact mechanism, a process per provider removes it.
Interleaving is kept: each round asks every worker for one step in turn, so background load drifts still hit all
providers alike, and a worker that is not stepping is blocked on a pipe read (no CPU).

Protocol: the parent writes ``step`` lines to a worker's stdin; the worker answers one JSON line per step,
``{"seconds": s, "loss": x}`` or ``{"error": "..."}``. Inputs are built in the worker from the case with the same
seed as in-process runs, so every provider sees identical tensors. ``python -m bench.isolated --case JSON
--provider NAME`` is the worker's entry point.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def command(module, case, provider_name, liger_compiled=True, threads=None):
    """The command line of a one-provider, one-case child process (``python -m <module> --case ...``)."""
    cmd = [sys.executable, "-m", module, "--case", json.dumps(case.as_dict()), "--provider", provider_name]
    if not liger_compiled:
        cmd.append("--liger-eager")
    if threads:
        cmd += ["--threads", str(threads)]
    return cmd


def environment(**extra):
    """The child's environment: ours, with the repository importable, plus ``extra``."""
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)


def child_setup(argv, description):
    """Parse a child's command line (see :func:`command`): set the thread count, return ``(case, provider)``."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--case", required=True, help="JSON of a workloads.Case")
    ap.add_argument("--provider", required=True)
    ap.add_argument("--liger-eager", action="store_true")
    ap.add_argument("--threads", type=int)
    args = ap.parse_args(argv)
    import torch

    from bench import providers, workloads
    if args.threads:
        torch.set_num_threads(args.threads)
    (provider,) = providers.select([args.provider], liger_compiled=not args.liger_eager)
    return workloads.Case(**json.loads(args.case)), provider


class WorkerError(RuntimeError):
    """A worker's step failed (the message is the worker's own, first line) or the worker died."""


class Worker:
    """A provider living in its own interpreter; ``step()`` returns ``(seconds, loss)`` measured in the worker."""

    def __init__(self, case, provider, liger_compiled=True, threads=None):
        self.name = provider.name
        self.proc = subprocess.Popen(command("bench.isolated", case, provider.name, liger_compiled, threads),
                                     cwd=REPO, env=environment(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)

    def step(self):
        if self.proc.poll() is not None:
            raise WorkerError(f"{self.name} worker exited with code {self.proc.returncode}: {self._stderr()}")
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise WorkerError(f"{self.name} worker exited with code {self.proc.returncode}: {self._stderr()}")
        msg = json.loads(line)
        if "error" in msg:
            raise WorkerError(msg["error"])
        return msg["seconds"], msg["loss"]

    def _stderr(self):
        try:
            return (self.proc.stderr.read() or "")[-1000:]
        except (OSError, ValueError):
            return ""

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            f.close()


class Pool:
    """One :class:`Worker` per provider for one case; a context manager that ends every worker on exit."""

    def __init__(self, case, providers, liger_compiled=True, threads=None):
        self.workers = {}
        try:
            for p in providers:
                self.workers[p.name] = Worker(case, p, liger_compiled, threads)
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for w in self.workers.values():
            w.close()

    def step(self, provider):
        return self.workers[provider.name].step()

    def drop(self, provider):
        self.workers.pop(provider.name).close()


def serve(provider, inp, case, lines=sys.stdin, out=sys.stdout):
    """Worker loop: one timed step per ``step`` line, answered with one JSON line; ends at EOF."""
    from bench import timing
    for line in lines:
        if line.strip() != "step":
            continue
        try:
            seconds, loss = timing.time_step(provider, inp, case)
            msg = {"seconds": seconds, "loss": loss}
        except Exception as err:  # reported to the parent, which records it as the provider's note
            msg = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
        out.write(json.dumps(msg) + "\n")
        out.flush()


def main(argv=None):
    from bench import workloads
    case, provider = child_setup(argv, "benchmark worker: one provider, one case, steps on request")
    serve(provider, workloads.make_inputs(case), case)


if __name__ == "__main__":
    main()
