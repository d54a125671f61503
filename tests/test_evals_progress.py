"""What a user sees while a run goes: the default model, the start banner and the loud note when vLLM is missing,
the overall ETA, time-based saves (chunk sizes from the measured pace) and a partial results.json + leaderboard
after every save. Fakes stand in for the model, so nothing here loads one."""
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from evals import run as run_mod
from evals.progress import RunProgress, fmt_duration, projected_seconds
from evals.runner import EvalSettings, evaluate_task, next_chunk_size
from evals.store import RunStore
from kdrl.data import load_task
from kdrl.generation import Completion, SamplingConfig
from kdrl.models import DEFAULT_MODEL, REGISTRY

REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_eta_from_prior_then_from_the_runs_own_pace():
    clock = FakeClock()
    noon = datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc)
    p = RunProgress(total_samples=100, done_samples=20, max_new_tokens=512, prior_tok_s=10.0, clock=clock,
                    now=lambda: noon)
    # Before any chunk: 80 samples x 0.85 x 512 tokens at the measured 10 tok/s.
    assert p.eta_seconds() == pytest.approx(80 * 0.85 * 512 / 10)
    assert "projected" in p.line() and "20/100 samples (20.0%)" in p.line()
    clock.t += 100  # 10 samples of 50 tokens in 100 s: 5 tok/s, 50 tokens per answer
    p.update(samples=10, tokens=500)
    assert p.tok_s() == pytest.approx(5.0) and p.tokens_per_sample() == pytest.approx(50)
    assert p.eta_seconds() == pytest.approx(70 * 50 / 5)  # 700 s
    line = p.line()
    assert "30/100 samples" in line and "500 tokens" in line and "ETA 11 min (about 12:11 UTC)" in line
    clock.t += 700
    p.update(samples=70, tokens=3500)
    assert p.eta_seconds() == 0 and line != p.line() and p.line().endswith("done")


def test_eta_without_a_prior_waits_for_the_first_chunk():
    p = RunProgress(total_samples=5, done_samples=0, max_new_tokens=64, prior_tok_s=None)
    assert p.eta_seconds() is None and "ETA after the first chunk" in p.line()
    assert projected_seconds(10, 512, "some/hub-model", "hf") is None
    fast, slow = projected_seconds(100, 512, "qwen2.5-coder-0.5b-instruct", "vllm")
    assert 0 < fast < slow
    assert [fmt_duration(s) for s in (5, 89, 600, 5400, 3 * 3600 + 125)] == ["5 s", "89 s", "10 min", "1 h 30 min",
                                                                             "3 h 02 min"]


def test_chunk_sizes_follow_the_pace():
    assert next_chunk_size(64, None, None, None) == 64          # fixed chunks without save_every
    assert next_chunk_size(64, 180, None, None) == 16           # first chunk: a quarter, results appear early
    assert next_chunk_size(16, 180, None, None) == 4
    assert next_chunk_size(64, 180, 16, 360.0) == 8             # 22.5 s per problem: 8 fit in 180 s
    assert next_chunk_size(64, 180, 16, 10.0) == 64             # fast: capped at chunk_size
    assert next_chunk_size(64, 180, 1, 1000.0) == 1             # slower than save_every: one problem at a time
    assert next_chunk_size(2, 180, None, None) == 1
    # Never below one batch of the backend (smaller generate calls waste its batching), nor above chunk_size.
    assert next_chunk_size(64, 180, 1, 1000.0, min_chunk=16) == 16
    assert next_chunk_size(16, 180, None, None, min_chunk=16) == 16
    assert next_chunk_size(8, 180, 1, 1000.0, min_chunk=16) == 8


class EchoTokenizer:
    chat_template = "echo"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return messages[-1]["content"]


class SlowGenerator:
    """Answers every problem correctly with 7 tokens, and takes `seconds_per_problem` of the fake clock."""

    def __init__(self, golds, clock, seconds_per_problem):
        self.tokenizer, self.golds, self.clock, self.spp = EchoTokenizer(), golds, clock, seconds_per_problem
        self.model_path, self.calls = Path("/fake/model"), []

    def generate(self, prompts, sampling, progress=False):
        self.calls.append(len(prompts))
        self.clock.t += self.spp * len(prompts)
        return [[Completion(f"\\boxed{{{self.golds[p]}}}", [1] * 7, "stop") for _ in range(sampling.n)]
                for p in prompts]

    def info(self):
        return {"backend": "fake"}


