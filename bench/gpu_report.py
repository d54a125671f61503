"""Static GPU report: every Triton kernel of kdrl_kernels compiled ahead of time for sm_80 and sm_90.

No GPU is needed: ``kdrl_kernels.triton.aot.compile_report(archs=(80, 90))`` compiles each kernel for the target
and reads registers, spill bytes, shared memory and the tensor-core instructions (HMMA on sm_80, HGMMA on sm_90)
out of the binary. This module only calls it and formats the rows; it says "not available" when the function is
not importable in this checkout (the Triton kernels or Triton itself missing).
"""
from __future__ import annotations

import importlib

PREFERRED = ("kernel", "name", "arch", "config", "registers", "spill_bytes", "shared_bytes", "shared_memory",
             "tensor_core", "tensor_core_instructions", "mma", "num_warps", "num_stages")


def collect(archs=(80, 90)):
    """``(rows, None)`` from compile_report, or ``([], reason)`` when it cannot run here."""
    try:
        aot = importlib.import_module("kdrl_kernels.triton.aot")
        fn = aot.compile_report
    except (ImportError, AttributeError) as err:
        return [], f"not available ({err})"
    try:
        rows = fn(archs=archs)
    except Exception as err:  # a compiler failure must not cost the user the timing results
        return [], f"compile_report failed: {type(err).__name__}: {err}"
    return [dict(r) for r in rows], None


def _columns(rows):
    keys = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    return [k for k in PREFERRED if k in keys] + [k for k in keys if k not in PREFERRED]


def text(rows, reason=None) -> str:
    """The report as an aligned text table (or the reason it is missing)."""
    if not rows:
        return f"\nStatic GPU report (sm_80, sm_90): {reason or 'no kernels reported'}"
    cols = _columns(rows)
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join(["\nStatic GPU report (Triton, compiled ahead of time, no GPU needed):", line(cols)]
                     + [line(row) for row in cells])
