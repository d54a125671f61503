"""Runs never lose data (issue 22): one writer per run directory, no run overwritten by a fresh start, log records
and checkpoints that commit together at every kill point, checkpoints verified by checksum, every config error at
start as one line. Each case of the issue is reproduced on the tests' tiny offline models."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _train_tiny import make_tiny_pair, one_thread  # noqa: F401
from kdrl.train import main
from kdrl.trainer.checkpoint import (CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint,
                                     verify_checkpoint)
from kdrl.trainer.config import ConfigError, load_config
from kdrl.trainer.logging import cut_jsonl, read_jsonl
from kdrl.trainer.loop import Trainer
from kdrl.runlock import LOCK_NAME, RunLock, RunLockError
from kdrl.trainer.rundir import move_aside

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
P, G, STEPS = 2, 2, 3  # prompts per step, responses per prompt, steps of the reference run


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_tiny_pair(tmp_path_factory.mktemp("tiny"))


def settings(pair, out, steps=STEPS):
    return [f"model.student={pair[0]}", f"model.teacher={pair[1]}", "model.dtype=float32", "data.limit=16",
            "rollout.backend=hf", f"rollout.prompts_per_step={P}", f"rollout.group_size={G}",
            "rollout.max_new_tokens=4", "optim.lr=1e-2", "optim.micro_batch_size=4", f"run.steps={steps}",
            f"run.output_dir={out}", "run.progress=false", "run.threads=1", "run.export_final=false",
            "run.plot=false", "run.save_every=1", "run.keep_checkpoints=3", "loss.objective=kdrl", "loss.beta=0.5"]


def args(pair, out, steps=STEPS, *extra):
    return ["--set=" + s for s in settings(pair, out, steps) + list(extra)]


def comparable(record):
    """What a resumed run must repeat exactly: everything but timings, memory and bytes on disk."""
    return {k: v for k, v in record.items() if not k.startswith("time_") and k not in ("peak_rss_gb", "checkpoint_mb")}


def records(out):
    return [comparable(r) for r in read_jsonl(Path(out) / "metrics.jsonl")], read_jsonl(Path(out) / "samples.jsonl")


@pytest.fixture(scope="module")
def reference(pair, tmp_path_factory):
    """An uninterrupted run: STEPS steps, a checkpoint after each (all kept). Returns its directory."""
    out = tmp_path_factory.mktemp("ref") / "run"
    Trainer(load_config(None, settings(pair, out))).run()
    return out


def refused(capsys, call) -> str:
    """Run ``call`` (a main(...)), expect exit 2 with one line on stderr; return that line."""
    with pytest.raises(SystemExit) as exit_:
        call()
    assert exit_.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("kdrl.train: error:")]
    assert len(err) == 1, err
    return err[0]


# ---- 5. every config error at start: one line naming the field and the value, exit 2, no model loaded ---------
@pytest.fixture
def no_models(monkeypatch):
    import kdrl.models

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the config and the run directory were checked")

    monkeypatch.setattr(kdrl.models, "load_model_and_tokenizer", no_loading)
    monkeypatch.setattr(kdrl.models, "resolve_model", no_loading)


@pytest.mark.parametrize("override, message", [
    ("run.steps=2.5", "run.steps must be an integer, got 2.5"),
    ("rollout.group_size=2.5", "rollout.group_size must be an integer, got 2.5"),
    ("optim.warmup_steps=-5", "optim.warmup_steps must be >= 0 (0 = no warmup), got -5"),
    ("optim.grad_clip=-1", "optim.grad_clip must be > 0, or 0 for no clipping, got -1.0"),
    ("optim.lr=-1e-3", "optim.lr must be >= 0 (0 keeps the weights fixed), got -0.001"),
    ("optim.betas=[0.9]", "optim.betas must be two numbers in [0, 1), got [0.9]"),
    ("optim.betas=[0.9, 1.0]", "optim.betas must be two numbers in [0, 1), got [0.9, 1.0]"),
    ("rollout.top_p=0", "rollout.top_p must be in (0, 1] (1 = no nucleus truncation), got 0.0"),
    ("data.task=gsm9k", "data.task must be one of gsm8k_train, math_train, gsm8k, "),
    ("data.limit=0", "data.limit must be >= 1 or null (all problems), got 0"),
    ("run.eval_limit=0", "run.eval_limit must be >= 1 or null (the whole task), got 0"),
    ("run.eval_task=gsm9k", "run.eval_task must be one of gsm8k_train, math_train, gsm8k, "),
    ("run.resume=maybe", "run.resume must be true or false, got 'maybe'"),
    ("optim.lr=.nan", "optim.lr must be a finite number, got nan"),
    ("loss.objective=kdrl", "loss.objective='kdrl' needs model.teacher"),
])
def test_each_bad_field_is_one_line_naming_it_with_exit_2(tmp_path, capsys, no_models, override, message):
    out = tmp_path / "run"
    line = refused(capsys, lambda: main(["--set", "loss.objective=grpo", "--set", override,
                                         "--set", f"run.output_dir={out}"]))
    assert line.startswith("kdrl.train: error: " + message)
    if "gsm9k" in override:
        assert line.endswith("got 'gsm9k'")
    assert not out.exists()  # refused before anything was written


def test_config_file_errors_and_unusable_output_dirs_are_one_line(tmp_path, capsys, no_models):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert "is empty" in refused(capsys, lambda: main(["--config", str(empty)]))
    assert "cannot be read" in refused(capsys, lambda: main(["--config", str(tmp_path / "missing.yaml")]))
    broken = tmp_path / "broken.yaml"
    broken.write_text("run: {steps: [\n")
    assert "not valid YAML" in refused(capsys, lambda: main(["--config", str(broken)]))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out in (a_file, a_file / "below"):  # the output directory is a file, or lies under one
        line = refused(capsys, lambda out=out: main(["--set", "loss.objective=grpo",
                                                     "--set", f"run.output_dir={out}"]))
        assert "run.output_dir" in line and "not a directory" in line
    assert a_file.read_text() == "x"


# ---- 1. one writer per run directory --------------------------------------------------------------------------
def test_a_second_run_is_refused_naming_the_first_and_a_dead_ones_lock_is_taken_over(pair, tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from kdrl.runlock import RunLock; "
                               "lock = RunLock(sys.argv[1]); lock.acquire(); print('held', flush=True); time.sleep(300)", str(out)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        line = refused(capsys, lambda: main(args(pair, out, 1)))
        assert f"in use by another run: PID {holder.pid} on " in line and "choose another run.output_dir" in line
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: its record stays in the lock file
        holder.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid
    main(args(pair, out, 1))
    err = capsys.readouterr().err
    assert "taking over the stale lock" in err and f"PID {holder.pid}" in err
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1]
    assert (out / LOCK_NAME).read_text() == ""  # released at the end of the run


def test_two_trainers_in_one_process_exclude_each_other(pair, tmp_path):
    first = Trainer(load_config(None, settings(pair, tmp_path, 1)))
    with pytest.raises(ConfigError, match=f"in use by another run: PID {os.getpid()}"):
        Trainer(load_config(None, settings(pair, tmp_path, 1)))
    first.close()
    second = Trainer(load_config(None, settings(pair, tmp_path, 1)))
    with pytest.raises(ConfigError, match="in use"):
        first.run()  # a run takes the lock again before writing: the directory is the second's now
    second.run()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1]


def test_without_flock_the_pid_and_host_decide(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl
    import socket

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = socket.gethostname()
    cases = [({"pid": os.getppid(), "host": here}, "in use by another run"),
             ({"pid": 12345, "host": here + "-elsewhere"}, "delete"),
             ({"pid": dead.pid, "host": here}, None)]
    for record, refusal in cases:
        (tmp_path / LOCK_NAME).write_text(json.dumps({**record, "started": "t", "command": "c"}))
        lock = RunLock(tmp_path)
        if refusal:
            with pytest.raises(RunLockError, match=refusal):
                lock.acquire()
        else:
            lock.acquire()
            assert "taking over the stale lock" in capsys.readouterr().err
            assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
            lock.release()
    assert (tmp_path / LOCK_NAME).read_text() == ""


# ---- 2. never delete a run ------------------------------------------------------------------------------------
def test_a_fresh_start_in_a_used_directory_is_refused_and_fresh_moves_the_run_aside(pair, reference, tmp_path,
                                                                                   capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = (out / "metrics.jsonl").read_bytes(), (out / "samples.jsonl").read_bytes()
    line = refused(capsys, lambda: main(args(pair, out, 2, "run.resume=false")))  # what the old advice said
    assert "holds a run" in line and "metrics.jsonl (3 lines)" in line and "--fresh" in line
    assert ((out / "metrics.jsonl").read_bytes(), (out / "samples.jsonl").read_bytes()) == before
    assert [p.name for p in list_checkpoints(out)] == ["step_000001", "step_000002", "step_000003"]
    # Following the advice: the old run moves aside whole, the new one starts at step 0 and keeps its checkpoints
    # (step_000001 used to be pruned the moment it was written, behind the old step_000002/3).
    main(["--fresh"] + args(pair, out, 2))
    assert "moved the previous run" in capsys.readouterr().err
    (aside,) = tmp_path.glob("run.old-*")
    assert ((aside / "metrics.jsonl").read_bytes(), (aside / "samples.jsonl").read_bytes()) == before
    assert [p.name for p in list_checkpoints(aside)] == ["step_000001", "step_000002", "step_000003"]
    assert [p.name for p in list_checkpoints(out)] == ["step_000001", "step_000002"]
    want_metrics, want_samples = records(reference)
    got_metrics, got_samples = records(out)
    assert got_metrics == want_metrics[:2] and got_samples == want_samples[:2 * P * G]


def test_fresh_never_moves_a_directory_holding_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ConfigError, match="notes.txt"):
        move_aside(tmp_path)
    assert (tmp_path / "notes.txt").exists()


def _params_and_optimizer():
    params = {"w": torch.nn.Parameter(torch.randn(3, 2))}
    opt = torch.optim.AdamW(list(params.values()), lr=0.1)
    params["w"].sum().backward()
    opt.step()
    return params, opt


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    params, opt = _params_and_optimizer()
    for step in (2, 3):  # left by an older run (or by a hand copy)
        save_checkpoint(tmp_path, step, params, opt, {}, keep=5)
    assert save_checkpoint(tmp_path, 1, params, opt, {}, keep=1).exists()
    save_checkpoint(tmp_path, 12, params, opt, {}, keep=2)
    save_checkpoint(tmp_path, 100, params, opt, {}, keep=2)  # by step number: step_100 after step_12
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000012", "step_000100"]


# ---- 3. logs and checkpoints commit together --------------------------------------------------------------------
class Killed(Exception):
    """Stands for a kill -9 at an injected point (the SIGKILL test below does it for real)."""


def _inject(monkeypatch, point):
    """Make step 2 of the next run die at ``point`` of its epilogue (checkpoint write, records, commit)."""
    import kdrl.trainer.checkpoint as ckpt_mod
    import kdrl.trainer.logging as log_mod
    import kdrl.trainer.loop as loop_mod
    if point == "disk full in the checkpoint":
        real_save = ckpt_mod.save_file

        def save_file(tensors, filename):
            if filename.endswith("step_000002/optimizer.safetensors"):
                Path(filename).write_bytes(b"\0" * 100)
                raise OSError(28, "No space left on device")
            return real_save(tensors, filename)
        monkeypatch.setattr(ckpt_mod, "save_file", save_file)
    elif point == "disk full in the samples":
        real_append = log_mod.append_lines

        def append(path, text):
            if path.name == "samples.jsonl" and '"step": 2' in text:
                real_append(path, text[:len(text) // 2])
                raise OSError(28, "No space left on device")
            return real_append(path, text)
        monkeypatch.setattr(log_mod, "append_lines", append)
    elif point == "between samples and metrics":
        real_write = log_mod.MetricsLogger.write

        def write(self, step, metrics):
            if step == 2:
                raise Killed(point)
            return real_write(self, step, metrics)
        monkeypatch.setattr(log_mod.MetricsLogger, "write", write)
    else:
        real_commit = loop_mod.commit_checkpoint

        def commit(tmp, keep):
            if point == "before the commit" and tmp.name.endswith("step_000002"):
                raise Killed(point)
            done = real_commit(tmp, keep)
            if point == "after the commit" and done.name == "step_000002":
                raise Killed(point)
            return done
        monkeypatch.setattr(loop_mod, "commit_checkpoint", commit)


@pytest.mark.parametrize("point", ["disk full in the checkpoint", "disk full in the samples",
                                   "between samples and metrics", "before the commit", "after the commit"])
def test_no_kill_point_loses_or_duplicates_a_record(pair, reference, tmp_path, monkeypatch, capsys, point):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _inject(patch, point)
        with pytest.raises((Killed, OSError)):
            Trainer(load_config(None, settings(pair, out))).run()
    if point == "disk full in the checkpoint":
        assert (out / "checkpoints" / ".tmp-step_000002").exists()
    capsys.readouterr()
    main(args(pair, out))  # resume, as a user would
    err = capsys.readouterr().err
    if point == "disk full in the checkpoint":
        assert "removed" in err and ".tmp-step_000002" in err
        assert not (out / "checkpoints" / ".tmp-step_000002").exists()
    if point == "disk full in the samples":
        assert "samples.jsonl: cut an incomplete last line" in err
    assert records(out) == records(reference)  # every step once, as the uninterrupted run logged it


def test_sigkill_after_the_checkpoint_commit_keeps_every_record(pair, reference, tmp_path, capsys):
    """The issue's kill point (after the checkpoint's rename): a real kill -9 in a child process."""
    out = tmp_path / "run"
    script = ("import os, signal, sys\n"
              "import kdrl.trainer.loop as loop\n"
              "real = loop.commit_checkpoint\n"
              "def commit_then_die(tmp, keep):\n"
              "    done = real(tmp, keep)\n"
              "    if done.name == 'step_000002':\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    return done\n"
              "loop.commit_checkpoint = commit_then_die\n"
              "from kdrl.train import main\n"
              "main(sys.argv[1:])\n")
    proc = subprocess.run([sys.executable, "-c", script, *args(pair, out)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    main(args(pair, out))
    assert "taking over the stale lock" in capsys.readouterr().err
    assert records(out) == records(reference)


def test_jsonl_repair_cuts_only_an_incomplete_last_line(tmp_path, capsys):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n{"step": 3}\n{"step": 4, "x": "cut by a ki')
    cut_jsonl(path, 3)
    err = capsys.readouterr().err
    assert "cut an incomplete last line" in err and "m.jsonl:2 is not a JSON record; kept" in err
    assert path.read_text() == '{"step": 1}\nnot json\n{"step": 2}\n{"step": 3}\n'
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]  # the garbled line is skipped, with a warning
    path.write_text('{"step": 1}\n{"step": 2}')  # whole, only the newline missing: kept, newline added
    cut_jsonl(path, 5)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


# ---- 4. checkpoints that can be trusted -----------------------------------------------------------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _nan_bytes(path: Path) -> None:
    """Overwrite the last 16 bytes (tensor data) of a safetensors file with float32 NaNs."""
    data = bytearray(path.read_bytes())
    data[-16:] = b"\x00\x00\xc0\x7f" * 4
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name, damage", [("weights.safetensors", _truncate), ("optimizer.safetensors", _truncate),
                                          ("state.json", _truncate), ("weights.safetensors", _nan_bytes)])
def test_a_damaged_checkpoint_is_named_and_the_run_resumes_from_the_newest_intact_one(pair, reference, tmp_path,
                                                                                      capsys, name, damage):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    damage(out / "checkpoints" / "step_000003" / name)
    trainer = Trainer(load_config(None, settings(pair, out)))
    err = capsys.readouterr().err
    assert f"step_000003: {name}" in err and "set aside as damaged-step_000003" in err
    assert "resuming from step_000002, the newest intact checkpoint" in err
    assert trainer.step == 2
    trainer.run()  # step 3 again, exactly as before
    assert records(out) == records(reference)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "damaged-step_000003", "step_000001", "step_000002", "step_000003"]  # kept for inspection, not loaded


def test_nan_weights_are_refused_naming_the_tensor(pair, reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    ckpt = out / "checkpoints" / "step_000003"
    _nan_bytes(ckpt / "weights.safetensors")
    manifest = json.loads((ckpt / "manifest.json").read_text())  # a consistent manifest: the NaN was saved so
    import hashlib
    manifest["files"]["weights.safetensors"]["sha256"] = hashlib.sha256(
        (ckpt / "weights.safetensors").read_bytes()).hexdigest()
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    line = refused(capsys, lambda: main(args(pair, out)))
    assert "weights.safetensors" in line and "non-finite" in line and "model.norm.weight" in line
    params, opt = _params_and_optimizer()
    with torch.no_grad():
        params["w"][0, 1] = float("nan")
    with pytest.raises(CheckpointError, match="w holds 1 non-finite value"):  # nor is a diverged step saved
        save_checkpoint(tmp_path / "x", 1, params, opt, {}, keep=1)
    assert list_checkpoints(tmp_path / "x") == []


def test_manifest_checks_size_and_sha256_and_names_the_file(tmp_path):
    params, opt = _params_and_optimizer()
    ckpt = save_checkpoint(tmp_path, 1, params, opt, {}, keep=1)
    assert verify_checkpoint(ckpt) is True
    data = bytearray((ckpt / "optimizer.safetensors").read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern changed
    (ckpt / "optimizer.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="optimizer.safetensors is corrupt"):
        load_checkpoint(ckpt, params, opt)
    (ckpt / "manifest.json").unlink()  # a checkpoint from before manifests: loadable, reported as unverified
    assert verify_checkpoint(ckpt) is False


def test_a_forked_child_does_not_keep_or_clear_its_parents_lock(tmp_path):
    """Generation engines may fork workers that outlive a killed trainer: they must not hold the lock."""
    lock = RunLock(tmp_path)
    lock.acquire()
    record = (tmp_path / LOCK_NAME).read_text()
    to_parent, to_child = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: releasing (or exiting) must leave the parent's record alone
        lock.release()
        os.write(to_parent[1], b"x")
        os.read(to_child[0], 1)  # wait for the parent's go
        os._exit(0)
    try:
        assert os.read(to_parent[0], 1) == b"x"
        assert (tmp_path / LOCK_NAME).read_text() == record
        lock.release()
        other = RunLock(tmp_path)
        other.acquire()  # would be refused if the live child shared the flock
        other.release()
    finally:
        os.write(to_child[1], b"x")
        os.waitpid(pid, 0)
        for fd in to_parent + to_child:
            os.close(fd)


def test_a_run_without_a_checkpoint_is_not_started_over_silently(tmp_path):
    from kdrl.trainer.rundir import open_run_dir
    (tmp_path / "metrics.jsonl").write_text("")  # a run killed inside its first step: nothing to keep
    (tmp_path / "samples.jsonl").write_text("")
    lock, ckpt = open_run_dir(tmp_path, resume=True, fresh=False)
    assert ckpt is None
    lock.release()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')  # a step logged, never checkpointed (save_every=0)
    with pytest.raises(ConfigError, match="metrics.jsonl \\(1 line\\).* no intact checkpoint to resume from.*--fresh"):
        open_run_dir(tmp_path, resume=True, fresh=False)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (tmp_path / LOCK_NAME).read_text() == ""  # the refusal released the lock
