"""What a user of the trainer sees (issue 10): progress and one line per step on stdout, the paths of what is
written, rollout samples without duplicated steps after a resume, readable plot panels, and checkpoints that fit a
laptop (retention, an interval, adapters only under LoRA). Tiny offline models only."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from _train_tiny import make_tiny_pair, one_thread  # noqa: F401
from kdrl.trainer.checkpoint import checkpoint_bytes, latest_checkpoint, list_checkpoints
from kdrl.trainer.config import RunConfig, load_config
from kdrl.trainer.logging import read_jsonl, read_metrics, step_line
from kdrl.train import main
from kdrl.trainer.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

P, G = 2, 4  # prompts per step, responses per prompt


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_tiny_pair(tmp_path_factory.mktemp("tiny"))


def settings(pair, out, steps=2, progress=False):
    return [f"model.student={pair[0]}", f"model.teacher={pair[1]}", "data.limit=16", "rollout.backend=hf",
            f"rollout.prompts_per_step={P}", f"rollout.group_size={G}", "rollout.max_new_tokens=6", "optim.lr=1e-3",
            "optim.micro_batch_size=4", f"run.steps={steps}", f"run.output_dir={out}",
            f"run.progress={str(progress).lower()}", "run.threads=1", "run.export_final=false", "run.plot=false",
            "loss.objective=kdrl", "loss.beta=0.5", "loss.log_exact_kl=true"]


def crash_on_call(trainer, monkeypatch, n):
    """Make the trainer's ``n``-th generate call raise KeyboardInterrupt (an interruption inside that step)."""
    calls, real = {"n": 0}, trainer.generator.generate

    def generate(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(trainer.generator, "generate", generate)


# ---- 1. stdout: progress from the start, the paths written, one line per step ----------------------------------
STEP_LINE = re.compile(r"^step (\d+)/(\d+)  reward (\S+)  acc (\S+)  len (\S+)  beta\*kd (\S+) \(kd (\S+)\)  "
                       r"clip (\S+)  beta (\S+)  grad (\S+)  \| (\S+) s/step: rollout (\S+), teacher (\S+), "
                       r"update (\S+), other (\S+)")


def test_stdout_shows_progress_paths_and_one_line_per_step(pair, tmp_path, capsys):
    out = tmp_path / "run"
    main(["--set=" + s for s in settings(pair, out, progress=True) + ["run.plot=true", "run.save_every=1"]])
    text = capsys.readouterr().out
    lines = text.splitlines()
    # Progress before anything slow, in order: config, paths, model loading, generator, the first rollout.
    order = ["config ok: kdrl (loss = GRPO + beta * k2, beta 0.5)", "per-step metrics", "loading the student",
             "student loaded", "loading the teacher", "teacher loaded", "starting the hf generator",
             "step 1: sampling 2 prompts x 4 responses", "step 1: 8 responses sampled and graded",
             "step 1: student forward/backward", "step 1/2  reward"]
    at = [next(i for i, line in enumerate(lines) if marker in line) for marker in order]
    assert at == sorted(at), list(zip(order, at))
    for path in ("metrics.jsonl", "samples.jsonl", "checkpoints", "curves.png"):
        assert f"{out / path}" in text, path
    steps = [STEP_LINE.match(line) for line in lines if line.startswith("step ") and "/2  " in line]
    assert [m is not None for m in steps] == [True, True], text
    logged = read_metrics(out / "metrics.jsonl")
    for m, rec in zip(steps, logged):
        assert int(m.group(1)) == rec["step"] and m.group(2) == "2"
        assert float(m.group(3)) == pytest.approx(rec["reward_mean"], abs=5e-4)
        assert float(m.group(5)) == pytest.approx(rec["len_mean"], abs=0.05)
        assert rec["kd_term"] == pytest.approx(rec["beta"] * rec["kd_loss"]) and rec["kd_raw"] == rec["kd_loss"]
        assert float(m.group(6)) == pytest.approx(rec["kd_term"], rel=1e-2)  # beta * kd, as it enters the loss
        assert float(m.group(7)) == pytest.approx(rec["kd_raw"], rel=1e-2)
        assert float(m.group(9)) == 0.5
        assert float(m.group(10)) == pytest.approx(rec["grad_norm"], rel=1e-2) and rec["grad_norm"] > 0
        split = [float(m.group(i)) for i in (12, 13, 14, 15)]
        assert float(m.group(11)) == pytest.approx(sum(split), abs=0.26)  # each part is shown to 0.1 s
        assert all(x >= 0 for x in split)  # shown to 0.1 s: a tiny model on an idle machine can show 0.0
        timed = [v for k, v in rec.items() if k.startswith("time_") and k != "time_step"]
        assert timed and all(v > 0 for v in timed)  # the phases behind the split were timed
    assert "saved step_000002" in lines[at[-1] + 1]  # where the checkpoint went, on the step's line
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_command_says_something_before_its_imports(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    # A config error (kdrl without a teacher) ends the run right after the imports, before any model.
    proc = subprocess.run([sys.executable, "-m", "kdrl.train", "--set", "loss.objective=kdrl", "--set",
                           f"run.output_dir={tmp_path}"], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode != 0 and "needs model.teacher" in proc.stderr
    assert proc.stdout.startswith("[kdrl.train +0.0s] starting: importing torch")


def test_step_line_for_objectives_without_a_kd_term():
    m = {"reward_mean": 0.5, "accuracy": 0.5, "len_mean": 12.25, "clip_frac": 0.0, "beta": 0.0,
         "time_generation": 1.0, "time_grading": 0.5, "time_student_fwd_bwd": 2.0, "time_weight_sync": 0.25}
    line = step_line(3, 10, m)
    assert line == ("step 3/10  reward 0.500  acc 0.500  len 12.2  beta*kd -  clip 0.000  beta 0  grad -  "
                    "| 3.8 s/step: rollout 1.5, teacher 0.0, update 2.0, other 0.2")
    assert "beta*kd - (k2 to teacher 0.3)" in step_line(1, 1, {**m, "k2": 0.3})  # trrd: the teacher is in the ratio


def test_quiet_run_prints_nothing_on_stdout(pair, tmp_path, capsys):
    Trainer(load_config(None, settings(pair, tmp_path, steps=1))).run()
    assert capsys.readouterr().out == ""


# ---- 2. samples.jsonl, once per step after an interrupted and resumed run -------------------------------------
def test_samples_are_saved_per_step_and_not_duplicated_by_a_resume(pair, tmp_path, monkeypatch):
    base = ["run.save_every=2"]
    straight = Trainer(load_config(None, settings(pair, tmp_path / "a", steps=4) + base))
    straight.run()
    want = read_jsonl(tmp_path / "a" / "samples.jsonl")
    assert [r["step"] for r in want] == [s for s in (1, 2, 3, 4) for _ in range(P * G)]
    first = want[0]
    assert set(first) == {"step", "group", "prompt", "gold", "response", "reward", "length", "advantage",
                          "truncated"}
    assert first["prompt"] in {p.question for p in straight.problems} and isinstance(first["response"], str)
    assert all(0 < r["length"] <= 6 and r["truncated"] == (r["length"] == 6) for r in want)
    for step in range(1, 5):  # advantages are group-normalised: they sum to 0 in every group
        for g in range(P):
            adv = [r["advantage"] for r in want if r["step"] == step and r["group"] == g]
            assert len(adv) == G and abs(sum(adv)) < 1e-5

    # Checkpoint at step 2 only; step 3 runs (its samples are written) and the run dies inside step 4.
    interrupted = Trainer(load_config(None, settings(pair, tmp_path / "b", steps=4) + base))
    crash_on_call(interrupted, monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        interrupted.run()
    del interrupted
    partial = read_jsonl(tmp_path / "b" / "samples.jsonl")
    assert sorted({r["step"] for r in partial}) == [1, 2, 3]
    assert latest_checkpoint(tmp_path / "b").name == "step_000002"
    main(["--set=" + s for s in settings(pair, tmp_path / "b", steps=4) + base])  # resumes from step 2
    got = read_jsonl(tmp_path / "b" / "samples.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in want]  # step 3 once, by its rerun
    assert got == want  # and the rerun sampled exactly what the uninterrupted run did
    assert [r["step"] for r in read_metrics(tmp_path / "b" / "metrics.jsonl")] == [1, 2, 3, 4]
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step_000002", "step_000004"]  # the interval


# ---- 3. the plot's panels ----------------------------------------------------------------------------------------
def test_plot_writes_a_png_with_beta_and_the_kd_term_on_their_own_axes(pair, tmp_path):
    from kdrl.trainer.plot import main as plot_main, plot
    out = tmp_path / "run"
    Trainer(load_config(None, settings(pair, out, steps=2) + ["loss.beta_schedule=linear", "loss.beta_decay=0.1"])).run()
    records = read_metrics(out / "metrics.jsonl")
    drawn = plot(records, tmp_path / "c.png")
    png = (tmp_path / "c.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert drawn["beta (KD coefficient applied)"] == ["beta"]  # alone on its axis, not beside the loss
    assert drawn["KD term in the loss: beta * kd"] == ["beta * kd"]
    assert {"kd (as in the loss, before beta)", "k2", "exact reverse KL"} <= set(drawn["raw KL to the teacher (per token)"])
    assert drawn["reward / accuracy"] == ["reward (train)", "accuracy (train)"]
    assert drawn["response length"][0] == "all"
    assert "beta" not in drawn["loss"] and "grad norm" not in drawn["loss"]
    assert {"generation", "student_fwd_bwd"} <= set(drawn["seconds per step"])
    assert [r["beta"] for r in records] == pytest.approx([0.5, 0.4])
    plot_main([str(out)])  # a run directory is enough: writes curves.png beside its metrics
    assert (out / "curves.png").exists()


# ---- 4. checkpoints that fit a laptop ----------------------------------------------------------------------------
def test_keep_checkpoints_has_one_default_and_prunes_old_ones(pair, tmp_path):
    assert RunConfig().keep_checkpoints == 2
    with pytest.raises(ValueError, match="run.keep_checkpoints"):
        load_config(None, ["run.keep_checkpoints=0"])
    with pytest.raises(ValueError, match="run.save_every"):
        load_config(None, ["run.save_every=-1"])
    Trainer(load_config(None, settings(pair, tmp_path, steps=3) + ["run.save_every=1"])).run()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002", "step_000003"]


def test_shipped_configs_do_not_checkpoint_the_smoke_run_every_step():
    from pathlib import Path
    root = Path(__file__).parent.parent / "configs"
    for name in ("smoke.yaml", "cpu_gsm8k_lora.yaml"):
        cfg = load_config(root / name)
        assert cfg.run.save_every != 1, name
        assert "keep_checkpoints" not in (root / name).read_text()  # the default lives in kdrl.trainer.config only


def test_lora_checkpoint_holds_adapters_only_and_resumes_bitwise(pair, tmp_path, monkeypatch):
    lora = ["model.lora_rank=4", "optim.lr=1e-2", "run.save_every=1"]
    straight = Trainer(load_config(None, settings(pair, tmp_path / "a", steps=3) + lora))
    straight.run()
    ckpt = latest_checkpoint(tmp_path / "a")
    weights = load_file(str(ckpt / "weights.safetensors"))
    adapters = {n for n, p in straight.model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    assert set(weights) == adapters  # no base-model tensor is copied
    assert all(w.dtype == torch.float32 for w in weights.values())  # the fp32 masters of the bf16 adapters
    opt = load_file(str(ckpt / "optimizer.safetensors"))
    assert set(opt) == {"__rng_torch__"} | {f"{i}.{k}" for i in range(len(adapters))
                                            for k in ("exp_avg", "exp_avg_sq", "step")}
    n_lora = sum(w.numel() for w in weights.values())
    n_model = sum(p.numel() for p in straight.model.parameters())
    assert n_lora < 0.2 * n_model
    assert checkpoint_bytes(ckpt) < 12 * n_lora + 64_000  # 4 B weight + 8 B AdamW per adapter parameter, + JSON

    interrupted = Trainer(load_config(None, settings(pair, tmp_path / "b", steps=3) + lora))
    crash_on_call(interrupted, monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        interrupted.run()
    del interrupted
    main(["--set=" + s for s in settings(pair, tmp_path / "b", steps=3) + lora])
    resumed = Trainer(load_config(None, settings(pair, tmp_path / "b", steps=3) + lora))  # loads step 3
    assert resumed.step == 3
    for name, p in straight.master.params.items():
        assert torch.equal(p, resumed.master.params[name]), name
    want, got = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert sorted(want) == sorted(got) == list(range(len(adapters)))
    for i, entry in want.items():
        for k, value in entry.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(got[i][k])), (i, k)
    # the frozen base is the student's initial weights in both (it was never saved, only reloaded)
    base = {n: p for n, p in resumed.model.named_parameters() if not p.requires_grad}
    for n, p in straight.model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base[n]), n
    json.loads((latest_checkpoint(tmp_path / "b") / "state.json").read_text())  # complete


def test_smoke_config_pairs_the_student_with_a_different_teacher():
    """teacher = student made the smoke run's KD term and gradient exactly 0: it must pair two different models."""
    from pathlib import Path
    from kdrl.trainer.config import loss_config
    from kdrl.models import REGISTRY
    cfg = load_config(Path(__file__).parent.parent / "configs" / "smoke.yaml")
    assert cfg.model.teacher and cfg.model.teacher != cfg.model.student
    assert {cfg.model.student, cfg.model.teacher} <= set(REGISTRY)  # offline: both come from the package registry
    lc = loss_config(cfg)
    assert lc.needs_teacher and lc.beta > 0 and cfg.run.steps >= 2


@pytest.mark.slow
def test_smoke_run_moves_the_student(tmp_path):
    """One step of configs/smoke.yaml (the Qwen pair, 1.6 GB fetched once): non-zero KD signal and gradient."""
    from pathlib import Path
    cfg = load_config(Path(__file__).parent.parent / "configs" / "smoke.yaml",
                      [f"run.output_dir={tmp_path}", "run.steps=1", "run.plot=false", "run.progress=false"])
    Trainer(cfg).run()
    (rec,) = read_metrics(tmp_path / "metrics.jsonl")
    assert rec["k2"] > 0.05 and rec["exact_kl"] > 0.01 and rec["grad_norm"] > 0, rec
