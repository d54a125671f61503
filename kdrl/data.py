"""Benchmark and training problems from the JSONL files shipped in `kdrl/data/` (provenance: PROVENANCE.md).

Every task becomes a list of `Problem(id, task, question, answer, meta)` with a plain-string gold answer; the
known defects of the sources are repaired here, once (AIME 2024 leading zeros, AMC float answers, Minerva answers
inside `\\boxed{}` of the solution, OlympiadBench `$...$` answer lists, AIME 2025 text taken from MathArena).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from kdrl.grading import extract_boxed

DATA_DIR = Path(__file__).with_name("data")

BENCHMARKS = ("gsm8k", "math500", "aime24", "aime25", "amc23", "minerva_math", "olympiadbench")
TRAINING_SETS = ("gsm8k_train", "math_train")

__all__ = ["Problem", "load_task", "gold_answer", "read_jsonl", "BENCHMARKS", "TRAINING_SETS", "DATA_DIR"]


@dataclass
class Problem:
    id: str        # unique within the task, stable across runs (used to resume)
    task: str
    question: str  # problem text as shown to the model
    answer: str    # gold final answer (LaTeX or number, no surrounding `$`)
    meta: dict = field(default_factory=dict)  # task-specific extras (solution, level, unit, ...)


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _gsm8k(rows, task):
    out = []
    for i, r in enumerate(rows):
        solution, _, final = r["answer"].rpartition("####")
        out.append(Problem(f"{task}/{i}", task, r["question"], final.strip().replace(",", ""),
                           {"solution": solution.strip(), "answer_text": r["answer"]}))
    return out


def _math500(rows, task):
    return [Problem(r["unique_id"], task, r["problem"], r["answer"],
                    {"solution": r["solution"], "subject": r["subject"], "level": r["level"]}) for r in rows]


def _aime24(rows, task):
    out = []
    for r in rows:
        m = re.search(r"(\d{4})_AIME_(I+)_Problems/Problem_(\d+)", r["url"])
        pid = f"{m.group(1)}-{m.group(2)}-{m.group(3)}" if m else str(r["id"])
        out.append(Problem(pid, task, r["problem"], str(int(r["answer"])), {"url": r["url"], "solution": r["solution"]}))
    return out


def _aime25(rows, task):
    return [Problem(r["id"], task, r["problem"].strip(), str(int(r["answer"])), {}) for r in rows]


def _amc23(rows, task):
    def fmt(x: float) -> str:
        return str(int(x)) if float(x).is_integer() else repr(float(x))
    return [Problem(f"amc23/{r['id']}", task, r["problem"], fmt(r["answer"]), {"url": r["url"]}) for r in rows]


def _minerva(rows, task):
    out = []
    for r in rows:
        gold = extract_boxed(r["solution"])
        if gold is None:
            raise ValueError(f"minerva_math row {r['idx']}: no \\boxed{{}} answer in its solution")
        out.append(Problem(f"minerva/{r['idx']}", task, r["problem"], gold, {"solution": r["solution"], "type": r["type"]}))
    return out


def _olympiad(rows, task):
    out = []
    for r in rows:
        answers = [a.replace("$", "").strip() for a in r["final_answer"]]
        meta = {"unit": r["unit"], "is_multiple_answer": r["is_multiple_answer"], "answer_type": r["answer_type"],
                "subfield": r["subfield"], "final_answer": r["final_answer"]}
        out.append(Problem(f"olympiadbench/{r['id']}", task, r["question"], ", ".join(answers), meta))
    return out


def _math_train(rows, task):
    # 4 of the 7474 rows (886, 1009, 5328, 5330) have no answer (null or ""): unusable for a reward, skipped.
    return [Problem(f"math_train/{i}", task, r["problem"], r["answer"], {"type": r["type"], "level": r["difficulty"]})
            for i, r in enumerate(rows) if isinstance(r["answer"], str) and r["answer"].strip()]


_LOADERS = {
    "gsm8k": ("gsm8k_test.jsonl", _gsm8k),
    "gsm8k_train": ("gsm8k_train.jsonl", _gsm8k),
    "math500": ("math500.jsonl", _math500),
    "aime24": ("aime24.jsonl", _aime24),
    "aime25": ("aime25_matharena.jsonl", _aime25),
    "amc23": ("amc23.jsonl", _amc23),
    "minerva_math": ("minerva_math.jsonl", _minerva),
    "olympiadbench": ("olympiadbench.jsonl", _olympiad),
    "math_train": ("math_train_deepscaler.jsonl", _math_train),
}


def gold_answer(task: str, row: dict) -> str:
    """Gold answer of one raw row of `task`'s file, repaired as `load_task` does (for external harnesses)."""
    if task not in _LOADERS:
        raise ValueError(f"gold_answer: unknown task {task!r}; expected one of {sorted(_LOADERS)}")
    problems = _LOADERS[task][1]([row], task)
    if not problems:
        raise ValueError(f"gold_answer: the {task} row has no usable answer")
    return problems[0].answer


def load_task(name: str, *, limit: int | None = None) -> list[Problem]:
    """Problems of one task, in file order; `limit` keeps the first `limit` (None = all).

    name: one of BENCHMARKS (gsm8k, math500, aime24, aime25, amc23, minerva_math, olympiadbench) or
    TRAINING_SETS (gsm8k_train, math_train).
    """
    if name not in _LOADERS:
        raise ValueError(f"load_task: unknown task {name!r}; expected one of {sorted(_LOADERS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"load_task: limit must be a positive integer or None, got {limit}")
    filename, loader = _LOADERS[name]
    problems = loader(read_jsonl(DATA_DIR / filename), name)
    return problems if limit is None else problems[:limit]
