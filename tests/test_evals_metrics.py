"""Metrics (evals.metrics): pass@k against brute force, accuracy/stderr and token statistics on synthetic samples,
GSM8K lm-eval-style extraction, averages and the baseline comparison."""
import itertools
import math
import random

import pytest

from evals.metrics import (average_metrics, compare_to_baseline, gsm8k_lm_eval_extract, gsm8k_lm_eval_match,
                           pass_at_k, task_metrics)


def brute_force_pass_at_k(outcomes: list[bool], k: int) -> float:
    """Fraction of all k-subsets of the n samples that contain at least one correct sample."""
    subsets = list(itertools.combinations(range(len(outcomes)), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8, 10])
def test_pass_at_k_equals_enumeration(n):
    rng = random.Random(n)
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        rng.shuffle(outcomes)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(outcomes, k), abs=1e-12)


def test_pass_at_k_limits_and_errors():
    assert pass_at_k(100, 0, 10) == 0.0
    assert pass_at_k(100, 95, 10) == 1.0
    assert pass_at_k(200, 3, 1) == pytest.approx(3 / 200)
    for bad in [(4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def _rec(pid, correct, tokens, finish="stop", boxed=True, **extra):
    return {"id": pid, "correct": correct, "tokens": tokens, "finish_reason": finish, "boxed": boxed, **extra}


def test_task_metrics_greedy():
    recs = [_rec("a", True, 10), _rec("b", False, 30, "length", False), _rec("c", True, 20), _rec("d", False, 40)]
    m = task_metrics(recs)
    assert m["n_problems"] == 4 and m["n_samples"] == 1
    assert m["accuracy"] == 0.5
    assert m["accuracy_stderr"] == pytest.approx(math.sqrt(1 / 3) / 2)  # std(ddof=1) of [1,0,1,0] / sqrt(4)
    assert m["pass_at_k"] == {"1": 0.5}
    assert m["mean_tokens"] == 25 and m["mean_tokens_correct"] == 15 and m["mean_tokens_incorrect"] == 35
    assert m["truncation_rate"] == 0.25 and m["boxed_rate"] == 0.75
    assert m["tokens_per_correct"] == 50


def test_task_metrics_sampled():
    # problem a: 3/4 correct, b: 0/4, c: 4/4
    outcomes = {"a": [1, 1, 0, 1], "b": [0, 0, 0, 0], "c": [1, 1, 1, 1]}
    recs = [_rec(p, bool(o), 10) for p, os_ in outcomes.items() for o in os_]
    m = task_metrics(recs)
    assert m["n_samples"] == 4
    assert m["accuracy"] == pytest.approx((0.75 + 0 + 1) / 3)
    assert m["pass_at_k"]["1"] == pytest.approx(m["accuracy"])
    assert m["pass_at_k"]["2"] == pytest.approx((1.0 + 0 + 1) / 3)   # a: any 2 of 4 with 3 correct -> always
    assert set(m["pass_at_k"]) == {"1", "2", "4"}
    assert m["tokens_per_correct"] == pytest.approx(120 / 7)


def test_task_metrics_rejects_unfinished_runs():
    with pytest.raises(ValueError, match="sample counts"):
        task_metrics([_rec("a", True, 1), _rec("a", True, 1), _rec("b", True, 1)])
    with pytest.raises(ValueError):
        task_metrics([])


def test_all_wrong_has_no_tokens_per_correct():
    m = task_metrics([_rec("a", False, 5), _rec("b", False, 7)])
    assert m["accuracy"] == 0 and m["tokens_per_correct"] is None and m["mean_tokens_correct"] is None


@pytest.mark.parametrize("response,strict,flexible", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18", "18"),
    ("So 1,250 apples. #### 1,250.", "1,250.", "1,250."),
    ("the total is $18.", "[invalid]", "$18."),
    ("#### -3 and later 7", "-3", "7"),
    ("nothing", "[invalid]", "[invalid]"),
])
def test_gsm8k_lm_eval_extraction(response, strict, flexible):
    assert gsm8k_lm_eval_extract(response) == (strict, flexible)


def test_gsm8k_lm_eval_match_cleans_like_lm_eval():
    gold = "Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 1,072"
    assert gsm8k_lm_eval_match("#### 1,072.", gold) == (True, True)
    assert gsm8k_lm_eval_match("The answer is $1072.", gold) == (False, True)
    assert gsm8k_lm_eval_match("#### 1072 then 5", gold) == (True, False)


def _task(acc, se, tokens, n_problems=10, n_samples=1):
    return {"accuracy": acc, "accuracy_stderr": se, "mean_tokens": tokens, "truncation_rate": 0.1,
            "boxed_rate": 0.5, "pass_at_k": {"1": acc}, "n_problems": n_problems, "n_samples": n_samples}


def test_average_and_baseline():
    cur = {"run_name": "cur", "tasks": {"x": _task(0.6, 0.03, 100), "y": _task(0.2, 0.04, 300)}}
    avg = average_metrics(cur["tasks"])
    assert avg["accuracy"] == pytest.approx(0.4) and avg["mean_tokens"] == 200
    assert avg["accuracy_stderr"] == pytest.approx(0.025)  # sqrt(.03^2 + .04^2) / 2
    assert avg["tokens_per_correct"] == pytest.approx((1000 + 3000) / (6 + 2))
    base = {"run_name": "base", "tasks": {"x": _task(0.5, 0.03, 200), "z": _task(0.9, 0.01, 50)}}
    cmp_ = compare_to_baseline(cur, base)
    assert cmp_["baseline"] == "base" and set(cmp_["tasks"]) == {"x"}
    assert cmp_["tasks"]["x"]["accuracy_delta"] == pytest.approx(0.1)
    assert cmp_["tasks"]["x"]["relative_length_change"] == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="shares no task"):
        compare_to_baseline(cur, {"run_name": "other", "tasks": {"z": _task(0.9, 0.01, 50)}})


