"""How often does our grader agree with Math-Verify alone on stored runs? `python evals/agreement.py [RUN_DIR ...]`

For every stored sample of a run (default: every run under evals/results/) it grades the response twice:
- ours: `kdrl.grading.grade_many`, with `truncated` from the record (`evals.runner.record_truncated`);
- Math-Verify alone: `parse(response)` with its default extractors (LaTeX and plain expressions), against
  `parse("$" + gold + "$")`, then `verify(gold, answer)` with its own 5 s timeouts. The one gold repair applied is
  e-notation to `\\times 10^{k}` (`kdrl.grading.sci_to_latex`: otherwise `8.7e8` parses as 8.7*e*8).
Each disagreement gets one reason, the first that applies: "unclosed box" (ours refuses it), "truncated, no box"
(ours gives a cut response no fallback), "several boxes", "no box" (our "the answer is"/last-number fallback
versus Math-Verify's own search), else "same box" (both read the one box; the equivalence check differs).

Reference only, not a grader: Math-Verify's expression extractor parses with `sympy.parse_expr`, which evaluates
Python, so run this on stored runs you trust (ours never passes model output to it).
"""
from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evals.runner import record_truncated  # noqa: E402
from kdrl.grading import find_boxes, top_level_boxes, extract_answer, grade_many, sci_to_latex  # noqa: E402

__all__ = ["math_verify_alone", "reason", "run_agreement"]

RESULTS = Path(__file__).resolve().parent / "results"


def math_verify_alone(response: str, gold: str) -> bool:
    """Math-Verify's verdict with its default extraction on the whole response (see the module docstring)."""
    from math_verify import parse, verify
    try:
        return bool(verify(parse("$" + sci_to_latex(gold) + "$"), parse(response)))
    except Exception:  # noqa: BLE001 - a parse/verify failure or timeout is "wrong", as Math-Verify itself does
        return False


def reason(response: str, truncated: bool) -> str:
    """Why our reading of `response` may differ from Math-Verify's (first matching rule of the docstring)."""
    boxes = find_boxes(response)
    if any(inner is None for _, _, inner in boxes):
        return "unclosed box"
    if truncated and not boxes:
        return "truncated, no box"
    if len(top_level_boxes(response) or []) >= 2:
        return "several boxes"
    return "no box" if not boxes else "same box"


def run_agreement(run_dir: Path) -> dict:
    """Counts for one run: samples, verdicts that differ (by direction and reason), and each disagreement; also how
    many stored verdicts (graded when the run was made) the current grader changes, and how many differ from
    Math-Verify."""
    config = json.loads((run_dir / "config.json").read_text())
    max_new = config["sampling"]["max_new_tokens"]
    records = [json.loads(line) for f in sorted((run_dir / "samples").glob("*.jsonl"))
               for line in f.read_text().splitlines() if line.strip()]
    cut = [record_truncated(r, max_new) for r in records]
    ours = grade_many([r["response"] for r in records], [r["gold"] for r in records], truncated=cut,
                      timeout=config.get("grade_timeout", 3.0))
    theirs = [math_verify_alone(r["response"], r["gold"]) for r in records]
    cases = [{"task": r["task"], "id": r["id"], "gold": r["gold"], "truncated": t, "ours": o, "math_verify": m,
              "our_answer": extract_answer(r["response"], truncated=t), "reason": reason(r["response"], t)}
             for r, t, o, m in zip(records, cut, ours, theirs) if o != m]
    return {"run": run_dir.name, "samples": len(records), "differ": len(cases),
            "ours_correct": sum(ours), "math_verify_correct": sum(theirs),
            "stored_verdicts_changed": sum(o != r["correct"] for o, r in zip(ours, records)),
            "stored_differ_from_math_verify": sum(m != r["correct"] for m, r in zip(theirs, records)),
            "only_ours": sum(c["ours"] for c in cases), "only_math_verify": sum(c["math_verify"] for c in cases),
            "reasons": dict(Counter(f"{c['reason']} ({'ours' if c['ours'] else 'Math-Verify'} credits)"
                                    for c in cases)),
            "cases": cases}


def main(argv: list[str]) -> None:
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    runs = [Path(a) for a in argv] or sorted(p.parent for p in RESULTS.glob("*/config.json"))
    for run in runs:
        out = run_agreement(run)
        cases = out.pop("cases")
        print(json.dumps(out))
        for c in cases:
            print("   ", json.dumps(c))


if __name__ == "__main__":
    main(sys.argv[1:])
