"""`evals/run.py` as a careful user meets it: bad arguments (one line, exit 2, nothing created), a model that is
not there, run folder names, a garbled samples file, progress lines beside progress bars, the load line, time
projections for small runs, and an interrupt whose message stays the last line printed."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from evals import run as run_mod
from evals.args import safe_name
from evals.store import RunStore
from kdrl.data import load_task
from test_evals_proc import sigint_default
from test_evals_progress import FakeClock, SlowGenerator
from test_evals_runner import ScriptedGenerator

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def cli(monkeypatch):
    """run.cli in this process, with the signal handlers and unraisable hook it installs put back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    yield lambda argv: run_mod.cli(argv, _exit=None)
    for s, h in saved.items():
        signal.signal(s, h)
    run_mod._STOP["signal"] = None


def _model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


@pytest.mark.parametrize("argv,names", [
    (["--tasks", "gsm8k,foo"], "--tasks"), (["--n", "0"], "--n 0"), (["--temperature", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"), (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"),
    (["--limit", "0"], "--limit 0"), (["--limit", "x"], "--limit"), (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--n", "4"], "--n 4 needs --temperature"), (["--batch-size", "0"], "--batch-size"),
    (["--chunk-size", "-2"], "--chunk-size"), (["--save-every", "-1"], "--save-every"),
    (["--grade-timeout", "0"], "--grade-timeout"), (["--num-fewshot", "-1"], "--num-fewshot"),
    (["--seed", "-3"], "--seed"), (["--run-name", "../up"], "--run-name"), (["--run-name", "-x"], "--run-name"),
    (["--baseline", "nosuchrun"], "--baseline"), (["--backend", "gpu"], "--backend"),
    (["--model", "/no/such/model/dir"], "--model /no/such/model/dir: no such directory"),
    (["--model", "./relative/missing"], "no such directory"),
])
def test_bad_arguments_are_one_line_and_exit_2_creating_nothing(cli, capsys, tmp_path, argv, names):
    out = tmp_path / "out"
    assert cli(argv + ["--output-dir", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("evals/run.py: error: ") and names in err, err
    assert "Traceback" not in err and not out.exists()


def test_bad_output_dir_and_model_files_are_refused(cli, capsys, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for argv, text in ((["--output-dir", str(a_file)], "is a file"),
                       (["--output-dir", str(a_file / "below")], "cannot be created"),
                       (["--model", str(a_file), "--output-dir", str(tmp_path / "o")], "is a file"),
                       (["--model", str(tmp_path), "--output-dir", str(tmp_path / "o")], "no config.json")):
        assert cli(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and text in err, err
    assert not (tmp_path / "o").exists()


def test_a_model_that_fails_to_load_leaves_no_run_folder(cli, capsys, tmp_path, monkeypatch):
    def broken(model, **kw):
        raise OSError(f"Unable to load weights from {model}/model.safetensors")

    monkeypatch.setattr("evals.run.make_generator", broken)
    out = tmp_path / "out"
    argv = ["--model", str(_model_dir(tmp_path)), "--backend", "hf", "--tasks", "aime24", "--limit", "2",
            "--output-dir", str(out), "--no-progress"]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("evals/run.py: error: --model") and "Unable to load weights" in last
    assert "Traceback" not in err and not out.exists()


def test_missing_model_path_in_a_subprocess_is_one_line_before_the_banner(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "evals" / "run.py"), "--model", str(tmp_path / "nope"),
                           "--tasks", "gsm8k", "--output-dir", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no such directory" in proc.stderr
    assert "model    " not in proc.stderr and not out.exists() and not list(tmp_path.glob("-*"))


def test_run_folder_names_are_safe():
    assert safe_name("/home/me/models/Qwen 2.5") == "home-me-models-Qwen-2.5"
    assert safe_name("org/model-name") == "org-model-name" and safe_name("---") == "run"
    args = run_mod.build_parser().parse_args(["--model", "org/Some.Model"])
    assert run_mod.default_run_name(args, "hf").startswith("org-Some.Model_hf_boxed_greedy")


# --- samples file ---------------------------------------------------------------------------------------------
def _line(i, sample=0):
    return json.dumps({"task": "aime24", "id": f"p{i}", "sample": sample, "correct": True}) + "\n"


def test_garbled_middle_line_is_skipped_with_a_warning_and_nothing_after_it_is_lost(tmp_path, capsys):
    store = RunStore(tmp_path / "run")
    lines = [_line(i) for i in range(40)]
    lines[9] = '{"task": "aime24", "id": "p9", "sam\x00\x00ple": garbage}\n'
    text = "".join(lines)
    store.path("aime24").write_text(text)
    records = store.load("aime24")
    assert [r["id"] for r in records] == [f"p{i}" for i in range(40) if i != 9]  # 39: the 30 after it kept
    err = capsys.readouterr().err
    assert "line 10 is not a valid sample record" in err and "skipped" in err
    assert store.path("aime24").read_text() == text  # the file is left as it is
    store.load("aime24")
    assert capsys.readouterr().err == ""  # warned once, not on every load
    # A line that is JSON but not a sample, and one with bad UTF-8, are skipped the same way.
    with open(store.path("aime24"), "ab") as f:
        f.write(b"[1, 2]\n\xff\xfe\n" + _line(40).encode())
    assert len(store.load("aime24")) == 40 and capsys.readouterr().err.count("not a valid sample record") == 2


def test_partial_last_line_is_cut_with_a_message_and_a_whole_one_kept(tmp_path, capsys):
    store = RunStore(tmp_path / "run")
    good = _line(0) + _line(1)
    store.path("aime24").write_text(good + '{"task": "aime24", "id": "p2", "sam')
    assert [r["id"] for r in store.load("aime24")] == ["p0", "p1"]
    assert store.path("aime24").read_text() == good and "cut a partial last line" in capsys.readouterr().err
    store.path("aime24").write_text(good + _line(2).rstrip("\n"))  # a whole record that lost only its newline
    assert len(store.load("aime24")) == 3 and store.path("aime24").read_text() == good + _line(2)


def test_resume_over_a_garbled_line_regenerates_only_that_sample(tmp_path):
    from evals.runner import EvalSettings, evaluate_task
    from kdrl.generation import SamplingConfig

    problems = load_task("aime24", limit=6)
    golds = {p.question: p.answer for p in problems}
    settings = EvalSettings(SamplingConfig(max_new_tokens=16), chunk_size=3, limit=6)
    store = RunStore(tmp_path / "run")
    evaluate_task(ScriptedGenerator(golds), "aime24", settings, store, progress=False)
    lines = store.path("aime24").read_text().splitlines(keepends=True)
    lines[2] = lines[2][:20] + "#garbled#" + lines[2][20:]
    store.path("aime24").write_text("".join(lines))
    again = ScriptedGenerator(golds)
    metrics = evaluate_task(again, "aime24", settings, RunStore(tmp_path / "run"), progress=False)
    assert again.calls == [[problems[2].question]] and metrics["n_problems"] == 6
    assert len(store.path("aime24").read_text().splitlines()) == 7  # six good lines + the garbled one, kept


# --- what a run prints ----------------------------------------------------------------------------------------
def _fake_run(tmp_path, monkeypatch, capsys, argv):
    clock = FakeClock()
    monkeypatch.setattr("evals.runner.time.monotonic", clock)
    monkeypatch.setattr("evals.run.vllm_available", lambda: False)
    said = []
    real_say = run_mod._say
    monkeypatch.setattr("evals.run._say", lambda line: (said.append(line), real_say(line)))
    seen_at_load = []

    def fake_make_generator(model, backend, **kw):
        seen_at_load.extend(said)
        return SlowGenerator({p.question: p.answer for p in load_task("aime24")}, clock, seconds_per_problem=5.0)

    monkeypatch.setattr("evals.run.make_generator", fake_make_generator)
    monkeypatch.setattr("evals.leaderboard.plot_scatter", lambda runs, path: Path(path))
    run_mod.main(argv + ["--output-dir", str(tmp_path / "out")])
    return capsys.readouterr().err, seen_at_load


def test_progress_lines_never_share_a_line_with_a_progress_bar(tmp_path, monkeypatch, capsys):
    err, _ = _fake_run(tmp_path, monkeypatch, capsys, ["--tasks", "aime24", "--limit", "8", "--chunk-size", "8",
                                                       "--batch-size", "2", "--save-every", "0", "--run-name", "bar"])
    pieces = re.split(r"[\r\n]", err)
    progress = [p for p in pieces if "progress " in p and "samples (" in p]
    assert progress and "|" in err  # the bars were drawn
    assert all(p.lstrip().startswith("bar: progress") for p in progress), progress


def test_a_load_line_comes_before_the_model_loads(tmp_path, monkeypatch, capsys):
    model = _model_dir(tmp_path)
    err, seen = _fake_run(tmp_path, monkeypatch, capsys, ["--model", str(model), "--tasks", "aime24", "--limit", "2",
                                                          "--no-progress"])
    assert any(line.endswith(f"loading model {model} (loading the weights and starting the engine)")
               for line in seen), seen
    assert "model loaded in" in err


def test_load_ticker_repeats_until_the_model_is_loaded(capsys):
    ticker = run_mod._LoadTicker("r", "some/model", every=0.05)
    time.sleep(0.3)
    ticker.done()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("r: loading model some/model") and len(lines) >= 3
    assert all("still loading the model" in line for line in lines[1:])


def test_projection_for_a_small_run_holds():
    """`--tasks math --limit 3` (Qwen 0.5B, vLLM): measured 18 min of generation at 7.4 tok/s on a loaded machine,
    with chunks of 3 prompts; the old projection said 26 s - 1 min. Now: the slow end within a factor 2 of it."""
    args = run_mod.build_parser().parse_args(["--tasks", "math", "--limit", "3"])
    lo, hi = run_mod._projection({t: 3 for t in range(7)}, args, "vllm")
    assert 18 * 60 / 2 <= hi <= 18 * 60 * 2 and lo < hi
    # A full run keeps the measured full-batch rate: 2,866 problems at 349-85 tok/s.
    lo, hi = run_mod._projection({"all": 2866}, args, "vllm")
    assert lo == pytest.approx(2866 * 0.85 * 512 / 349) and hi == pytest.approx(2866 * 0.85 * 512 / 85)
    text = run_mod._banner("r", args, "vllm", "src", ["aime24"], 21, 0, Path("/tmp/x"), False, {"aime24": 21})
    assert "model load" in text and "generation" in text


# --- interrupt ------------------------------------------------------------------------------------------------
NOISY = r"""
import atexit, os, signal, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from evals import run
seg = sys.argv[2]
CHILD = '''
import os, signal, sys, time
f = open(sys.argv[1], "w")          # holds a shared-memory segment, as vLLM's engine does
def on_int(*_):                      # vLLM's engine on Ctrl-C: tracebacks, a while after the signal
    time.sleep(0.5)
    for _ in range(20):
        print("RuntimeError: cancelled", file=sys.stderr, flush=True)
    time.sleep(30)
signal.signal(signal.SIGINT, on_int)
print("child ready", flush=True)
while True:
    time.sleep(1)
'''

def fake_main(argv):
    atexit.register(lambda: print("Traceback (most recent call last): at exit", file=sys.stderr, flush=True))
    child = subprocess.Popen([sys.executable, "-c", CHILD, seg], stdout=subprocess.PIPE, text=True)
    child.stdout.readline()
    print("ready", flush=True)
    while True:
        time.sleep(0.1)

run.main = fake_main
sys.exit(run.cli([]))
"""


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc (Linux)")
def test_interrupt_message_is_the_last_line_and_children_and_segments_are_gone(tmp_path):
    seg = Path("/dev/shm" if os.path.isdir("/dev/shm") else tmp_path) / f"psm_kdrltest_int{os.getpid()}"
    proc = subprocess.Popen([sys.executable, "-c", NOISY, str(REPO), str(seg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=sigint_default, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
        _, err = proc.communicate(timeout=60)
    finally:
        try:  # the whole group, the fake engine child included, even when the harness left it behind
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # the harness ended its children itself: nothing of the group is left
        proc.wait()
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130, err
    assert lines[-1].startswith("interrupted (Ctrl-C)") and "at exit" not in err, err
    if seg.parent == Path("/dev/shm"):
        assert not seg.exists()
    elif seg.exists():
        seg.unlink()


# --- one writer per run folder ----------------------------------------------------------------------------------
LOCKER = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from evals.store import RunStore
RunStore(sys.argv[2]).lock()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_into_the_same_folder_is_refused_naming_the_first(cli, capsys, tmp_path):
    run_dir = tmp_path / "out" / "busy"
    holder = subprocess.Popen([sys.executable, "-c", LOCKER, str(REPO), str(run_dir)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert f"PID {holder.pid} on " in RunStore(run_dir, create=False).holder()
        with pytest.raises(ValueError, match=f"in use by another run: PID {holder.pid}"):
            RunStore(run_dir).lock()
        argv = ["--model", str(_model_dir(tmp_path)), "--backend", "hf", "--tasks", "aime24", "--limit", "2",
                "--output-dir", str(tmp_path / "out"), "--run-name", "busy", "--no-progress"]
        assert cli(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"is in use by PID {holder.pid}" in err and "another --run-name" in err
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process, no stale lock to clear
        holder.wait()
    assert RunStore(run_dir, create=False).holder() is None
    store = RunStore(run_dir)
    store.lock()
    store._lock.release()
