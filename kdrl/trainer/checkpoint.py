"""Checkpoints in safetensors with checksums, committed atomically, and everything needed to resume a run exactly.

Layout: ``<output_dir>/checkpoints/step_000012/`` holding
- ``weights.safetensors``: the trainable tensors the optimizer updates, nothing else: the fp32 master weights under
  full fine-tuning; under LoRA the adapters only (the frozen base model is not copied: it is reloaded from
  ``model.student`` on resume);
- ``optimizer.safetensors``: the optimizer's per-parameter state for those tensors (AdamW ``exp_avg``,
  ``exp_avg_sq``, ``step``) and the torch RNG state;
- ``state.json``: step, data position, optimizer hyper-parameters, the config;
- ``manifest.json``: size and sha256 of each of the three, verified before a checkpoint is loaded.
A checkpoint is written in two phases: :func:`write_checkpoint` fills ``.tmp-step_000012/`` (every file fsynced),
:func:`commit_checkpoint` renames it to ``step_000012`` and prunes older ones, so an interruption leaves either
the previous checkpoint as the newest or the new one complete, never a half-written one; the trainer appends the
step's log records between the two. Only the ``keep`` newest checkpoints stay on disk (``run.keep_checkpoints``),
chosen by step number among those before the new one: the checkpoint just written is never pruned.

A damaged checkpoint (a file missing, truncated or altered: size or sha256 differ from the manifest) raises
:class:`CheckpointError` naming the file; :func:`newest_intact_checkpoint` then falls back to the previous one and
renames the damaged directory to ``damaged-step_000012`` (kept for inspection, never loaded or pruned).
Weights or optimizer moments that are not finite are refused, at save and at load, naming the tensor.

Size: 4 bytes per trainable parameter for the weights plus 8 for AdamW's two moments, i.e. about 12 bytes per
trainable parameter (SmolLM2-135M fully fine-tuned: 1.6 GB; LoRA rank 32 on Qwen2.5-0.5B, 17.6M parameters: 0.2 GB).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from kdrl.trainer.config import ConfigError

__all__ = ["save_checkpoint", "write_checkpoint", "commit_checkpoint", "load_checkpoint", "verify_checkpoint",
           "latest_checkpoint", "list_checkpoints", "newest_intact_checkpoint", "remove_partial_checkpoints",
           "checkpoint_bytes", "CheckpointError", "MANIFEST"]

MANIFEST = "manifest.json"
FILES = ("weights.safetensors", "optimizer.safetensors", "state.json")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: a damaged file (named), or one that does not fit the model."""


def _checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _step_of(path: Path) -> int | None:
    """12 for ``step_000012``; None for names that are not a checkpoint's."""
    digits = path.name[len("step_"):]
    return int(digits) if path.name.startswith("step_") and digits.isdigit() else None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The committed checkpoint directories under ``output_dir`` (``step_N``), by step number, oldest first.
    Whether they are intact is :func:`verify_checkpoint`'s business."""
    root = _checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None), key=_step_of)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The committed checkpoint with the highest step under ``output_dir``, or None."""
    done = list_checkpoints(output_dir)
    return done[-1] if done else None


def checkpoint_bytes(path: str | Path) -> int:
    """Bytes on disk of one checkpoint directory."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def remove_partial_checkpoints(output_dir: str | Path) -> list[Path]:
    """Delete ``checkpoints/.tmp-step_*``, the leftovers of interrupted writes (never committed, so never a
    run's newest checkpoint); returns what was removed."""
    root = _checkpoint_dir(output_dir)
    removed = sorted(root.glob(".tmp-step_*")) if root.is_dir() else []
    for tmp in removed:
        shutil.rmtree(tmp)
    return removed


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file or a directory entry to the disk: a rename is only durable after its contents are."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _finite(tensors: dict[str, torch.Tensor], where: str, prefix: str = "") -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{where}: {prefix}{name} holds {bad} non-finite value{'s' if bad > 1 else ''} "
                                  "(NaN or inf)")


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


def write_checkpoint(output_dir: str | Path, step: int, params: dict[str, torch.Tensor],
                     optimizer: torch.optim.Optimizer, state: dict) -> Path:
    """Write the checkpoint of the completed ``step`` into ``checkpoints/.tmp-step_N`` with its manifest, every
    file fsynced; returns that directory for :func:`commit_checkpoint`. Until then the run's newest checkpoint is
    the previous one.

    params: name -> tensor (the trainable tensors, any dtype; saved as they are). state: JSON-able extras
    (data position, config). Non-finite weights or optimizer state raise :class:`CheckpointError` naming the
    tensor, before anything is written: a diverged step never becomes the checkpoint a run resumes from.
    """
    weights = {k: v.detach().contiguous().cpu() for k, v in params.items()}
    opt_tensors, opt_rest = _optimizer_tensors(optimizer)
    _finite(weights, f"step {step} not checkpointed")
    _finite(opt_tensors, f"step {step} not checkpointed", "optimizer state ")
    root = _checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step_{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(weights, str(tmp / "weights.safetensors"))
    opt_tensors["__rng_torch__"] = torch.get_rng_state()
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer": opt_rest, **state}, indent=1))
    files = {}
    for name in FILES:
        _fsync(tmp / name)
        files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))
    _fsync(tmp / MANIFEST)
    _fsync(tmp)
    return tmp


