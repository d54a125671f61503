"""lm-eval `process_results` hooks for the kdrl boxed-answer tasks: the gold answer comes from the same row
repairs as kdrl.data (AIME leading zeros, AMC floats, Minerva boxed solutions, OlympiadBench `$...$` lists) and the
verdict from kdrl.grading, so lm-eval and evals/run.py score a response identically."""
import sys
from pathlib import Path

try:
    import kdrl  # noqa: F401  (installed with `pip install -e .`)
except ImportError:  # lm-eval run from a source checkout: the repository root is two levels up
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from kdrl.data import gold_answer  # noqa: E402
from kdrl.grading import grade  # noqa: E402


def _scorer(task: str):
    def process_results(doc: dict, results: list[str]) -> dict:
        # lm-eval hands over the text only, not whether generation hit max_gen_toks: counted as finished (an
        # unclosed box still earns nothing; evals/run.py, which knows, applies the full truncation rule).
        return {"exact_match": float(grade(results[0], gold_answer(task, doc), truncated=False))}
    process_results.__name__ = f"process_{task}"
    return process_results


process_math500 = _scorer("math500")
process_aime24 = _scorer("aime24")
process_aime25 = _scorer("aime25")
process_amc23 = _scorer("amc23")
process_minerva_math = _scorer("minerva_math")
process_olympiadbench = _scorer("olympiadbench")
