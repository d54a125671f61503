"""Metrics over graded samples: accuracy with standard error, unbiased pass@k, maj@k (majority vote), token
efficiency, GSM8K lm-eval strict/flexible scores, averages over tasks and the comparison against a baseline run.

A sample record is a dict with at least: id (problem), correct (bool), tokens (int), finish_reason, boxed (bool);
"extracted" (the answer string or None) and "sample" (its index) are used by maj@k; GSM8K records also carry
strict_correct / flexible_correct.
"""
from __future__ import annotations

import json
import math
import re
from collections import defaultdict

__all__ = ["pass_at_k", "majority_correct", "task_metrics", "average_metrics", "compare_to_baseline", "gsm8k_lm_eval_match",
           "STRICT_RE", "FLEXIBLE_RE"]

# lm-eval's gsm8k filters (task version 3.0): strict = first "#### N"; flexible = last number-like token.
STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
# lm-eval's exact_match settings for gsm8k: these patterns are deleted from prediction and reference, then compared
# case-insensitively.
_IGNORE = [re.compile(p) for p in (",", r"\$", r"(?s).*#### ", r"\.$")]
INVALID = "[invalid]"


def _lm_eval_clean(s: str) -> str:
    for pattern in _IGNORE:
        s = pattern.sub("", s)
    return s.lower()


def gsm8k_lm_eval_extract(response: str) -> tuple[str, str]:
    """(strict, flexible) extractions as lm-eval's gsm8k filters produce them ("[invalid]" when nothing matches)."""
    m = STRICT_RE.search(response)
    strict = m.group(1).strip() if m else INVALID
    hits = FLEXIBLE_RE.findall(response)
    flexible = INVALID
    if hits:
        groups = [g for g in hits[-1] if g]
        flexible = groups[0].strip() if groups else INVALID
    return strict, flexible


def gsm8k_lm_eval_match(response: str, answer_text: str) -> tuple[bool, bool]:
    """(strict_correct, flexible_correct) of a response against GSM8K's full `answer` field ("... #### N")."""
    gold = _lm_eval_clean(answer_text)
    strict, flexible = gsm8k_lm_eval_extract(response)
    return _lm_eval_clean(strict) == gold, _lm_eval_clean(flexible) == gold


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) for c correct out of n samples (Chen et al. 2021),
    computed as a product to stay exact for large n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prob_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        prob_all_wrong *= 1.0 - k / i
    return 1.0 - prob_all_wrong


def _vote_key(answer) -> str | None:
    """The answer a vote counts: the extracted string with spacing, `$`, `\\left`/`\\right`, `\\dfrac`/`\\tfrac`,
    thousands commas and a final full stop normalised, and plain numbers in canonical form (`27.0` -> `27`)."""
    if answer is None:
        return None
    a = str(answer).strip().strip("$").strip()
    a = re.sub(r"\\(left|right)\b", "", a).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    a = re.sub(r"\s+", "", a).rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", a):
        a = a.replace(",", "")
    try:
        x = float(a)
        if math.isfinite(x) and re.fullmatch(r"-?\d+(\.\d*)?", a):
            a = str(int(x)) if x == int(x) else repr(x)
    except ValueError:
        pass
    return a or None


def majority_correct(samples: list[dict], k: int) -> bool:
    """maj@k for one problem: is the most common answer among its first k samples (by sample index) correct?

    Votes go to extracted answers (`_vote_key`); a sample without an answer casts no vote, and with no vote at all
    the problem counts as wrong. Samples the grader marked correct are one answer class (each equals the gold, so
    they equal each other, however written); wrong answers are told apart by their normalised text, so two
    equivalent wrong answers written differently split their votes, which can only favour the correct class.
    A tie goes to the class whose first sample came first."""
    if not 1 <= k <= len(samples):
        raise ValueError(f"majority_correct: need 1 <= k <= {len(samples)} samples, got k={k}")
    first_k = sorted(enumerate(samples), key=lambda t: (t[1].get("sample", t[0]), t[0]))[:k]
    votes: dict = {}  # class -> [count, first position]
    for pos, (_, r) in enumerate(first_k):
        key = ("correct",) if r["correct"] else ("wrong", _vote_key(r.get("extracted")))
        if key[0] == "wrong" and key[1] is None:
            continue
        votes.setdefault(key, [0, pos])[0] += 1
    if not votes:
        return False
    winner = max(votes, key=lambda c: (votes[c][0], -votes[c][1]))
    return winner == ("correct",)


