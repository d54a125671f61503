"""The GPU check's dry run: the device command at smoke size on CPU under the Triton interpreter, so its first run on
a GPU machine has no surprises; and its part runner: time caps, failures that do not stop the other parts.

``KDRL_TEST_PYTHONS`` (interpreters separated by ``os.pathsep``, e.g. a venv with the GPU image's Triton 3.6.0) adds
a slow dry run of every part under each of them.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytest.importorskip("triton")
OPS = ("fused_linear_logprobs", "fused_linear_kl[reverse]", "fused_linear_kl[forward]", "fused_linear_kl[jsd]",
       "KDRLLoss[kdrl,k2]")
OTHER_PYTHONS = [p for p in os.environ.get("KDRL_TEST_PYTHONS", "").split(os.pathsep) if p]


def _device_run(tmp_path, *args, python=None):
    """``bash bench/gpu_check.sh --device-run --smoke`` as the GPU machine would start it: $OUT set, cwd the repo."""
    env = dict(os.environ, OUT=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)  # the script must set it itself for --smoke
    if python:
        env["PYTHON"] = python
    return subprocess.run(["bash", "bench/gpu_check.sh", "--device-run", "--smoke", *args], capture_output=True,
                          text=True, timeout=900, cwd=REPO, env=env)


def _check_report(proc, out, parts):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "gpu_check.json").read_text())
    assert doc["smoke"] and doc["accuracy_pass"]
    assert [(p["part"], p["status"], p["finished"]) for p in doc["parts"]] == [(p, "ok", True) for p in parts]
    got = {(r["op"], r["backend"], r["dtype"]) for r in doc["accuracy"]}
    assert {(op, b, dt) for op in OPS for b in ("triton", "torch") for dt in ("bf16", "fp32")} <= got
    # the comparison rows are real: plain bf16 torch is measurably worse than fp32 on the log-probs
    logp = next(r for r in doc["accuracy"] if r["quantity"] == "logp" and r["backend"] == "triton"
                and r["dtype"] == "bf16")
    assert logp["torch_bf16"] > 100 * logp["torch_fp32"] and logp["ours"] < 10 * logp["torch_fp32"] + 1e-6
    assert {"naive", "kdrlloss-triton", "kdrlloss-single-pass"} <= {r["provider"] for r in doc["speed"]}
    assert not [r for r in doc["speed"] if "error" in r]
    assert {("logprobs_fwd", "bf16"), ("kl_bwd", "fp32")} <= {(c["kernel"], c["dtype"]) for c in doc["tiles"]}
    md = (out / "gpu_check.md").read_text()
    assert "smoke, interpreter: not speeds" in md and "| KDRLLoss[kdrl,k2] | bf16 | 37 | triton | loss |" in md
    # the summary comes last, and its last line is one JSON object
    lines = proc.stdout.strip().splitlines()
    assert any(line.startswith("== GPU check summary (smoke) ==") for line in lines[-12:])
    last = json.loads(lines[-1])
    assert last["accuracy_pass"] and last["parts"] == {p: "ok" for p in parts}
    return doc


@pytest.mark.triton
def test_device_run_dry_run_writes_a_passing_report_under_out(tmp_path):
    # Liger is left out here (torch.compile costs ~30 s); the GPU image has no Liger and the slow test runs it.
    parts = ("accuracy", "speed", "tiles")
    proc = _device_run(tmp_path, "--parts", *parts)
    doc = _check_report(proc, tmp_path / "gpu_check", parts)
    assert doc["meta"]["interpreter"] == "1" and doc["meta"]["python"]


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.parametrize("python", OTHER_PYTHONS or [pytest.param(None, marks=pytest.mark.skip(
    reason="set KDRL_TEST_PYTHONS to interpreters with another Triton (e.g. the GPU image's 3.6.0)"))])
def test_device_run_dry_run_under_another_python(tmp_path, python):
    from bench.gpu_check_parts import PARTS
    proc = _device_run(tmp_path, python=python)
    doc = _check_report(proc, tmp_path / "gpu_check", PARTS)
    version = subprocess.run([python, "-c", "import triton; print(triton.__version__)"], capture_output=True,
                             text=True).stdout.strip()
    assert doc["meta"]["triton"] == version


def test_a_part_past_its_cap_is_killed_and_a_failed_part_does_not_stop_the_next(tmp_path, monkeypatch):
    from bench import gpu_check
    fake = tmp_path / "fake_python"
    # argv: -m bench.gpu_check_parts PART ...: accuracy fails, speed hangs, tiles runs for real (smoke)
    fake.write_text(f'#!/bin/sh\ncase "$3" in\n  accuracy) echo boom; exit 3;;\n  speed) exec sleep 60;;\n'
                    f'esac\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setitem(gpu_check.CAPS, "speed", 6)
    doc = gpu_check.collect(tmp_path, smoke=True, parts=("accuracy", "speed", "tiles"), python=str(fake))
    status = {p["part"]: p for p in doc["parts"]}
    assert status["accuracy"]["status"] == "failed" and status["accuracy"]["rc"] == 3
    assert "boom" in status["accuracy"]["log_tail"]
    assert status["speed"]["status"] == "timed out" and status["speed"]["seconds"] < 15
    assert status["tiles"]["status"] == "ok" and status["tiles"]["finished"] and doc["tiles"]
    assert not doc["accuracy_pass"]  # no accuracy rows is not a pass
    md = gpu_check.markdown(doc)
    assert "| speed | timed out (unfinished) |" in md and "## Log tail of part accuracy (failed)" in md
    assert json.loads(gpu_check.summary(doc, tmp_path).splitlines()[-1])["parts"]["speed"] == "timed out"


def test_the_budget_leaves_parts_unrun_rather_than_overrun(tmp_path):
    from bench import gpu_check
    doc = gpu_check.collect(tmp_path, smoke=True, budget_s=1, parts=("tiles",))
    assert [(p["part"], p["status"]) for p in doc["parts"]] == [("tiles", "not run")]


def test_the_caps_fit_the_device_budget():
    from bench import gpu_check
    # one 15-minute loan must leave room for a rerun: the whole check stays within 8 minutes
    assert sum(gpu_check.CAPS.values()) <= gpu_check.BUDGET_S <= 8 * 60


def test_gpu_check_refuses_a_full_run_without_cuda(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "needs an NVIDIA GPU" in proc.stderr


def test_liger_part_without_liger_writes_a_skipped_row(tmp_path, monkeypatch):
    # the GPU image has no liger-kernel: the part must say so, not fail
    import importlib.util
    from bench import gpu_check_parts as parts
    real = importlib.util.find_spec
    monkeypatch.setattr(parts.importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel"
                        else real(name, *a))
    sink = parts.Part(tmp_path / "liger.jsonl", cap_s=60)
    parts.liger(None, sink, parts.SMOKE, "cpu", ("torch",))
    rows = [json.loads(line) for line in (tmp_path / "liger.jsonl").read_text().splitlines()]
    assert rows == [dict(kind="speed", provider="liger-grpo", skipped="liger-kernel is not installed")]


def test_the_float64_reference_in_row_chunks_equals_the_whole():
    # the GPU run splits the float64 reference by rows (58 GB in one piece for jsd at N = 4096): same ground truth
    import torch
    from bench import gpu_check_parts as parts
    x = parts._inputs(torch, 37, 40, 24, 203, "cpu", torch.bfloat16)
    for op, _names, ref, _ours, separable in parts._accuracy_groups(torch, x, ()):
        if not separable:
            continue
        whole, pieces = ref(torch.float64), parts._float64_ref(torch, ref, 37, 16)
        for a, b in zip(whole[0] + whole[1], pieces[0] + pieces[1]):
            assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-12, atol=1e-14), op


@pytest.mark.triton
def test_compiled_kernels_reads_registers_from_a_jit_cache_entry(tmp_path, monkeypatch):
    # Only a GPU fills the JIT caches; here one entry is built the way a launch builds it (an ASTSource from the
    # installed Triton), so the reading code meets the real internals of this Triton before the GPU run does.
    import torch
    from types import SimpleNamespace
    from bench import gpu_check_parts as parts
    from kdrl_kernels.triton import aot, logprobs
    real = logprobs._logprobs_fwd_kernel
    if not hasattr(real, "device_caches"):
        pytest.skip("kernels were decorated under TRITON_INTERPRET in this process")
    src = aot.build_source(real, torch.bfloat16, dict(HAS_BIAS=False), dict(BLOCK_N=64, BLOCK_V=128, BLOCK_D=64))
    compiled = SimpleNamespace(src=src, name="_logprobs_fwd_kernel", n_regs=176, n_spills=0,
                               metadata=SimpleNamespace(num_warps=8, num_stages=3, shared=49152))
    fake = SimpleNamespace(device_caches={0: ({"key": compiled}, {}, None, None, None)}, arg_names=real.arg_names)
    monkeypatch.setattr(logprobs, "_logprobs_fwd_kernel", fake)
    sink = parts.Part(tmp_path / "compiled.jsonl", cap_s=60)
    parts.compiled_kernels(sink)
    rows = [json.loads(line) for line in (tmp_path / "compiled.jsonl").read_text().splitlines()]
    assert rows == [dict(kind="compiled", kernel="_logprobs_fwd_kernel", input="*bf16", BLOCK_N=64, BLOCK_V=128,
                         BLOCK_D=64, PRECISION="tf32", num_warps=8, num_stages=3, shared_bytes=49152, registers=176,
                         spill_bytes=0)]


def test_an_op_that_raises_becomes_an_error_row_and_the_rest_is_measured(tmp_path):
    import torch
    from bench import gpu_check_parts as parts
    sink = parts.Part(tmp_path / "accuracy.jsonl", cap_s=120)
    parts.accuracy(torch, sink, parts.SMOKE, "cpu", ("torch", "no-such-backend"))
    rows = [json.loads(line) for line in (tmp_path / "accuracy.jsonl").read_text().splitlines()]
    broken = [r for r in rows if r["backend"] == "no-such-backend"]
    assert len(broken) == 10 and all("backend must be one of" in r["error"] for r in broken)  # 5 ops x 2 dtypes
    good = [r for r in rows if r["backend"] == "torch"]
    assert len(good) == 2 * (5 + 3 * 3 + 3) and all(r["pass"] for r in good)
