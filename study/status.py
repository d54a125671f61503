"""What of a study is already done, read from its files (so every stage can be rerun to resume)."""
from __future__ import annotations

import json
import os
import platform

from kdrl.trainer.logging import read_jsonl
from study.config import Study

__all__ = ["arm_done", "eval_done", "arm_steps", "machine"]


def arm_steps(study: Study, arm: str) -> int:
    """The last step in the arm's metrics.jsonl (0 when none)."""
    steps = [r.get("step", 0) for r in read_jsonl(study.arm_dir(arm) / "metrics.jsonl")]
    return max(steps, default=0)


def arm_done(study: Study, arm: str) -> bool:
    """The arm reached its last step and exported its model (``final/config.json`` is written last but one:
    the tokenizer follows, so both are checked)."""
    final = study.arm_dir(arm) / "final"
    return (arm_steps(study, arm) >= study.configs[arm].run.steps and (final / "config.json").is_file()
            and (final / "tokenizer_config.json").is_file())


def eval_done(study: Study, name: str) -> bool:
    """The harness finished run ``name`` (its results.json is there and not marked partial)."""
    path = study.eval_dir / name / "results.json"
    try:
        return json.loads(path.read_text()).get("status") != "partial"
    except (OSError, json.JSONDecodeError):
        return False


def machine() -> str:
    """``Intel(R) Xeon(R) Processor, 2 cores, AMX``: the CPU's name, core count and whether it has AMX (bf16 GEMMs
    differ about 4x between CPUs with and without it)."""
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores" + (", AMX" if "amx_bf16" in flags else "")