def test_paired_comparison_uses_only_shared_problems():
    from evals.metrics import paired_comparison
    rec = lambda i, ok: {"id": i, "sample": 0, "correct": ok}  # noqa: E731
    # baseline has 4 problems, current 2 of them + 1 of its own; on the shared two: one flip each way? no: 0->1, 1->1
    base = {"x": [rec(0, False), rec(1, True), rec(2, True), rec(3, True)]}
    cur = {"x": [rec(0, True), rec(1, True), rec(9, False)]}
    out = paired_comparison(cur, base)
    t = out["tasks"]["x"]
    assert t["shared_problems"] == 2 and t["only_current"] == 1 and t["only_baseline"] == 2
    assert t["accuracy_delta"] == pytest.approx(0.5) and t["improved"] == 1 and t["regressed"] == 0
    assert t["improved_ids"] == [0] and t["accuracy_delta_stderr"] == pytest.approx(0.5)  # std([1, 0]) / sqrt(2)
    assert out["pooled"]["shared_problems"] == 2


def _voted(pid, sample, answer, correct):
    return _rec(pid, correct, 5, sample=sample, extracted=answer)


def test_majority_vote_counts_answers_not_samples():
    from evals.metrics import majority_correct
    # 2 correct (written two ways: one class), 3 wrong split over two answers: the correct class has the most votes.
    votes = [_voted("p", 0, "7", False), _voted("p", 1, "\\frac{1}{2}", True), _voted("p", 2, "8", False),
             _voted("p", 3, "0.5", True), _voted("p", 4, "7 ", False)]
    assert majority_correct(votes, 5) is False  # "7" twice (normalised) against the correct class twice: tie -> "7"
    assert majority_correct(votes, 4) is True   # first four: correct 2, "7" 1, "8" 1
    assert majority_correct(votes, 1) is False and majority_correct(votes[1:], 1) is True
    # Order is by sample index, not by list order.
    assert majority_correct(list(reversed(votes)), 4) is True
    # Normalisation: $, spaces, \dfrac, thousands commas, 27.0 = 27, a final full stop.
    same = [_voted("q", i, a, False) for i, a in enumerate(["$1,250$", "1250.", "1250.0", "\\dfrac{1}{2}"])]
    same += [_voted("q", 4, "x", True), _voted("q", 5, "x", True), _voted("q", 6, "\\frac{1}{2}", False)]
    assert majority_correct(same, 7) is False  # 1250 x3 beats correct x2
    # No answer casts no vote; no vote at all is wrong.
    blank = [_voted("r", 0, None, False), _voted("r", 1, None, False), _voted("r", 2, "3", True)]
    assert majority_correct(blank, 3) is True and majority_correct(blank, 2) is False
    with pytest.raises(ValueError):
        majority_correct(blank, 4)


def test_maj_at_k_in_task_and_average_metrics():
    # a: majority right (3 of 4 say "5"); b: majority wrong ("2" three times, right once); c: all wrong, no answers.
    recs = ([_voted("a", i, a, a == "5") for i, a in enumerate(["5", "5", "4", "5"])]
            + [_voted("b", i, a, a == "9") for i, a in enumerate(["2", "9", "2", "2"])]
            + [_voted("c", i, None, False) for i in range(4)])
    m = task_metrics(recs)
    assert set(m["maj_at_k"]) == {"1", "2", "4"}
    assert m["maj_at_k"]["4"] == pytest.approx(1 / 3)
    assert m["maj_at_k"]["2"] == pytest.approx(1 / 3)   # a: 5,5 -> right; b: 2,9 tie -> "2" came first -> wrong
    assert m["maj_at_k"]["1"] == pytest.approx(1 / 3)   # first samples: 5 right, 2 wrong, none
    assert m["pass_at_k"]["4"] == pytest.approx(2 / 3)  # pass@k >= maj@k: a right answer exists for a and b
    greedy = task_metrics([_rec("x", True, 3, extracted="1"), _rec("y", False, 3, extracted="2")])
    assert greedy["maj_at_k"] == {"1": 0.5} == greedy["pass_at_k"]
    other = task_metrics([_voted("z", i, "1", True) for i in range(4)])
    avg = average_metrics({"t1": m, "t2": other})
    assert avg["maj_at_k"]["4"] == pytest.approx((1 / 3 + 1) / 2)
    assert "maj_at_k" not in average_metrics({"t1": _task(0.5, 0.1, 10)})  # stored runs from before maj@k
