"""Which config changes a resume accepts: run length, logging and evaluation may change, the training may not."""
from __future__ import annotations

import dataclasses

from kdrl.trainer.config import build_config, loss_config

__all__ = ["RESUME_FREE_KEYS", "config_changes"]

# Config keys that may change between a run and its resume: run length, logging and evaluation, not the training.
RESUME_FREE_KEYS = {"run.steps", "run.resume", "run.progress", "run.threads", "run.tensorboard", "run.save_every",
                    "run.keep_checkpoints", "run.plot", "run.eval_every", "run.eval_task", "run.eval_limit",
                    "run.eval_max_new_tokens", "run.export_final", "run.output_dir", "rollout.vllm_kwargs",
                    "rollout.backend", "rollout.grader_timeout"}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and (prefix or k != "loss") and k != "vllm_kwargs":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, new: dict) -> dict[str, tuple]:
    """``key -> (saved, new)`` for every training-relevant config key that differs.

    The loss sections are compared as the KDRLConfig they give (:func:`kdrl.trainer.config.loss_config`), so an explicit
    default is no change, and a derived field that moves (the cosine ``total_steps`` that follows ``run.steps``)
    is one. A saved config that no longer validates is compared as written.
    """
    def flat(tree):
        f = _flat({k: v for k, v in tree.items() if k != "loss"})
        try:
            loss = dataclasses.asdict(loss_config(build_config(tree)))
        except (ValueError, TypeError):
            loss = tree.get("loss") or {}
        f.update({f"loss.{k}": v for k, v in loss.items()})
        return f
    a, b = flat(saved), flat(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in RESUME_FREE_KEYS and a.get(k) != b.get(k)}
