"""Triton kernels run by the interpreter on CPU against float64 ground truth (see tests/_triton_interp_worker.py).

The kernels run in ONE fresh subprocess with ``TRITON_INTERPRET=1`` set before triton is imported: Triton decides
interpreter vs. compiler when a kernel is decorated, so this is robust whatever other test modules imported
first. About 35 s on a 2-core machine. ``KDRL_TEST_PYTHONS`` (interpreters separated by ``os.pathsep``, e.g. a
venv with Triton 3.6.0, the GPU image's version) adds a slow test that runs every case under each of them.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from _triton_interp_worker import API_CASES, KL_CASES, KL_FLOOR, LOGPROB_CASES  # noqa: E402

pytestmark = pytest.mark.triton
ROOT = Path(__file__).resolve().parents[1]


OTHER_PYTHONS = [p for p in os.environ.get("KDRL_TEST_PYTHONS", "").split(os.pathsep) if p]


def _run_worker(python):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([python, str(ROOT / "tests" / "_triton_interp_worker.py")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"interpreter worker failed under {python} (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results():
    return _run_worker(sys.executable)


def _check_logprobs(res):
    bad = {k: v for k, v in res["excess"].items() if v > 0}
    assert not bad, f"|ours - gt| exceeds |torch_lowprec - gt| + tol by {bad}"
    assert {"logp", "entropy", "lse", "grad_hidden", "grad_weight"} <= set(res["excess"])
    assert res["logp_max"] <= 0.0, "log-probs must be <= 0"
    assert res["ignored_rows_zero"], "ignored rows must write 0 in every output and get 0 gradient"
    assert res["dtypes_ok"]


def _check_kl(res):
    bad = {k: v for k, v in res["excess"].items() if v > 0}
    assert not bad, f"|ours - gt| exceeds |torch_lowprec - gt| + tol by {bad}"
    assert {"kl", "grad_s_hidden", "grad_s_weight"} <= set(res["excess"])
    assert res["kl_min"] >= -KL_FLOOR, "divergences must be >= 0"
    assert res["kl_rel_err"] < 5e-3, "fp32 logits must keep even a small KL accurate"
    assert res["ignored_rows_zero"], "masked rows must write 0 and get 0 gradient"
    assert res["dtypes_ok"]


@pytest.mark.parametrize("case", sorted(LOGPROB_CASES))
def test_logprobs_matches_float64(results, case):
    _check_logprobs(results[f"logprobs/{case}"])


@pytest.mark.parametrize("case", sorted(KL_CASES))
def test_kl_matches_float64(results, case):
    _check_kl(results[f"kl/{case}"])


@pytest.mark.parametrize("case", sorted(API_CASES))
def test_public_api_triton_backend_matches_torch_backend(results, case):
    assert results[f"api/{case}"]["max_rel_diff"] < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("python", OTHER_PYTHONS or [pytest.param(None, marks=pytest.mark.skip(
    reason="set KDRL_TEST_PYTHONS to interpreters with another Triton (e.g. the GPU image's 3.6.0)"))])
def test_every_case_under_another_python(python):
    res = _run_worker(python)
    for case in LOGPROB_CASES:
        _check_logprobs(res[f"logprobs/{case}"])
    for case in KL_CASES:
        _check_kl(res[f"kl/{case}"])
    for case in API_CASES:
        assert res[f"api/{case}"]["max_rel_diff"] < 1e-5, case
