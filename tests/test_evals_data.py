"""Data files shipped in kdrl/data and their loaders (kdrl.data)."""
import hashlib
import re

import pytest

from kdrl.data import BENCHMARKS, DATA_DIR, TRAINING_SETS, load_task, read_jsonl
from kdrl.grading import quick_match

EXPECTED_ROWS = {"gsm8k": 1319, "math500": 500, "aime24": 30, "aime25": 30, "amc23": 40, "minerva_math": 272,
                 "olympiadbench": 675, "gsm8k_train": 7473, "math_train": 7470}  # 4 rows without an answer skipped


def test_every_shipped_file_matches_its_provenance_sha256():
    provenance = (DATA_DIR / "PROVENANCE.md").read_text()
    files = sorted(DATA_DIR.glob("*.jsonl"))
    assert len(files) == 10
    for f in files:
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        assert digest in provenance, f"{f.name}: sha256 {digest} is not recorded in PROVENANCE.md"


@pytest.mark.parametrize("task", BENCHMARKS + TRAINING_SETS)
def test_loader(task):
    problems = load_task(task)
    assert len(problems) == EXPECTED_ROWS[task]
    assert len({p.id for p in problems}) == len(problems), "ids must be unique (resume keys on them)"
    for p in problems:
        assert p.task == task and p.question.strip() and p.answer.strip()
        assert "$" not in p.answer or task in ("math500", "math_train", "minerva_math")
    assert load_task(task, limit=3) == problems[:3]


def test_known_defects_are_repaired():
    aime24 = load_task("aime24")
    assert all(re.fullmatch(r"[1-9]\d*|0", p.answer) for p in aime24)  # "025" -> "25"
    assert {p.id for p in aime24} >= {"2024-I-1", "2024-II-15"}
    assert all(re.fullmatch(r"-?\d+", p.answer) for p in load_task("amc23"))  # 27.0 -> 27
    aime25 = load_task("aime25")
    assert not any(re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f]", p.question) for p in aime25)  # clean MathArena text
    # The corrupted AReaL copy is kept only to cross-check the answers.
    areal = read_jsonl(DATA_DIR / "aime25.jsonl")
    assert [str(r["answer"]) for r in areal] == [p.answer for p in aime25]
    minerva = load_task("minerva_math")
    assert all("\\boxed" not in p.answer for p in minerva)
    olympiad = {p.id: p for p in load_task("olympiadbench")}
    multi = [p for p in olympiad.values() if p.meta["is_multiple_answer"]]
    assert multi and all("$" not in p.answer for p in multi)


def test_gsm8k_gold_is_the_final_number():
    p = load_task("gsm8k_train", limit=1)[0]
    assert p.answer == "72" and p.meta["answer_text"].endswith("#### 72")
    # Thousands separators are removed from the gold but still match a model writing them.
    with_commas = [p for p in load_task("gsm8k") if "," in p.meta["answer_text"].rpartition("####")[2]]
    assert with_commas and all("," not in p.answer for p in with_commas)
    assert quick_match("2,125", "2125")


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown task"):
        load_task("gsm9k")
    with pytest.raises(ValueError, match="limit"):
        load_task("gsm8k", limit=0)