def _mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std, ddof=1; 0 for fewer than 2 values)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def _mean_or_none(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _ks(n: int) -> list[int]:
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k <= n]
    return ks if n in ks else ks + [n]


def task_metrics(records: list[dict]) -> dict:
    """Metrics of one task from its sample records (every problem must have the same number of samples).

    accuracy: mean over problems of the fraction of correct samples (greedy: plain accuracy), with its standard
    error over problems; pass@k (unbiased) and maj@k (majority vote over the first k samples) for k in
    1, 2, 4, ... <= n; token statistics count response tokens.
    """
    if not records:
        raise ValueError("task_metrics: no sample records")
    by_problem: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_problem[r["id"]].append(r)
    counts = {len(v) for v in by_problem.values()}
    if len(counts) != 1:
        raise ValueError(f"task_metrics: problems have different sample counts {sorted(counts)}; finish the run first")
    n = counts.pop()
    per_problem = [sum(r["correct"] for r in rs) / n for rs in by_problem.values()]
    acc, se = _mean_se(per_problem)
    tokens = [r["tokens"] for r in records]
    n_correct = sum(r["correct"] for r in records)
    out = {
        "n_problems": len(by_problem), "n_samples": n,
        "accuracy": acc, "accuracy_stderr": se,
        "pass_at_k": {str(k): sum(pass_at_k(n, sum(r["correct"] for r in rs), k) for rs in by_problem.values())
                      / len(by_problem) for k in _ks(n)},
        "maj_at_k": {str(k): sum(majority_correct(rs, k) for rs in by_problem.values()) / len(by_problem)
                     for k in _ks(n)},
        "mean_tokens": sum(tokens) / len(tokens),
        "mean_tokens_correct": _mean_or_none([r["tokens"] for r in records if r["correct"]]),
        "mean_tokens_incorrect": _mean_or_none([r["tokens"] for r in records if not r["correct"]]),
        "truncation_rate": sum(r["finish_reason"] == "length" for r in records) / len(records),
        "boxed_rate": sum(bool(r["boxed"]) for r in records) / len(records),
        "tokens_per_correct": sum(tokens) / n_correct if n_correct else None,
    }
    if "strict_correct" in records[0]:
        for key in ("strict", "flexible"):
            vals = [sum(r[f"{key}_correct"] for r in rs) / n for rs in by_problem.values()]
            out[f"{key}_match"], out[f"{key}_match_stderr"] = _mean_se(vals)
    return out


AVERAGED = ("accuracy", "mean_tokens", "truncation_rate", "boxed_rate")


def average_metrics(per_task: dict[str, dict]) -> dict:
    """Unweighted mean over tasks (each task counts once, as leaderboards do). The stderr of the average treats
    tasks as independent: sqrt(sum se_t^2) / T. tokens_per_correct is total tokens / total correct over tasks."""
    if not per_task:
        raise ValueError("average_metrics: no tasks")
    t = len(per_task)
    out = {key: sum(m[key] for m in per_task.values()) / t for key in AVERAGED}
    out["accuracy_stderr"] = math.sqrt(sum(m["accuracy_stderr"] ** 2 for m in per_task.values())) / t
    common_ks = set.intersection(*(set(m["pass_at_k"]) for m in per_task.values()))
    out["pass_at_k"] = {k: sum(m["pass_at_k"][k] for m in per_task.values()) / t for k in sorted(common_ks, key=int)}
    if all("maj_at_k" in m for m in per_task.values()):
        common = set.intersection(*(set(m["maj_at_k"]) for m in per_task.values()))
        out["maj_at_k"] = {k: sum(m["maj_at_k"][k] for m in per_task.values()) / t for k in sorted(common, key=int)}
    total_tokens = sum(m["mean_tokens"] * m["n_problems"] * m["n_samples"] for m in per_task.values())
    total_correct = sum(m["accuracy"] * m["n_problems"] * m["n_samples"] for m in per_task.values())
    out["tokens_per_correct"] = total_tokens / total_correct if total_correct > 0 else None
    out["n_tasks"] = t
    return out


