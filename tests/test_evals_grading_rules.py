"""The grader's truncation and list-gold rules, and workers that never re-run the caller's script (issue 12)."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import kdrl.verify_pool as verify_pool
from evals.runner import record_truncated
from kdrl.grading import answer_candidates, extract_answer, extract_boxed, gold_items, grade_many
from kdrl.verify_pool import VerifierPool

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(processes=2) as p:
        yield p


def _grade(pool, cases, truncated):
    responses, golds, expected = zip(*cases)
    got = grade_many(list(responses), list(golds), truncated=truncated, pool=pool)
    return [(r, g, e) for r, g, e, v in zip(responses, golds, expected, got) if v != e]


CUT = "... so the answer is \\boxed{\\frac{3}{4"  # cut at the token limit: the real answer might be 3/40


@pytest.mark.parametrize("truncated", [True, False])
def test_an_unclosed_box_is_never_an_answer(pool, truncated):
    assert extract_answer(CUT, truncated=truncated) is None
    assert extract_boxed("\\boxed{25}, no wait: \\boxed{24") is None  # the earlier closed box is not the answer
    assert extract_answer("so the answer is \\boxed", truncated=truncated) is None
    wrong = _grade(pool, [(CUT, "\\frac{3}{4}", False), (CUT, "4", False),
                          ("\\boxed{25}, no wait: \\boxed{24", "25", False),
                          ("The answer is \\frac{3}{4", "\\frac{3}{4}", False)], truncated)  # unbalanced sentence
    assert not wrong, wrong


def test_fallbacks_never_credit_a_truncated_response(pool):
    cases = [("Adding up, the answer is 3. Then", "3"), ("so far the total is 12", "12")]
    assert not _grade(pool, [(r, g, False) for r, g in cases], truncated=True)
    assert not _grade(pool, [(r, g, True) for r, g in cases], truncated=False)  # finished: fallbacks count
    assert extract_answer("the total is 12", truncated=True) is None


def test_a_closed_box_still_counts_when_truncated(pool):
    assert not _grade(pool, [("\\boxed{12}. Let me double-check by", "12", True)], truncated=True)


def test_truncated_flags_per_response_and_validated(pool):
    responses, golds = ["the answer is 7", "the answer is 7"], ["7", "7"]
    assert grade_many(responses, golds, truncated=[True, False], pool=pool) == [False, True]
    with pytest.raises(TypeError, match="truncated"):
        grade_many(responses, golds, pool=pool)  # no default: every caller has to say
    with pytest.raises(ValueError, match="differ in length"):
        grade_many(responses, golds, truncated=[True], pool=pool)
    with pytest.raises(TypeError, match="bools"):
        grade_many(responses, golds, truncated=[1, 0], pool=pool)
    with pytest.raises(TypeError, match="truncated"):
        extract_answer("x", truncated=None)


LIST_CASES = [
    ("The solutions are \\boxed{-2} and \\boxed{3}.", "-2, 3", True),
    ("The solutions are \\boxed{3} and \\boxed{-2}.", "-2, 3", True),           # order does not matter
    ("The solutions are \\boxed{-2, 3}.", "-2, 3", True),                       # one box holding the list
    ("\\boxed{-2} and \\boxed{3}, i.e. \\boxed{-2, 3}", "-2, 3", True),
    ("\\boxed{-2} and \\boxed{4}. Wait: \\boxed{-2} and \\boxed{3}", "-2, 3", True),  # corrected list
    ("\\boxed{-2} and \\boxed{3}. Wait: \\boxed{-2} and \\boxed{4}", "-2, 3", False),  # ... in the other direction
    ("Only \\boxed{3}.", "-2, 3", False),                                        # one of two answers
    ("\\boxed{-2}, \\boxed{3}, \\boxed{5}", "-2, 3", False),                     # spraying boxes does not help
    ("\\boxed{3} and \\boxed{3}", "-3, 3", False),                               # a duplicate is not the other root
    ("\\boxed{2} and \\boxed{2}", "2, 2", True),                                 # a double root
    ("\\boxed{69} and \\boxed{84}", "69,84", True),
    ("\\boxed{(1,8,19)}, \\boxed{(2,7,13)}, \\boxed{(4,5,7)}", "(1,8,19), (2,7,13), (4,5,7)", True),
    ("\\boxed{1} and \\boxed{250}", "1,250", False),                             # a thousands comma, not a list
    ("\\boxed{3} and \\boxed{\\frac{\\pi}{2}}", "\\left( 3, \\frac{\\pi}{2} \\right)", False),  # a tuple is one answer
    ("\\boxed{25}, then corrected to \\boxed{24}.", "24", True),                # scalar gold: the last box wins
    ("\\boxed{25}, then corrected to \\boxed{24}.", "25", False),
]


def test_several_boxes_against_a_list_gold(pool):
    wrong = _grade(pool, LIST_CASES, truncated=False)
    assert not wrong, f"misgraded: {wrong}"
    assert not _grade(pool, [("\\boxed{-2} and \\boxed{3", "-2, 3", False)], truncated=True)  # unfinished box


def test_gold_items_and_candidates():
    assert gold_items("-2, 3") == ["-2", "3"]
    assert gold_items("f(n)=n, g(n)=1") == ["f(n)=n", "g(n)=1"]
    assert gold_items("[-2,5)") == ["[-2,5)"] and gold_items("1,250") == ["1,250"] and gold_items("24") == ["24"]
    assert answer_candidates("\\boxed{-2} and \\boxed{3}", "-2, 3", truncated=False) == ["3", "-2, 3"]
    assert answer_candidates("\\boxed{-2} and \\boxed{3}", "3", truncated=False) == ["3"]
    assert answer_candidates("\\boxed{\\boxed{-2}} and \\boxed{3}", "-2, 3", truncated=False) == ["3", "\\boxed{-2}, 3"]


def test_stored_records_say_whether_they_were_cut():
    assert record_truncated({"finish_reason": "length", "tokens": 3}, 512)
    assert not record_truncated({"finish_reason": "stop", "tokens": 512}, 512)
    assert record_truncated({"tokens": 512}, 512) and not record_truncated({"tokens": 100}, 512)  # older records
    assert record_truncated({}, 512)  # nothing known: only a closed box may earn credit


def test_a_script_without_a_main_guard_is_not_re_run_by_the_workers(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from kdrl.grading import grade_many
        print("script body ran", flush=True)
        print(grade_many(["\\\\boxed{{x+x}}", "\\\\boxed{{1/3}}"], ["2x", "0.5"], truncated=False))
        """))
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["script body ran", "[True, False]"], run.stdout
    assert "Error" not in run.stderr, run.stderr


