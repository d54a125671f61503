"""Answer extraction and grading on real hard cases (kdrl.grading, kdrl.verify_pool)."""
import time

import pytest

from kdrl.grading import extract_answer, extract_boxed, grade_many, normalize_answer, quick_match
from kdrl.verify_pool import VerifierPool


@pytest.fixture(scope="module")
def pool():
    with VerifierPool(processes=2) as p:
        yield p


@pytest.mark.parametrize("text,expected", [
    ("so the area is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("first \\boxed{3} then corrected: \\boxed{\\sqrt{\\frac{a}{b}}}", "\\sqrt{\\frac{a}{b}}"),  # last, nested
    ("\\fbox{42}", "42"),
    ("The answer is \\boxed 7.", "7"),
    ("unclosed \\boxed{12 and then the answer is 13.", None),             # inside an unfinished box: no answer
    ("Therefore, the final answer is $\\frac{3}{4}$. Done", "\\frac{3}{4}"),
    ("The answer is 3.5 meters.\nmore", "3.5 meters"),                      # decimal point is not a sentence end
    ("She pays 12 + 30 = 42 dollars, then 1,250 in total.", "1,250"),       # last number
    ("no digits here", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text, truncated=False) == expected


def test_extract_boxed_needs_braces_or_space():
    assert extract_boxed("\\boxed{a}{b}") == "a"
    assert extract_boxed("nothing boxed") is None
    with pytest.raises(TypeError):
        extract_answer(None, truncated=False)


@pytest.mark.parametrize("pred,gold", [
    ("025", "25"), ("27", "27.0"), ("2,125", "2125"), ("$18$", "18"), ("50\\%", "50"),
    ("\\dfrac{1}{2}", "\\frac{1}{2}"), ("1/2", "0.5"), ("-\\frac{3}{4}", "-0.75"), ("90^\\circ", "90"),
    ("\\text{(C)}", "(C)"),
])
def test_quick_match_equal(pred, gold):
    assert quick_match(pred, gold)


@pytest.mark.parametrize("pred,gold", [("24", "25"), ("1/3", "0.33"), ("", ""), ("\\frac{1}{2}", "\\frac{2}{1}")])
def test_quick_match_not_equal(pred, gold):
    assert not quick_match(pred, gold)


def test_normalize_answer_keeps_real_content():
    assert normalize_answer(" \\left( 3, \\frac{\\pi}{2} \\right) ") == "(3,\\frac{\\pi}{2})"
    assert normalize_answer("007") == "7"
    assert normalize_answer("1,2") == "1,2"  # a list, not a thousands separator


# (response, gold, expected): golds as stored by kdrl.data, i.e. the real formats of the seven benchmarks.
HARD_CASES = [
    ("\\boxed{\\dfrac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", False),
    ("\\boxed{(3, \\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),   # MATH-500 tuple
    ("\\boxed{(3, \\frac{\\pi}{3})}", "\\left( 3, \\frac{\\pi}{2} \\right)", False),
    ("\\boxed{[-2, 5)}", "[-2,5)", True),                                              # interval
    ("\\boxed{(-2, 5)}", "[-2,5)", False),                                             # open vs closed end
    ("\\boxed{x^2 + 2x + 1}", "(x+1)^2", True),                                        # symbolic
    ("\\boxed{10\\text{ cm}}", "10", True),                                            # units text
    ("\\boxed{25\\%}", "25", True),                                                    # percent
    ("\\boxed{025}", "25", True),                                                      # AIME leading zero
    ("\\boxed{27}", "27", True),                                                       # AMC (gold 27.0 -> 27)
    ("\\boxed{84, 69}", "69, 84", True),                                               # OlympiadBench multi
    ("\\boxed{69}", "69, 84", False),                                                  # only one of two answers
    ("\\boxed{(1,8,19), (2,7,13), (4,5,7)}", "(1,8,19), (2,7,13), (4,5,7)", True),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", True),
    ("\\boxed{3}", "4", False),
    ("\\boxed{8.7 \\times 10^{8}}", "8.7e8", True),                                   # Minerva e-notation gold
    ("\\boxed{870000000}", "8.7e8", True),
    ("\\boxed{1.77 \\times 10^{-6}}", "1.77e-6", True),
    ("\\boxed{1.77 \\times 10^{-5}}", "1.77e-6", False),
    ("\\boxed{4e33}", "4 \\times 10^{33}", True),
]


def test_grade_hard_cases(pool):
    responses, golds, expected = zip(*HARD_CASES)
    got = grade_many(list(responses), list(golds), truncated=False, pool=pool)
    wrong = [(r, g, e) for r, g, e, v in zip(responses, golds, expected, got) if v != e]
    assert not wrong, f"misgraded: {wrong}"


def test_grade_many_validates_arguments():
    with pytest.raises(ValueError, match="differ in length"):
        grade_many(["a"], [], truncated=False)
    with pytest.raises(ValueError, match="timeout"):
        grade_many(["a"], ["a"], truncated=False, timeout=0)


def test_no_answer_is_wrong_without_a_worker():
    fresh = VerifierPool(processes=1)
    assert grade_many(["I do not know."], ["5"], truncated=False, pool=fresh) == [False]
    assert fresh._workers == []  # never started: nothing to verify


def test_pathological_answer_times_out(pool):
    """A power tower would keep sympy busy for ever: the worker is killed, the pair is wrong, the pool survives."""
    tower = "\\boxed{" + "9^{" * 12 + "9" + "}" * 12 + "}"
    before = pool.timeouts
    t0 = time.monotonic()
    got = grade_many([tower, "\\boxed{\\frac{2}{4}}"], ["1", "0.5"], truncated=False, timeout=1.0, pool=pool)
    elapsed = time.monotonic() - t0
    assert got == [False, True]
    assert elapsed < 6.0, f"timeout not enforced: {elapsed:.1f} s"
    assert pool.timeouts == before + 1  # it really overran and its worker was killed and replaced
    assert grade_many(["\\boxed{x+x}"], ["2x"], truncated=False, pool=pool) == [True]


def test_model_output_is_never_executed(pool, tmp_path):
    """An answer that would run code if passed to eval/sympy.parse_expr stays inert."""
    marker = tmp_path / "pwned"
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    assert grade_many([f"\\boxed{{{payload}}}", f"The answer is {payload}"], ["1", "1"], truncated=False,
                      pool=pool) == [False, False]
    assert not marker.exists()