def commit_checkpoint(tmp: str | Path, keep: int) -> Path:
    """Rename a written ``.tmp-step_N`` to ``step_N`` (the commit point) and prune the checkpoints of earlier
    steps down to the ``keep`` newest, counting the new one (``keep >= 1``). Returns the checkpoint directory."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (the checkpoint just written), got {keep}")
    tmp = Path(tmp)
    final = tmp.with_name(tmp.name[len(".tmp-"):])
    step = _step_of(final)
    if final.exists():  # a checkpoint of this step from an earlier attempt (a resume from an older one)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(final.parent)
    older = [p for p in list_checkpoints(final.parent.parent) if _step_of(p) < step]
    for old in older[:max(0, len(older) - (keep - 1))]:  # by step number, never the new one or any later
        shutil.rmtree(old)
    return final


def save_checkpoint(output_dir: str | Path, step: int, params: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, state: dict, *, keep: int) -> Path:
    """:func:`write_checkpoint` then :func:`commit_checkpoint`; returns the checkpoint directory."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (the checkpoint just written), got {keep}")
    return commit_checkpoint(write_checkpoint(output_dir, step, params, optimizer, state), keep)


def verify_checkpoint(path: str | Path) -> bool:
    """Check every file of a checkpoint against its manifest (size, then sha256).

    Returns True when verified, False for a checkpoint written before manifests existed (nothing to check
    against); raises :class:`CheckpointError` naming the first missing, truncated or altered file.
    """
    path = Path(path)
    manifest = path / MANIFEST
    if not manifest.exists():
        if (path / "state.json").exists() and (path / "weights.safetensors").exists():
            return False
        raise CheckpointError(f"checkpoint {path} is incomplete: {MANIFEST} is missing")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is unreadable ({err})") from None
    for name in FILES:
        f, want = path / name, files.get(name) or {}
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        size = f.stat().st_size
        if size != want.get("bytes"):
            how = "truncated" if size < (want.get("bytes") or 0) else "altered"
            raise CheckpointError(f"checkpoint {path}: {name} has {size} bytes, the manifest says "
                                  f"{want.get('bytes')} ({how})")
        if _sha256(f) != want.get("sha256"):
            raise CheckpointError(f"checkpoint {path}: {name} is corrupt (its sha256 differs from the manifest's)")
    return True


def newest_intact_checkpoint(output_dir: str | Path, warn) -> Path | None:
    """The newest checkpoint that passes :func:`verify_checkpoint`, or None. Each damaged newer one is reported
    through ``warn(message)`` and renamed to ``damaged-step_N`` (kept, never loaded again); an unverifiable
    (pre-manifest) one is used with a warning."""
    damaged = []
    for ckpt in reversed(list_checkpoints(output_dir)):
        try:
            verified = verify_checkpoint(ckpt)
        except CheckpointError as err:
            aside = ckpt.with_name(f"damaged-{ckpt.name}")
            if aside.exists():
                aside = ckpt.with_name(f"damaged-{ckpt.name}-{time.strftime('%Y%m%d-%H%M%S')}")
            os.rename(ckpt, aside)
            warn(f"{err}; set aside as {aside.name}")
            damaged.append(ckpt.name)
            continue
        if not verified:
            warn(f"checkpoint {ckpt} has no {MANIFEST} (written by an older version): loading it unverified")
        if damaged:
            warn(f"resuming from {ckpt.name}, the newest intact checkpoint, instead of {damaged[0]}")
        return ckpt
    return None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors' own error types name neither the file nor the cause in plain words
        raise CheckpointError(f"{path} cannot be read ({type(err).__name__}: {' '.join(str(err).split())})") from None


def load_checkpoint(path: str | Path, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, *,
                    verify: bool = True) -> dict:
    """Restore ``params`` (in place) and ``optimizer`` from a checkpoint; also restore the torch RNG.

    ``verify``: check the files against the manifest first (:func:`verify_checkpoint`; the trainer passes False
    after :func:`newest_intact_checkpoint` did). Raises :class:`CheckpointError` (a ValueError) naming the file
    for a damaged or unreadable checkpoint, the tensor for non-finite weights or optimizer state, and the names
    or shapes that differ from ``params`` (another model or LoRA setting). Returns the JSON state (with ``step``
    and whatever :func:`save_checkpoint` got as ``state``).
    """
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    weights = _read_tensors(path / "weights.safetensors")
    if set(weights) != set(params):
        missing, extra = sorted(set(params) - set(weights))[:3], sorted(set(weights) - set(params))[:3]
        raise CheckpointError(f"checkpoint {path} does not match the model: missing {missing}, unexpected {extra}")
    for name, tensor in params.items():
        if weights[name].shape != tensor.shape:
            raise CheckpointError(f"checkpoint {path}: {name} has shape {tuple(weights[name].shape)}, "
                                  f"model expects {tuple(tensor.shape)}")
    _finite(weights, f"checkpoint {path}/weights.safetensors")
    try:
        state = json.loads((path / "state.json").read_text())
        opt_state = state["optimizer"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path / 'state.json'} cannot be read ({type(err).__name__}: {err})") from None
    opt_tensors = _read_tensors(path / "optimizer.safetensors")
    _finite({k: v for k, v in opt_tensors.items() if k != "__rng_torch__"},
            f"checkpoint {path}/optimizer.safetensors")
    with torch.no_grad():
        for name, tensor in params.items():
            tensor.copy_(weights[name])
    torch.set_rng_state(opt_tensors.pop("__rng_torch__"))
    per_param: dict[int, dict] = {}
    for key, value in list(opt_tensors.items()) + list(opt_state["scalars"].items()):
        idx, name = key.split(".", 1)
        per_param.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": opt_state["param_groups"]})
    return state