def compare_to_baseline(current: dict, baseline: dict, samples=None) -> dict:
    """Accuracy delta (points of fraction, current - baseline) and relative length change
    (mean_tokens / baseline mean_tokens - 1) per shared task and on the average over the shared tasks.

    current, baseline: results dicts with "tasks" {task: metrics}, "run_name" and "settings". With ``samples``, a
    pair of callables ``(current_samples(task), baseline_samples(task)) -> sample records``, the result also holds
    "paired" (:func:`paired_comparison` on the shared tasks) and "settings_differ" ({setting: [baseline, current]}
    for every setting but chunk_size that differs).
    """
    shared = [t for t in current["tasks"] if t in baseline["tasks"]]
    if not shared:
        raise ValueError(f"baseline run {baseline.get('run_name')!r} shares no task with this run")

    def delta(cur: dict, base: dict) -> dict:
        rel = cur["mean_tokens"] / base["mean_tokens"] - 1 if base["mean_tokens"] else None
        return {"accuracy_delta": cur["accuracy"] - base["accuracy"], "relative_length_change": rel}

    per_task = {t: delta(current["tasks"][t], baseline["tasks"][t]) for t in shared}
    avg_cur = average_metrics({t: current["tasks"][t] for t in shared})
    avg_base = average_metrics({t: baseline["tasks"][t] for t in shared})
    out = {"baseline": baseline["run_name"], "tasks": per_task, "average": delta(avg_cur, avg_base)}
    if samples is not None:
        cur_samples, base_samples = samples
        out["paired"] = paired_comparison({t: cur_samples(t) for t in shared}, {t: base_samples(t) for t in shared})
        bs, cs = baseline.get("settings", {}), json.loads(json.dumps(current.get("settings", {})))  # tuples as lists
        out["settings_differ"] = {k: [bs.get(k), cs.get(k)] for k in sorted(set(bs) | set(cs), key=str)
                                  if k != "chunk_size" and bs.get(k) != cs.get(k)}
    return out


def paired_comparison(current: dict[str, list[dict]], baseline: dict[str, list[dict]]) -> dict:
    """Paired accuracy delta on the problems both runs share, per task and pooled over tasks.

    current, baseline: {task: sample records with "id" and "correct"}. A problem's score is its mean correctness
    over its samples; the delta is the mean of per-problem differences (current - baseline), its standard error the
    sample std of the differences / sqrt(shared problems). improved / regressed: shared problems whose score went
    up / down (for greedy runs: wrong -> right and right -> wrong). only_current / only_baseline: problems one run
    has and the other lacks (they are left out of the delta)."""
    def scores(records: list[dict]) -> dict:
        acc: dict = {}
        for r in records:
            acc.setdefault(r["id"], []).append(bool(r["correct"]))
        return {k: sum(v) / len(v) for k, v in acc.items()}

    def summary(diffs: list[float]) -> dict:
        m = len(diffs)
        mean = sum(diffs) / m if m else 0.0
        var = sum((d - mean) ** 2 for d in diffs) / (m - 1) if m > 1 else 0.0
        return {"shared_problems": m, "accuracy_delta": mean, "accuracy_delta_stderr": math.sqrt(var / m) if m else 0.0,
                "improved": sum(d > 0 for d in diffs), "regressed": sum(d < 0 for d in diffs)}

    per_task, pooled = {}, []
    for task in (t for t in current if t in baseline):
        cur, base = scores(current[task]), scores(baseline[task])
        shared = sorted(set(cur) & set(base), key=str)
        diffs = [cur[k] - base[k] for k in shared]
        pooled += diffs
        per_task[task] = {**summary(diffs), "only_current": len(set(cur) - set(base)),
                          "only_baseline": len(set(base) - set(cur)),
                          "improved_ids": [k for k in shared if cur[k] > base[k]],
                          "regressed_ids": [k for k in shared if cur[k] < base[k]]}
    return {"tasks": per_task, "pooled": summary(pooled)}
