"""Agreement with lm-eval: on the same generations, our GSM8K strict/flexible scores equal lm-eval's own (its gsm8k
filters run on our kdrl_gsm8k task YAML over the local data), and our boxed-task YAML grades like evals/run.py."""
import os

import pytest

# Local JSON files only: without these, datasets/huggingface_hub try the network first and wait for timeouts.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("lm_eval")

from evals.lm_eval_model import KdrlLM, run_lm_eval  # noqa: E402
from evals.metrics import gsm8k_lm_eval_match, task_metrics  # noqa: E402
from evals.tasks import fewshot_examples  # noqa: E402
from kdrl.data import load_task  # noqa: E402
from kdrl.generation import Completion  # noqa: E402
from kdrl.grading import grade_many  # noqa: E402
from kdrl.prompts import render_prompt  # noqa: E402

# Responses exercising every corner of the two filters: commas, "$", a final full stop, no "####", several numbers,
# a wrong strict answer with a right last number, text only. Indexed by problem position.
GSM8K_RESPONSES = [
    "She has 16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\n#### 18",
    "2 + 1 = 3 bolts.\n#### 3.",
    "The profit is $70,000.",
    "#### 540\nand also 7",
    "He gives 20 cups.",
    "#### 64 is the answer",
    "I think 1,000 and 20 are the numbers, so 260",
    "Total = 160 minutes.\n#### 160.0",
    "No idea.",
    "It is #### -45 and then nothing",
    "Answer: $460.",
    "#### 366",
]


class ReplayGenerator:
    """Returns the stored response of the question each prompt ends with (as a real generator would)."""

    def __init__(self, by_question: dict[str, str]):
        self.by_question = by_question
        self.prompts: list[str] = []

    def generate(self, prompts, sampling, progress=False):
        out = []
        for p in prompts:
            self.prompts.append(p)
            question = next(q for q in self.by_question if p.endswith(f"Question: {q}\nAnswer:") or q in p[-len(q) - 200:])
            out.append([Completion(self.by_question[question], [0], "stop")])
        return out


def test_gsm8k_strict_flexible_equal_lm_eval():
    problems = load_task("gsm8k", limit=len(GSM8K_RESPONSES))
    replay = ReplayGenerator({p.question: r for p, r in zip(problems, GSM8K_RESPONSES)})
    res = run_lm_eval(KdrlLM(generator=replay), ["kdrl_gsm8k"], limit=len(problems))
    theirs = res["results"]["kdrl_gsm8k"]

    records = []
    for p, r in zip(problems, GSM8K_RESPONSES):
        strict, flexible = gsm8k_lm_eval_match(r, p.meta["answer_text"])
        records.append({"id": p.id, "correct": False, "tokens": 1, "finish_reason": "stop", "boxed": False,
                        "strict_correct": strict, "flexible_correct": flexible})
    ours = task_metrics(records)
    assert 0 < ours["strict_match"] < ours["flexible_match"] < 1  # the cases are not all alike
    assert ours["strict_match"] == pytest.approx(theirs["exact_match,strict-match"], abs=1e-12)
    assert ours["flexible_match"] == pytest.approx(theirs["exact_match,flexible-extract"], abs=1e-12)
    # Per sample too, not only on average.
    per_doc = {s["doc"]["question"]: s for s in res["samples"]["kdrl_gsm8k"]}
    for p, rec in zip(problems, records):
        got = {s["filter"]: s["exact_match"] for s in res["samples"]["kdrl_gsm8k"] if s["doc"]["question"] == p.question}
        assert bool(got["strict-match"]) == rec["strict_correct"], p.id
        assert bool(got["flexible-extract"]) == rec["flexible_correct"], p.id
    assert len(per_doc) == len(problems)
    # lm-eval's 5-shot prompt is exactly ours for --prompt fewshot --num-fewshot 5.
    ours_prompt = render_prompt(None, problems[0].question, style="fewshot", examples=fewshot_examples("gsm8k", 5))
    assert ours_prompt in replay.prompts


def test_boxed_task_yaml_grades_like_our_grader():
    problems = load_task("aime24", limit=4)
    responses = ["\\boxed{204}", "So the answer is \\boxed{0113}.", "\\boxed{370}", "The answer is 385"]
    replay = ReplayGenerator({p.question: r for p, r in zip(problems, responses)})
    res = run_lm_eval(KdrlLM(generator=replay), ["kdrl_aime24"], limit=len(problems))
    ours = grade_many(responses, [p.answer for p in problems], truncated=False)  # as the lm-eval hook
    assert ours == [True, True, False, True]
    assert res["results"]["kdrl_aime24"]["exact_match,none"] == pytest.approx(sum(ours) / len(ours))
