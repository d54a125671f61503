"""The evaluation loop (evals.runner) and its store: interrupted runs resume without redoing or losing samples."""
import json

import pytest

from evals.runner import EvalSettings, _regrade, evaluate_task
from evals.store import RunStore
from kdrl.data import load_task
from kdrl.generation import Completion, SamplingConfig


class EchoTokenizer:
    """Stands in for a chat tokenizer: the prompt is the question itself."""
    chat_template = "echo"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return messages[-1]["content"]


class ScriptedGenerator:
    """Answers correctly on even-numbered samples; raises KeyboardInterrupt on call number `fail_on` (1-based)."""

    def __init__(self, golds: dict[str, str], fail_on: int | None = None):
        self.tokenizer = EchoTokenizer()
        self.golds, self.fail_on = golds, fail_on
        self.calls: list[list[str]] = []

    def generate(self, prompts, sampling, progress=False):
        self.calls.append(list(prompts))
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise KeyboardInterrupt("simulated interruption")
        return [[Completion(f"\\boxed{{{self.golds[p] if j % 2 == 0 else 'x'}}}", [1] * (3 + j), "stop")
                 for j in range(sampling.n)] for p in prompts]


@pytest.fixture()
def setup(tmp_path):
    problems = load_task("aime24", limit=7)
    golds = {p.question: p.answer for p in problems}
    settings = EvalSettings(SamplingConfig(max_new_tokens=16, temperature=0.7, n=2), chunk_size=2, limit=7)
    return problems, golds, settings, RunStore(tmp_path / "run")


def _keys(store):
    return sorted((r["id"], r["sample"]) for r in store.load("aime24"))


def test_interrupted_run_resumes_without_redoing_or_losing(setup):
    problems, golds, settings, store = setup
    first = ScriptedGenerator(golds, fail_on=3)
    with pytest.raises(KeyboardInterrupt):
        evaluate_task(first, "aime24", settings, store, progress=False)
    done_before = _keys(store)
    assert len(done_before) == 2 * 2 * 2  # two finished chunks of 2 problems x 2 samples each
    # A write cut off mid-line by the interruption must not break the resume.
    with open(store.path("aime24"), "a") as f:
        f.write('{"task": "aime24", "id": "2024-I-9", "sam')

    second = ScriptedGenerator(golds)
    metrics = evaluate_task(second, "aime24", settings, store, progress=False)
    asked = [q for call in second.calls for q in call]
    finished_questions = {p.question for p in problems if (p.id, 0) in set(done_before)}
    assert not finished_questions & set(asked), "finished problems were generated again"
    assert len(asked) == 7 - 4
    keys = _keys(store)
    assert keys == sorted({(p.id, j) for p in problems for j in range(2)})  # all there, none twice
    assert set(done_before) <= set(keys)
    assert metrics["n_problems"] == 7 and metrics["n_samples"] == 2
    assert metrics["accuracy"] == pytest.approx(0.5) and metrics["pass_at_k"]["2"] == pytest.approx(1.0)
    assert metrics["generation"]["new_samples"] == 6
    assert metrics["generation"]["samples"] == 14  # timing accumulates over both invocations
    # Every line of the file is valid JSON again.
    lines = store.path("aime24").read_text().splitlines()
    assert len(lines) == 14 and all(json.loads(line) for line in lines)


def test_missing_single_sample_is_regenerated_alone(setup):
    problems, golds, settings, store = setup
    evaluate_task(ScriptedGenerator(golds), "aime24", settings, store, progress=False)
    lines = store.path("aime24").read_text().splitlines()
    dropped = json.loads(lines[3])
    store.path("aime24").write_text("\n".join(lines[:3] + lines[4:]) + "\n")
    again = ScriptedGenerator(golds)
    evaluate_task(again, "aime24", settings, store, progress=False)
    assert [q for call in again.calls for q in call] == [next(p.question for p in problems if p.id == dropped["id"])]
    assert len(store.load("aime24")) == 14 and len(set(_keys(store))) == 14


def test_a_finished_run_generates_nothing(setup):
    _, golds, settings, store = setup
    evaluate_task(ScriptedGenerator(golds), "aime24", settings, store, progress=False)
    idle = ScriptedGenerator(golds, fail_on=1)  # would raise if asked for anything
    assert evaluate_task(idle, "aime24", settings, store, progress=False)["n_problems"] == 7
    assert idle.calls == []


def test_resume_refuses_other_settings(tmp_path):
    store = RunStore(tmp_path / "run")
    store.check_config({"model": "a", "limit": 5})
    store.check_config({"model": "a", "limit": 5})
    with pytest.raises(ValueError, match="other settings"):
        store.check_config({"model": "a", "limit": 6})


def test_records_carry_what_the_issue_asks(setup):
    _, golds, settings, store = setup
    evaluate_task(ScriptedGenerator(golds), "aime24", settings, store, progress=False)
    rec = store.load("aime24")[0]
    for key in ("prompt", "response", "extracted", "correct", "tokens", "finish_reason", "gold", "boxed"):
        assert key in rec
    assert rec["tokens"] == 3 and rec["boxed"] and rec["correct"]


def test_regrade_rewrites_verdicts_without_generating(setup):
    _, golds, settings, store = setup
    evaluate_task(ScriptedGenerator(golds), "aime24", settings, store, progress=False)
    records = store.load("aime24")
    for r in records:
        r["correct"] = not r["correct"]  # as if an older grader had got every verdict wrong
    store.rewrite("aime24", records)
    idle = ScriptedGenerator(golds, fail_on=1)
    metrics = evaluate_task(idle, "aime24", settings, store, progress=False, regrade=True)
    assert idle.calls == [] and metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["regrade_changed_verdicts"] == len(records)
    assert [r["correct"] for r in store.load("aime24")] == [not r["correct"] for r in records]


class CutGenerator(ScriptedGenerator):
    """Sample 0 states the gold in prose but hit the token limit; sample 1 says the same and finished."""

    def generate(self, prompts, sampling, progress=False):
        return [[Completion(f"so the answer is {self.golds[p]}", [1] * (sampling.max_new_tokens if j == 0 else 3),
                            "length" if j == 0 else "stop") for j in range(sampling.n)] for p in prompts]


def test_truncated_samples_get_no_fallback_credit_now_or_on_regrade(setup):
    _, golds, settings, store = setup
    evaluate_task(CutGenerator(golds), "aime24", settings, store, progress=False)
    records = store.load("aime24")
    assert [r["correct"] for r in records if r["sample"] == 0] == [False] * 7  # finish_reason "length"
    assert all(r["correct"] for r in records if r["sample"] == 1)
    for r in records:
        del r["finish_reason"]  # as in a store written before the field existed: tokens vs max_new_tokens decide
    store.rewrite("aime24", records)
    # (only the regrade: task_metrics itself needs finish_reason for the truncation rate)
    assert _regrade("aime24", store, 3.0, False, settings.sampling.max_new_tokens) == 0
    assert [r["correct"] for r in store.load("aime24")] == [r["correct"] for r in records]
