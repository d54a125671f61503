"""The task registry: which data, which few-shot source and which extra scorers each benchmark uses."""
from __future__ import annotations

from dataclasses import dataclass

from kdrl.data import Problem, load_task

__all__ = ["TaskSpec", "TASKS", "MATH_SUITE", "parse_tasks", "fewshot_examples"]


@dataclass(frozen=True)
class TaskSpec:
    name: str          # kdrl.data task name
    label: str         # leaderboard column
    fewshot_from: str  # training set the few-shot examples come from (first k rows, as lm-eval's "first_n")
    lm_eval_gsm8k: bool = False  # also score with lm-eval's strict ("#### N") and flexible (last number) filters


# Column order follows the usual math leaderboard: AIME24 | AIME25 | AMC23 | MATH500 | Minerva | OlympiadBench | GSM8K.
TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("aime24", "AIME24", "math_train"),
    TaskSpec("aime25", "AIME25", "math_train"),
    TaskSpec("amc23", "AMC23", "math_train"),
    TaskSpec("math500", "MATH500", "math_train"),
    TaskSpec("minerva_math", "Minerva", "math_train"),
    TaskSpec("olympiadbench", "OlympiadBench", "math_train"),
    TaskSpec("gsm8k", "GSM8K", "gsm8k_train", lm_eval_gsm8k=True),
)}
MATH_SUITE = tuple(TASKS)


def parse_tasks(spec: str) -> list[str]:
    """`math` -> all seven; otherwise a comma-separated list of task names (order kept, duplicates dropped)."""
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        expanded = MATH_SUITE if part == "math" else (part,)
        for name in expanded:
            if name not in TASKS:
                raise ValueError(f"--tasks: unknown task {name!r}; expected 'math' or names from {list(TASKS)}")
            if name not in names:
                names.append(name)
    if not names:
        raise ValueError("--tasks: no task given")
    return names


def fewshot_examples(task: str, k: int) -> list[tuple[str, str]]:
    """k (question, worked answer) pairs for the lm-eval-style prompt.

    GSM8K: training solutions as lm-eval shows them (ending in `#### N`). Other tasks: MATH train problems; that
    file has answers but no solutions, so the example answer is `The final answer is $\\boxed{X}$.`
    """
    if k < 0:
        raise ValueError(f"--num-fewshot must be >= 0, got {k}")
    if k == 0:
        return []
    source = TASKS[task].fewshot_from
    problems: list[Problem] = load_task(source, limit=k)
    if source == "gsm8k_train":
        return [(p.question, p.meta["answer_text"]) for p in problems]
    return [(p.question, f"The final answer is $\\boxed{{{p.answer}}}$.") for p in problems]