def test_a_worker_that_cannot_start_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(verify_pool, "_BOOT", "import sys; sys.exit(3)")
    with VerifierPool(processes=1) as broken, pytest.raises(RuntimeError, match="exited while starting .exit code 3"):
        broken.verify_many([("x", "y")])


def test_agreement_report_on_a_tiny_stored_run(tmp_path):
    import json

    from evals.agreement import reason, run_agreement
    (tmp_path / "samples").mkdir()
    (tmp_path / "config.json").write_text(json.dumps({"sampling": {"max_new_tokens": 8}, "grade_timeout": 3.0}))
    records = [{"task": "t", "id": "a", "response": "so the total is 12", "gold": "12", "tokens": 8,
                "finish_reason": "length", "correct": True},       # cut: Math-Verify alone credits it, ours not
               {"task": "t", "id": "b", "response": "\\boxed{7}", "gold": "7", "tokens": 3, "correct": True}]
    (tmp_path / "samples" / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = run_agreement(tmp_path)
    assert (out["samples"], out["differ"], out["only_math_verify"], out["stored_verdicts_changed"]) == (2, 1, 1, 1)
    assert out["reasons"] == {"truncated, no box (Math-Verify credits)": 1}
    assert reason("\\boxed{1} and \\boxed{2}", False) == "several boxes"
    assert reason("\\boxed{1", False) == "unclosed box"
