"""Static GPU report: every Triton kernel of kdrl_kernels compiled ahead of time for sm_80 and sm_90.

No GPU is needed: ``kdrl_kernels.triton.aot.compile_report(archs=(80, 90))`` compiles each kernel for the target
and reads registers, spill bytes, shared memory and the tensor-core instructions (HMMA on sm_80, HGMMA on sm_90)
out of the binary. This module only calls it and formats the rows; it says "not available" when the function is
not importable in this checkout (the Triton kernels or Triton itself missing).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
from pathlib import Path

PREFERRED = ("kernel", "arch", "dtype", "registers", "stack_bytes", "spill_instructions", "shared_bytes", "hmma",
             "hgmma", "tensor_cores")


def _source_key(archs):
    """Hash of the Triton kernel sources, the Triton version and the archs: the report changes only with these."""
    spec = importlib.util.find_spec("kdrl_kernels.triton")
    h = hashlib.sha256(repr((archs, importlib.metadata.version("triton"))).encode())
    for path in sorted(Path(spec.origin).parent.glob("*.py")):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def collect(archs=(80, 90), cache_dir=None):
    """``(rows, None)`` from compile_report, or ``([], reason)`` when it cannot run here.

    With ``cache_dir`` the rows are kept in ``cache_dir/gpu_report_<hash>.json`` keyed by the kernel sources, so a
    rerun with unchanged kernels costs nothing (compiling everything takes about 40 CPU-seconds).
    """
    try:
        aot = importlib.import_module("kdrl_kernels.triton.aot")
        fn = aot.compile_report
    except (ImportError, AttributeError) as err:
        return [], f"not available ({err})"
    cache = Path(cache_dir) / f"gpu_report_{_source_key(archs)}.json" if cache_dir else None
    if cache is not None and cache.exists():
        return json.loads(cache.read_text()), None
    try:
        rows = [dict(r) for r in fn(archs=archs, progress=True)]    # progress lines go to stderr
    except Exception as err:  # a compiler failure must not cost the user the timing results
        return [], f"compile_report failed: {type(err).__name__}: {err}"
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(rows))
    return rows, None


def _columns(rows):
    keys = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    return [k for k in PREFERRED if k in keys] + [k for k in keys if k not in PREFERRED]


def text(rows, reason=None) -> str:
    """The report as a table: the library's own ``format_table`` when present, else every field aligned."""
    if not rows:
        return f"\nStatic GPU report (sm_80, sm_90): {reason or 'no kernels reported'}"
    title = "\nStatic GPU report (Triton kernels compiled ahead of time for sm_80 / sm_90; no GPU needed):"
    try:
        return title + "\n" + importlib.import_module("kdrl_kernels.triton.aot").format_table(rows)
    except (ImportError, AttributeError, KeyError):
        pass
    cols = _columns(rows)
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([title, line(cols)] + [line(row) for row in cells])
