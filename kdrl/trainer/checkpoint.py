"""Checkpoints in safetensors, written atomically, and everything needed to resume a run exactly.

Layout: ``<output_dir>/checkpoints/step_000012/`` holding
- ``weights.safetensors``: the trainable tensors the optimizer updates, nothing else: the fp32 master weights under
  full fine-tuning; under LoRA the adapters only (the frozen base model is not copied: it is reloaded from
  ``model.student`` on resume);
- ``optimizer.safetensors``: the optimizer's per-parameter state for those tensors (AdamW ``exp_avg``,
  ``exp_avg_sq``, ``step``) and the torch RNG state;
- ``state.json``: step, data position, optimizer hyper-parameters, torch RNG state, the config.
A checkpoint is first written to a ``.tmp-`` directory and renamed when complete, so an interruption during saving
leaves the previous checkpoint as the latest one and never a half-written one. Only the ``keep`` newest
checkpoints stay on disk (the trainer passes ``run.keep_checkpoints``).

Size: 4 bytes per trainable parameter for the weights plus 8 for AdamW's two moments, i.e. about 12 bytes per
trainable parameter (SmolLM2-135M fully fine-tuned: 1.6 GB; LoRA rank 32 on Qwen2.5-0.5B, 17.6M parameters: 0.2 GB).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints", "checkpoint_bytes"]


def _checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints under ``output_dir``, oldest first."""
    root = _checkpoint_dir(output_dir)
    return sorted(p for p in root.glob("step_*") if (p / "state.json").exists()) if root.exists() else []


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The most recent complete checkpoint under ``output_dir``, or None."""
    done = list_checkpoints(output_dir)
    return done[-1] if done else None


def checkpoint_bytes(path: str | Path) -> int:
    """Bytes on disk of one checkpoint directory."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into flat tensors ``"<param index>.<key>"`` and JSON-able rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def save_checkpoint(output_dir: str | Path, step: int, params: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, state: dict, *, keep: int) -> Path:
    """Write a checkpoint for the completed optimizer/rollout ``step`` and prune all but the ``keep`` newest
    (``keep >= 1``; the newest is the one just written).

    params: name -> tensor (the trainable tensors, any dtype; saved as they are). state: JSON-able extras
    (data position, config). Returns the checkpoint directory.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (the checkpoint just written), got {keep}")
    root = _checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in params.items()}, str(tmp / "weights.safetensors"))
    opt_tensors, opt_rest = _optimizer_tensors(optimizer)
    opt_tensors["__rng_torch__"] = torch.get_rng_state()
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer": opt_rest, **state}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(root.glob("step_*"))[:-keep]:  # names sort by step: zero-padded
        shutil.rmtree(old)
    return final


def load_checkpoint(path: str | Path, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> dict:
    """Restore ``params`` (in place) and ``optimizer`` from a checkpoint; also restore the torch RNG.

    Raises ValueError if the checkpoint's tensor names or shapes do not match ``params`` (another model or
    LoRA setting). Returns the JSON state (with ``step`` and whatever :func:`save_checkpoint` got as ``state``).
    """
    path = Path(path)
    weights = load_file(str(path / "weights.safetensors"))
    if set(weights) != set(params):
        missing, extra = sorted(set(params) - set(weights))[:3], sorted(set(weights) - set(params))[:3]
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for name, tensor in params.items():
            if weights[name].shape != tensor.shape:
                raise ValueError(f"checkpoint {path}: {name} has shape {tuple(weights[name].shape)}, "
                                 f"model expects {tuple(tensor.shape)}")
            tensor.copy_(weights[name])
    state = json.loads((path / "state.json").read_text())
    opt_tensors = load_file(str(path / "optimizer.safetensors"))
    torch.set_rng_state(opt_tensors.pop("__rng_torch__"))
    per_param: dict[int, dict] = {}
    for key, value in list(opt_tensors.items()) + list(state["optimizer"]["scalars"].items()):
        idx, name = key.split(".", 1)
        per_param.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer"]["param_groups"]})
    return state
