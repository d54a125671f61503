"""Timing: providers interleaved round-robin in one process, medians and p20/p80 over the timed repeats.

Interleaving matters on a shared CPU: background load drifts over seconds, and running provider A's repeats
then provider B's would fold that drift into the A/B ratio. Each round runs every provider once, in an order
rotated by one per round so none is always first (first after a pause tends to find caches and turbo warm).
"""
from __future__ import annotations

import math
import sys
import time

import torch


def percentile(values, q):
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics (NumPy's default)."""
    if not values:
        raise ValueError("percentile of an empty list")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(times):
    """``{"median", "p20", "p80", "n"}`` of a list of seconds."""
    return {"median": percentile(times, 50), "p20": percentile(times, 20), "p80": percentile(times, 80),
            "n": len(times)}


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_step(provider, inp, case):
    """Seconds of one forward+backward (gradients cleared first, device synchronised around it), and the loss."""
    inp.zero_grads()
    _sync(case.device)
    start = time.perf_counter()
    loss = provider.step(inp, case)
    _sync(case.device)
    return time.perf_counter() - start, loss


def rotation(items, round_index):
    """``items`` rotated left by ``round_index`` (round-robin order of one round)."""
    k = round_index % len(items) if items else 0
    return list(items[k:]) + list(items[:k])


def run_interleaved(providers, inp, case, warmup, repeats, progress=None, step=time_step):
    """Time every provider on the same inputs: ``warmup`` untimed rounds, then ``repeats`` timed rounds.

    Returns ``{name: {"times": [s, ...], "loss": float}}``. ``progress(msg)`` is called before each step.
    ``step(provider, inp, case) -> (seconds, loss)`` runs one step (default: here, on ``inp``; the isolated
    runner passes one that asks the provider's worker process).
    """
    out = {p.name: {"times": [], "loss": None} for p in providers}
    rounds = warmup + repeats
    for r in range(rounds):
        for p in rotation(providers, r):
            tag = "warm-up" if r < warmup else f"repeat {r - warmup + 1}/{repeats}"
            if progress:
                progress(f"{p.name} {tag}")
            seconds, loss = step(p, inp, case)
            out[p.name]["loss"] = loss
            if r >= warmup:
                out[p.name]["times"].append(seconds)
    return out


def stderr_progress(prefix):
    """A progress callback writing one overwritten status line to stderr (stdout stays for the table + JSON)."""
    start = time.perf_counter()
    tty = sys.stderr.isatty()

    def report(msg):
        line = f"[{time.perf_counter() - start:6.1f}s] {prefix} {msg}"
        sys.stderr.write(f"\r\033[K{line}" if tty else line + "\n")
        sys.stderr.flush()
    return report
