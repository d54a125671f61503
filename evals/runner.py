"""Evaluate one generator on a list of tasks: prompts -> generation (in chunks) -> grading -> JSONL -> metrics.

Each chunk of problems is generated, graded and appended to the task's JSONL before the next chunk starts, so an
interruption loses at most the chunk in flight, and a rerun skips every (problem, sample) already on disk. With
`save_every` (seconds) the chunks are sized from the measured pace so that a save happens about that often: the
first chunk is a quarter of `chunk_size`, later ones as many problems as the last chunk's pace fits in
`save_every`, between `min_chunk` (a full batch: smaller calls would waste the backend's batching) and
`chunk_size`. After each save, `on_chunk` is called (the caller writes partial results,
the leaderboard and the ETA line there).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from tqdm.auto import tqdm

from evals.metrics import average_metrics, gsm8k_lm_eval_extract, gsm8k_lm_eval_match, task_metrics
from evals.store import RunStore
from evals.tasks import TASKS, fewshot_examples
from kdrl.data import load_task
from kdrl.generation import SamplingConfig
from kdrl.grading import extract_answer, extract_boxed, grade_many
from kdrl.prompts import BOXED_INSTRUCTION, render_prompt

__all__ = ["EvalSettings", "evaluate_tasks", "record_truncated", "next_chunk_size"]


@dataclass
class EvalSettings:
    sampling: SamplingConfig
    prompt_style: str = "boxed"     # kdrl.prompts style: boxed | boxed_user | fewshot
    num_fewshot: int = 0            # examples for the fewshot style
    limit: int | None = None        # first `limit` problems of each task
    chunk_size: int = 64            # problems per generation call (the resume granularity)
    grade_timeout: float = 3.0      # seconds per (answer, gold) pair in the Math-Verify worker
    save_every: float | None = None  # seconds: size chunks so that a save happens about this often (None: fixed)
    min_chunk: int = 1              # fewest problems per chunk under save_every (one full batch of the backend)

    def to_config(self) -> dict:
        """What defines the run (compared on resume, recorded in results.json)."""
        return {"sampling": asdict(self.sampling), "prompt_style": self.prompt_style,
                "num_fewshot": self.num_fewshot if self.prompt_style == "fewshot" else 0, "limit": self.limit,
                "grade_timeout": self.grade_timeout,
                "instruction": BOXED_INSTRUCTION if self.prompt_style != "fewshot" else None}


def record_truncated(record: dict, max_new_tokens: int) -> bool:
    """Did this stored sample hit the token limit? Its `finish_reason` says so ("length"); a record from before
    that field existed counts as cut when it used the whole budget (`tokens >= max_new_tokens`), and one with
    neither field counts as cut (it cannot be shown to have finished, so only a closed box may earn credit)."""
    if "finish_reason" in record:
        return record["finish_reason"] == "length"
    return "tokens" not in record or record["tokens"] >= max_new_tokens


def next_chunk_size(chunk_size: int, save_every: float | None, last_problems: int | None,
                    last_seconds: float | None, min_chunk: int = 1) -> int:
    """Problems in the next chunk: `chunk_size` without `save_every`; else a quarter of it for the first chunk (so
    the first results appear early), then as many as the last chunk's pace fits in `save_every`; always within
    min_chunk..chunk_size (min_chunk capped at chunk_size)."""
    if not save_every:
        return chunk_size
    low = max(1, min(min_chunk, chunk_size))
    if not last_problems or last_seconds is None:
        return max(low, chunk_size // 4)
    if last_seconds <= 0:
        return chunk_size
    return max(low, min(chunk_size, int(save_every * last_problems / last_seconds)))


def _records(task: str, problem, prompt: str, completions, missing: list[int]) -> list[dict]:
    out = []
    for j in missing:
        c = completions[j]
        rec = {"task": task, "id": problem.id, "sample": j, "prompt": prompt, "response": c.text,
               "extracted": extract_answer(c.text, truncated=c.finish_reason == "length"), "gold": problem.answer,
               "tokens": len(c.token_ids),
               "finish_reason": c.finish_reason, "boxed": extract_boxed(c.text) is not None}
        if TASKS[task].lm_eval_gsm8k:
            rec["strict_extracted"], rec["flexible_extracted"] = gsm8k_lm_eval_extract(c.text)
            rec["strict_correct"], rec["flexible_correct"] = gsm8k_lm_eval_match(c.text, problem.meta["answer_text"])
        out.append(rec)
    return out


def _regrade(task: str, store: RunStore, timeout: float, progress: bool, max_new_tokens: int) -> int:
    """Grade every stored sample of `task` again with the current grader; returns how many verdicts changed."""
    records = store.load(task)
    cut = [record_truncated(r, max_new_tokens) for r in records]
    verdicts = grade_many([r["response"] for r in records], [r["gold"] for r in records], truncated=cut,
                          timeout=timeout, progress=f"regrade {task}" if progress else False)
    changed = 0
    for r, ok, t in zip(records, verdicts, cut):
        changed += r["correct"] != ok
        r["correct"], r["extracted"] = ok, extract_answer(r["response"], truncated=t)
    store.rewrite(task, records)
    return changed


def evaluate_task(generator, task: str, settings: EvalSettings, store: RunStore, progress: bool = True,
                  regrade: bool = False, on_chunk=None) -> dict:
    """Generate and grade whatever is missing for `task`, then return its metrics plus timing.
    regrade: also grade the samples already on disk again (after a grader change).
    on_chunk: called as on_chunk(task=, samples=, tokens=, seconds=) after each chunk is saved."""
    n = settings.sampling.n
    problems = load_task(task, limit=settings.limit)
    wanted = {p.id for p in problems}
    have = {(r["id"], r["sample"]) for r in store.load(task) if r["id"] in wanted}
    todo = [p for p in problems if any((p.id, j) not in have for j in range(n))]
    examples = fewshot_examples(task, settings.num_fewshot) if settings.prompt_style == "fewshot" else None
    sampling = settings.sampling
    if settings.prompt_style == "fewshot" and not sampling.stop:
        sampling = SamplingConfig(**{**asdict(sampling), "stop": ("Question:",)})  # the next few-shot item
    new_samples = 0
    bar = tqdm(total=len(problems) * n, initial=len(have), desc=task, unit="sample", disable=not progress)
    start, last = 0, (None, None)
    while start < len(todo):
        size = next_chunk_size(settings.chunk_size, settings.save_every, *last, min_chunk=settings.min_chunk)
        chunk = todo[start:start + size]
        start += size
        prompts = [render_prompt(generator.tokenizer, p.question, style=settings.prompt_style, examples=examples)
                   for p in chunk]
        t0 = time.monotonic()
        completions = generator.generate(prompts, sampling, progress="generate" if progress else False)
        seconds = time.monotonic() - t0
        records = []
        for p, prompt, comps in zip(chunk, prompts, completions):
            missing = [j for j in range(n) if (p.id, j) not in have]
            records += _records(task, p, prompt, comps, missing)
        verdicts = grade_many([r["response"] for r in records], [r["gold"] for r in records],
                              truncated=[r["finish_reason"] == "length" for r in records],
                              timeout=settings.grade_timeout, progress="grade" if progress else False)
        for r, ok in zip(records, verdicts):
            r["correct"] = ok
        store.append(task, records)
        store.add_timing(task, len(records), seconds, sum(r["tokens"] for r in records))
        new_samples += len(records)
        bar.update(len(records))
        last = (len(chunk), time.monotonic() - t0)  # generation + grading + saving: the time between saves
        if on_chunk is not None:
            on_chunk(task=task, samples=len(records), tokens=sum(r["tokens"] for r in records), seconds=seconds)
    bar.close()
    changed = (_regrade(task, store, settings.grade_timeout, progress, settings.sampling.max_new_tokens)
               if regrade else None)
    records = [r for r in store.load(task) if r["id"] in wanted]
    metrics = task_metrics(records)
    if changed is not None:
        metrics["regrade_changed_verdicts"] = changed
    total = store.timing(task)  # over every invocation of this run
    metrics["generation"] = {"new_samples": new_samples, "samples": total["samples"], "seconds": total["seconds"],
                             "tokens": total["tokens"],
                             "tokens_per_second": round(total["tokens"] / total["seconds"], 2) if total["seconds"] else None}
    return metrics


def evaluate_tasks(generator, tasks: list[str], settings: EvalSettings, store: RunStore,
                   progress: bool = True, regrade: bool = False, on_chunk=None) -> dict:
    """{"tasks": {task: metrics}, "average": metrics averaged over the tasks}."""
    per_task = {}
    for task in tasks:
        per_task[task] = evaluate_task(generator, task, settings, store, progress, regrade, on_chunk)
    return {"tasks": per_task, "average": average_metrics(per_task)}
