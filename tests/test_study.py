"""The mission loop on the tests' tiny models, as a user runs it: ``python study/run.py <study file>`` trains two
arms (KDRL, GRPO) with held-out measurement, exports them, evaluates them and the starting student with
``evals/run.py``, and writes the report (tables, PNG, leaderboard rows) into a docs page whose own text is kept."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from _train_tiny import make_tiny_pair
from study.config import StudyError, load_study

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_tiny_pair(tmp_path_factory.mktemp("tiny"))


def study_file(tmp_path, pair, **changes) -> Path:
    tree = {
        "output_dir": "study",  # relative: to the directory the command runs in, as for the trainer
        "train": {"model": {"student": str(pair[0]), "teacher": str(pair[1]), "lora_rank": 4, "dtype": "float32"},
                  "data": {"limit": 16},
                  "rollout": {"backend": "hf", "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 8},
                  "optim": {"lr": 1e-2, "micro_batch_size": 4},
                  "run": {"steps": 2, "save_every": 1, "eval_at_start": True, "eval_every": 1, "eval_limit": 3,
                          "eval_max_new_tokens": 6, "eval_kl": True, "threads": 1}},
        "arms": {"kdrl": {"loss": {"objective": "kdrl", "beta": 0.5}}, "grpo": {"loss": {"objective": "grpo"}}},
        "eval": {"tasks": "gsm8k", "limit": 3, "max_new_tokens": 6, "backend": "hf"},
        "report": "docs/study.md",
    }
    tree.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))  # arms in their order
    return path


def run_study(tmp_path, *args):
    return subprocess.run([sys.executable, str(REPO / "study" / "run.py"), "study.yaml", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)


def test_study_trains_evaluates_and_reports(pair, tmp_path):
    study_file(tmp_path, pair)
    page = tmp_path / "docs" / "study.md"
    page.parent.mkdir()
    page.write_text("# My study\n\nProse written by hand.\n")
    proc = run_study(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "study"
    for arm in ("kdrl", "grpo"):
        rows = [json.loads(line) for line in (out / arm / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in rows if "eval_accuracy" in r]
        assert [r["step"] for r in evals] == [0, 1, 2] and all(r["eval_kl"] > 0 for r in evals)
        assert (out / arm / "final" / "config.json").is_file()
        assert yaml.safe_load((out / "configs" / f"{arm}.yaml").read_text())["loss"]["objective"] == arm
    results = {name: json.loads((out / "evals" / name / "results.json").read_text())
               for name in ("start", "kdrl", "grpo")}
    assert all(r["status"] == "complete" and r["tasks"]["gsm8k"]["n_problems"] == 3 for r in results.values())
    for arm in ("kdrl", "grpo"):  # paired against the starting student on the same problems
        pooled = results[arm]["comparison"]["paired"]["pooled"]
        assert results[arm]["comparison"]["baseline"] == "start" and pooled["shared_problems"] == 3
        assert results[arm]["model_source"].startswith(f"fine-tuned by kdrl.train ({arm} ")  # the export's card
    board = (out / "evals" / "leaderboard.md").read_text()
    assert all(f"| {name} " in board or name in board for name in ("start", "kdrl", "grpo"))
    text = page.read_text()
    assert text.startswith("# My study\n\nProse written by hand.\n")  # the page's own text is kept
    for needle in ("### Held-out measurement during training", "| kdrl | 0 |", "| grpo | 2 |",
                   "paired delta vs start", "| kdrl | 3 |", "| kdrl - grpo | 3 |", "### Leaderboard rows",
                   "![held-out curves](study.png)"):
        assert needle in text, needle
    assert (tmp_path / "docs" / "study.png").stat().st_size > 10_000 and (out / "report.md").is_file()
    # Everything is done: the same command again trains and evaluates nothing, and rewrites the same section.
    again = run_study(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "arm kdrl: done" in again.stdout and "evaluation grpo: done" in again.stdout
    assert "kdrl.train" not in again.stdout.replace("arm kdrl", "") and page.read_text() == text


def test_bad_study_files_are_one_line_errors(pair, tmp_path):
    path = study_file(tmp_path, pair, arms={"kdrl": {"loss": {"objective": "kdrl", "beta": -1}}})
    with pytest.raises(StudyError, match=r"arms.kdrl: invalid loss section: .*beta"):
        load_study(path)
    with pytest.raises(StudyError, match=r"eval.tasks: .*gsm9k"):
        load_study(study_file(tmp_path, pair, eval={"tasks": "gsm9k"}))
    study_file(tmp_path, pair, eval={"limit": 0})
    proc = run_study(tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == \
        "study/run.py: error: eval.limit must be an integer >= 1, got 0"
    assert not (tmp_path / "study").exists()  # refused before any work


def test_changed_arm_config_is_refused_not_overwritten(pair, tmp_path):
    study_file(tmp_path, pair)
    proc = run_study(tmp_path, "--stage", "train", "--arms", "grpo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = (tmp_path / "study" / "configs" / "grpo.yaml").read_text()
    study_file(tmp_path, pair, arms={"grpo": {"loss": {"objective": "grpo"}, "optim": {"lr": 0.5}}})
    proc = run_study(tmp_path, "--stage", "train")
    assert proc.returncode == 2 and "holds another config for arm 'grpo'" in proc.stderr
    assert (tmp_path / "study" / "configs" / "grpo.yaml").read_text() == saved


def test_interrupted_study_stops_its_child_and_resumes(pair, tmp_path):
    """SIGTERM to the study process alone (as a scheduler sends it): the trainer it runs is stopped, not orphaned,
    and leaves its checkpoints for the same command to continue from."""
    import os
    import signal
    import time
    study_file(tmp_path, pair, arms={"grpo": {"loss": {"objective": "grpo"}, "run": {
        "steps": 400, "eval_at_start": False, "eval_every": 0, "save_every": 2}}})
    proc = subprocess.Popen([sys.executable, str(REPO / "study" / "run.py"), "study.yaml", "--stage", "train"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "study" / "grpo" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count("\n") < 3):
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "run the same command again to continue" in err, err[-2000:]
    assert "kdrl.train: stopped during step" in err  # the trainer stopped on its own terms, not killed
    assert any("-m kdrl.train" in line for line in out.splitlines())
    time.sleep(0.5)
    left = []  # processes still running in the study's directory: the trainer must not outlive the study
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/cwd") == str(tmp_path):
                left.append(pid)
        except OSError:
            continue
    assert not left, left
    done = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
    assert 3 <= done < 400 and (tmp_path / "study" / "grpo" / "checkpoints").is_dir()  # resumable from there
