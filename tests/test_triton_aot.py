"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 without a GPU, without spills, on tensor cores.

Runs ``python -m kdrl_kernels.triton.aot --json`` in a subprocess with TRITON_INTERPRET unset: kernels decorated
in interpreter mode (another test module may have set it) cannot be compiled. About 45 s for bf16 on 2 cores;
the full bf16 + fp32 matrix is the slow test, and ``KDRL_TEST_PYTHONS`` (interpreters separated by ``os.pathsep``,
e.g. a venv with Triton 3.6.0) adds a slow full matrix under each of them: ptxas differs between Triton releases.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

pytestmark = pytest.mark.triton
ROOT = Path(__file__).resolve().parents[1]


OTHER_PYTHONS = [p for p in os.environ.get("KDRL_TEST_PYTHONS", "").split(os.pathsep) if p]


def _report(*args, python=sys.executable):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's current default, set to silence its warning
    proc = subprocess.run([python, "-m", "kdrl_kernels.triton.aot", "--json", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(rows, dtypes):
    from kdrl_kernels.triton.aot import KERNELS
    names = {k[0] for k in KERNELS}
    assert {(r["kernel"], r["arch"], r["dtype"]) for r in rows} == \
        {(n, a, d) for n in names for a in ("sm_80", "sm_90") for d in dtypes}
    for r in rows:
        where = f"{r['kernel']} {r['arch']} {r['dtype']}"
        assert r["source"] == "sass", f"{where}: cuobjdump from the triton wheel did not run"
        assert r["stack_bytes"] == 0 and r["spill_instructions"] == 0, f"{where} spills: {r}"
        assert 0 < r["registers"] <= 255
        if r["dtype"] == "bf16":
            key = "hgmma" if r["arch"] == "sm_90" else "hmma"
            assert r[key] > 0, f"{where}: no tensor-core instructions ({key})"


def test_aot_bf16_all_kernels():
    _check(_report("--dtype", "bf16"), ["bf16"])


@pytest.mark.slow
def test_aot_full_matrix():
    _check(_report("--dtype", "bf16", "fp32"), ["bf16", "fp32"])


@pytest.mark.slow
@pytest.mark.parametrize("python", OTHER_PYTHONS or [pytest.param(None, marks=pytest.mark.skip(
    reason="set KDRL_TEST_PYTHONS to interpreters with another Triton (e.g. the GPU image's 3.6.0)"))])
def test_aot_full_matrix_under_another_python(python):
    _check(_report("--dtype", "bf16", "fp32", python=python), ["bf16", "fp32"])
