"""`bench/run.py` refuses bad arguments before the first case (one line naming the argument, exit 2, no traceback),
refuses an output location it cannot write and a --resume id that is not there, and leaves no folder behind when
no case finished."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import results
from bench import run as bench_run

REPO = Path(__file__).resolve().parent.parent


def _refused(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        bench_run.parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and err.startswith("bench/run.py: error: "), err
    return err


@pytest.mark.parametrize("argv,text", [
    (["--tokens", "0"], "--tokens 0: expected an integer >= 1"),
    (["--tokens", "256", "-64"], "--tokens -64"),
    (["--smoke", "--tokens", "300"], "--tokens 300: expected a multiple of the sequence length 256"),
    (["--repeats", "0"], "--repeats 0"), (["--warmup", "-1"], "--warmup -1"), (["--threads", "0"], "--threads 0"),
    (["--tokens", "x"], "--tokens: invalid int value"), (["--providers", "nope"], "unknown provider"),
    (["--interpret"], "--smoke"), (["--workloads", "sft"], "--workloads"),
])
def test_bad_arguments_are_one_line_exit_2(capsys, tmp_path, argv, text):
    assert text in _refused(capsys, argv + ["--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_out_must_be_a_writable_directory(capsys, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "is a file" in _refused(capsys, ["--out", str(a_file)])
    assert "cannot be created" in _refused(capsys, ["--out", str(a_file / "sub")])
    if Path("/proc").is_dir():  # root may write anywhere else; nobody can create files in /proc
        assert "cannot write in /proc" in _refused(capsys, ["--out", "/proc/kdrl-bench/out"])
    (tmp_path / "d" / "results.jsonl").mkdir(parents=True)
    assert "not a writable file" in _refused(capsys, ["--out", str(tmp_path / "d")])


def test_resume_needs_a_run_that_is_there(capsys, tmp_path):
    out = tmp_path / "out"
    assert "it holds no runs" in _refused(capsys, ["--resume", "NOSUCHRUN", "--out", str(out)])
    assert not out.exists()
    recs = [{"run_id": rid, "provider": "naive"} for rid in ("20261201T000000Z", "20261202T000000Z")]
    results.append(recs, out)
    err = _refused(capsys, ["--resume", "NOSUCHRUN", "--out", str(out)])
    assert "no such run" in err and "20261201T000000Z, 20261202T000000Z" in err
    assert bench_run.parse_args(["--smoke", "--resume", "20261202T000000Z", "--out", str(out)]).resume


def test_a_run_stopped_before_its_first_case_leaves_no_folder(tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_run, "run_case", interrupted)
    out = tmp_path / "never"
    with pytest.raises(KeyboardInterrupt):
        bench_run.main(["--smoke", "--no-plots", "--out", str(out)])
    assert not out.exists()


def test_the_command_itself_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--tokens", "0", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "bench/run.py: error: --tokens 0: expected an integer >= 1 (--help for usage)"]
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []


def test_results_file_with_a_garbled_line_still_resumes(tmp_path):
    """A record cut by a crash mid-append must not make --resume (or the next run) fail: it is skipped."""
    out = tmp_path / "out"
    results.append([{"run_id": "r1", "provider": "naive"}], out)
    with open(out / "results.jsonl", "a") as f:
        f.write('{"run_id": "r1", "prov')
    assert [r["run_id"] for r in results.load(out)] == ["r1"]
    assert bench_run.parse_args(["--smoke", "--resume", "r1", "--out", str(out)]).resume == "r1"
    results.append([{"run_id": "r2", "provider": "naive"}], out)
    assert [r["run_id"] for r in results.load(out)] == ["r1", "r2"]
    assert json.loads((out / "results.jsonl").read_text().splitlines()[-1])["run_id"] == "r2"
