"""The one-command GPU check runs end to end here at smoke size (Triton interpreter on CPU), so the script itself
is known to work before a GPU ever runs it."""
import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytest.importorskip("triton")


@pytest.mark.triton
def test_gpu_check_smoke_writes_a_passing_report(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["smoke"] and doc["accuracy_pass"]
    ops = {(r["op"], r["backend"]) for r in doc["accuracy"]}
    for op in ("fused_linear_logprobs", "fused_linear_kl[reverse]", "fused_linear_kl[forward]",
               "fused_linear_kl[jsd]", "KDRLLoss[kdrl,k2]"):
        assert {(op, "triton"), (op, "torch")} <= ops
    # the comparison rows are real: plain bf16 torch is measurably worse than fp32 on the log-probs
    logp = next(r for r in doc["accuracy"] if r["quantity"] == "logp" and r["backend"] == "triton")
    assert logp["torch_bf16"] > 100 * logp["torch_fp32"] and logp["ours"] < 10 * logp["torch_fp32"] + 1e-6
    providers = {r["provider"] for r in doc["speed"]}
    assert {"naive", "kdrlloss-triton", "kdrlloss-single-pass"} <= providers
    assert not [r for r in doc["speed"] if "error" in r]
    assert set(doc["tile_configs"]) >= {"logprobs_fwd (bf16)", "kl_bwd (bf16)"}
    md = (tmp_path / "gpu_check.md").read_text()
    assert "smoke, interpreter: not speeds" in md and "| KDRLLoss[kdrl,k2] | triton | loss |" in md


def test_gpu_check_refuses_a_full_run_without_cuda(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "needs an NVIDIA GPU" in proc.stderr