def test_saves_come_at_least_every_save_every_seconds(tmp_path, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr("evals.runner.time.monotonic", clock)
    problems = load_task("amc23", limit=30)
    gen = SlowGenerator({p.question: p.answer for p in problems}, clock, seconds_per_problem=20.0)
    settings = EvalSettings(SamplingConfig(max_new_tokens=16), chunk_size=16, limit=30, save_every=60.0)
    saves = []
    evaluate_task(gen, "amc23", settings, RunStore(tmp_path / "run"), progress=False,
                  on_chunk=lambda **kw: saves.append((clock.t, kw)))
    assert gen.calls[0] == 4 and set(gen.calls[1:-1]) == {3}  # a quarter first, then 3 x 20 s = 60 s per save
    assert sum(gen.calls) == 30 and len(saves) == len(gen.calls)
    times = [1000.0] + [t for t, _ in saves]
    assert max(b - a for a, b in zip(times[1:], times[2:])) <= 60.0
    assert saves[0][1] == {"task": "amc23", "samples": 4, "tokens": 28, "seconds": 80.0}
    # Without save_every the chunks are fixed.
    gen2 = SlowGenerator(gen.golds, clock, 20.0)
    evaluate_task(gen2, "amc23", EvalSettings(SamplingConfig(max_new_tokens=16), chunk_size=16, limit=30),
                  RunStore(tmp_path / "run2"), progress=False)
    assert gen2.calls == [16, 14]


def test_default_model_is_the_trainers_student():
    assert DEFAULT_MODEL == "qwen2.5-coder-0.5b-instruct" and DEFAULT_MODEL in REGISTRY
    students = {}
    for path in sorted((REPO / "configs").glob("*.yaml")):
        tree = yaml.safe_load(path.read_text())
        students[path.name] = (tree["train"] if "train" in tree else tree)["model"]["student"]  # a study: its arms'
    real = {name: s for name, s in students.items() if name != "smoke.yaml"}  # smoke: the plumbing check
    assert real and set(real.values()) == {DEFAULT_MODEL}, students
    assert run_mod.build_parser().parse_args([]).model == DEFAULT_MODEL


def _fake_main(tmp_path, monkeypatch, capsys, argv, vllm=False):
    """run.main with a fake generator: records what the run would load, shows what it prints and writes."""
    clock = FakeClock()
    monkeypatch.setattr("evals.runner.time.monotonic", clock)
    monkeypatch.setattr("evals.run.vllm_available", lambda: vllm)
    made = {}

    def fake_make_generator(model, backend, **kw):
        made.update(model=model, backend=backend)
        golds = {p.question: p.answer for t in ("aime24", "amc23") for p in load_task(t)}
        return SlowGenerator(golds, clock, seconds_per_problem=50.0)

    monkeypatch.setattr("evals.run.make_generator", fake_make_generator)
    snapshots = []
    real_write = run_mod.write_leaderboard

    def spy_write(out_dir):  # what a user opening the folder would read after each save
        paths = real_write(out_dir)
        snapshots.append({"md": paths[0].read_text(),
                          "results": json.loads(next(Path(out_dir).glob("*/results.json")).read_text())})
        return paths

    monkeypatch.setattr("evals.run.write_leaderboard", spy_write)
    monkeypatch.setattr("evals.leaderboard.plot_scatter", lambda runs, path: Path(path))  # no PNG: time
    results = run_mod.main(argv + ["--output-dir", str(tmp_path / "out"), "--no-progress"])
    return results, made, snapshots, capsys.readouterr().err


def test_fallback_to_transformers_is_loud_and_projects_the_time(tmp_path, monkeypatch, capsys):
    results, made, snapshots, err = _fake_main(tmp_path, monkeypatch, capsys, ["--tasks", "aime24", "--limit", "8"])
    assert made == {"model": DEFAULT_MODEL, "backend": "hf"}
    assert results["model"] == DEFAULT_MODEL and "Q4_K_M" in results["model_source"]
    assert "vLLM is not installed: falling back to transformers" in err and "bash scripts/setup_eval.sh" in err
    assert "projected" in err and "8 samples" in err and str(tmp_path / "out") in err
    assert "progress 8/8 samples" in err and "ETA" in err
    assert results["status"] == "complete"


def test_no_loud_note_when_vllm_is_there_or_hf_is_asked_for(tmp_path, monkeypatch, capsys):
    _, made, _, err = _fake_main(tmp_path, monkeypatch, capsys, ["--tasks", "aime24", "--limit", "2"], vllm=True)
    assert made["backend"] == "vllm" and "falling back" not in err and "backend  vllm" in err
    _, made, _, err = _fake_main(tmp_path, monkeypatch, capsys, ["--tasks", "aime24", "--limit", "2", "--backend",
                                                                 "hf", "--run-name", "explicit"])
    assert made["backend"] == "hf" and "falling back" not in err


def test_partial_results_and_leaderboard_after_each_save(tmp_path, monkeypatch, capsys):
    # 50 s per problem, saves every 120 s, hf batches of 2: chunks of 4 (first), then 2 problems; two tasks of 6.
    results, _, snapshots, err = _fake_main(
        tmp_path, monkeypatch, capsys,
        ["--tasks", "aime24,amc23", "--limit", "6", "--save-every", "120", "--chunk-size", "16", "--batch-size", "2"])
    partial = [s for s in snapshots if s["results"]["status"] == "partial"]
    assert len(partial) >= 4 and snapshots[-1]["results"]["status"] == "complete"
    first = partial[0]
    assert first["results"]["progress"] == {"done_samples": 4, "total_samples": 12}
    assert set(first["results"]["tasks"]) == {"aime24"} and first["results"]["tasks"]["aime24"]["n_problems"] == 4
    assert "PARTIAL 4/12 samples" in first["md"] and "AIME24" in first["md"]
    assert [s["results"]["progress"]["done_samples"] for s in partial] == sorted(
        s["results"]["progress"]["done_samples"] for s in partial)
    assert "PARTIAL" not in snapshots[-1]["md"].split("\n\n")[1]  # the finished run's row
    assert err.count("progress ") == len(partial) and "progress 12/12 samples" in err
    assert results["tasks"]["amc23"]["n_problems"] == 6
