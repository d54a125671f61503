"""The study's final evaluation: ``evals/run.py`` command lines for the starting student and every finished arm."""
from __future__ import annotations

import sys
from pathlib import Path

from study.config import Study
from study.status import arm_done

__all__ = ["START", "eval_commands"]

START = "start"  # run name of the starting student in <output_dir>/evals (every arm's --baseline)
EVALS_RUN = Path(__file__).resolve().parents[1] / "evals" / "run.py"


def _common(study: Study, name: str) -> list[str]:
    ev = study.eval
    cmd = [sys.executable, str(EVALS_RUN), "--tasks", ev["tasks"], "--output-dir", str(study.eval_dir),
           "--run-name", name]
    if ev.get("limit"):
        cmd += ["--limit", str(ev["limit"])]
    if ev.get("max_new_tokens"):
        cmd += ["--max-new-tokens", str(ev["max_new_tokens"])]
    if ev.get("backend"):
        cmd += ["--backend", ev["backend"]]
    return cmd


def eval_commands(study: Study, arms: list[str], warn=print) -> list[tuple[str, list[str]]]:
    """(run name, command) for the starting student, then each finished arm of ``arms`` (compared paired with the
    start through ``--baseline``); an arm still training is left out with a message through ``warn``."""
    out = [(START, _common(study, START) + ["--model", study.student])]
    for arm in arms:
        if not arm_done(study, arm):
            warn(f"[study] arm {arm}: not finished training ({study.arm_dir(arm)}); not evaluated")
            continue
        out.append((arm, _common(study, arm) + ["--model", str(study.arm_dir(arm) / "final"),
                                                "--baseline", START]))
    return out
