"""Leaderboard over every run in an output directory: Markdown table, static HTML page, PNG accuracy-vs-tokens
scatter with the Pareto front.

    python evals/leaderboard.py [--dir runs/evals]

Rows are runs (a model under one setting); columns the tasks in leaderboard order, the average and the mean
response tokens; cells are accuracy ± standard error in percent. Averages are over the tasks a run has, so
compare rows with the same task set (the "tasks" column says how many). Runs with n > 1 samples also show pass@k
and maj@k (majority vote) at the largest k, and per task at every k below the table. A run still in progress
(results.json with "status": "partial", rewritten after each save) is marked PARTIAL with how far it is.
"""
from __future__ import annotations

import argparse
import html
import json
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals.tasks import TASKS  # noqa: E402

__all__ = ["load_runs", "markdown_table", "html_page", "plot_scatter", "pareto_front", "write_leaderboard"]


def load_runs(out_dir: str | Path) -> list[dict]:
    """Every `<run>/results.json` under out_dir, sorted by average accuracy (best first)."""
    runs = []
    for path in sorted(Path(out_dir).glob("*/results.json")):
        try:
            runs.append(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    return sorted(runs, key=lambda r: -r["average"]["accuracy"])


def _columns(runs: list[dict]) -> list[str]:
    present = {t for r in runs for t in r["tasks"]}
    return [t for t in TASKS if t in present]


def _setting(run: dict) -> str:
    s = run["settings"]["sampling"]
    mode = "greedy" if s["temperature"] == 0 else f"T={s['temperature']:g}, top-p={s['top_p']:g}, n={s['n']}"
    limit = run["settings"].get("limit")
    out = f"{run['backend']}, {mode}, {s['max_new_tokens']} tok" + (f", first {limit}" if limit else "")
    if run.get("status") == "partial":
        p = run.get("progress") or {}
        out += f", PARTIAL {p.get('done_samples', '?')}/{p.get('total_samples', '?')} samples"
    return out


def _at_k(m: dict, key: str, k: str | None = None) -> str:
    """pass@k or maj@k of a metrics dict at k (default: the largest k there is), '-' for one sample."""
    vals = m.get(key) or {}
    if k is None:
        k = max(vals, key=int, default=None)
    if k is None or int(k) < 2 or k not in vals:
        return "-"
    return f"@{k} {100 * vals[k]:.1f}"


def _model_label(run: dict) -> str:
    """Registry names and hub ids as given; a local directory by its last component."""
    model = run["model"]
    return Path(model).name if model.startswith(("/", ".", "~")) else model


def _weights(run: dict) -> str:
    """Short weights label for the table ("4-bit GGUF Q4_K_M -> bf16", "fine-tuned from 4-bit GGUF Q4_K_M -> bf16"
    for a model kdrl.train exported from such a student); the full source is in results.json."""
    src = run.get("model_source", "?")
    if "GGUF" in src and "dequantized to bf16" in src:
        quant = re.search(r"\d+-bit GGUF \w+", src)
        label = (quant.group(0) if quant else "GGUF") + " -> bf16"
        return f"fine-tuned from {label}" if src.startswith("fine-tuned") else label
    return src


def _cell(m: dict | None) -> str:
    if m is None:
        return "-"
    return f"{100 * m['accuracy']:.1f} ± {100 * m['accuracy_stderr']:.1f}"


def _rows(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    cols = _columns(runs)
    header = ["model", "weights", "setting"] + [TASKS[t].label for t in cols] + ["Avg.", "pass@k", "maj@k", "tasks",
                                                                     "mean tokens", "tokens/correct"]
    rows = []
    for r in runs:
        avg = r["average"]
        tpc = avg.get("tokens_per_correct")
        rows.append([_model_label(r), _weights(r), _setting(r)] + [_cell(r["tasks"].get(t)) for t in cols]
                    + [_cell(avg), _at_k(avg, "pass_at_k"), _at_k(avg, "maj_at_k"), str(avg["n_tasks"]),
                       f"{avg['mean_tokens']:.0f}", f"{tpc:.0f}" if tpc else "-"])
    return header, rows


def _comparison_lines(runs: list[dict]) -> list[str]:
    """One line per run made with --baseline: the paired delta on shared problems, flips, differing settings."""
    out = []
    for r in runs:
        c = r.get("comparison")
        if not c:
            continue
        p = (c.get("paired") or {}).get("pooled")
        line = f"{r['run_name']} vs {c['baseline']}: "
        if p:
            line += (f"paired delta {100 * p['accuracy_delta']:+.1f} ± {100 * p['accuracy_delta_stderr']:.1f} points "
                     f"on {p['shared_problems']} shared problems ({p['improved']} improved, {p['regressed']} "
                     f"regressed)")
        else:
            line += f"unpaired delta {100 * c['average']['accuracy_delta']:+.1f} points (problem sets may differ)"
        if c.get("settings_differ"):
            line += "; settings differ: " + ", ".join(f"{k} {v[0]} -> {v[1]}" for k, v in c["settings_differ"].items())
        out.append(line)
    return out


def _sampled_lines(runs: list[dict]) -> list[str]:
    """Markdown rows (run, task, pass@k ..., maj@k ...) for every task of a run with n > 1 samples."""
    out = []
    for r in runs:
        for t, m in r["tasks"].items():
            if m.get("n_samples", 1) < 2:
                continue
            ks = sorted(m["pass_at_k"], key=int)
            pk = ", ".join(f"@{k} {100 * m['pass_at_k'][k]:.1f}" for k in ks)
            mk = ", ".join(f"@{k} {100 * v:.1f}" for k, v in sorted((m.get("maj_at_k") or {}).items(),
                                                                     key=lambda kv: int(kv[0]))) or "-"
            out.append(f"| {r['run_name']} | {TASKS[t].label if t in TASKS else t} | {m['n_samples']} | "
                       f"{_cell(m)} | {pk} | {mk} |")
    return out


def markdown_table(runs: list[dict]) -> str:
    header, rows = _rows(runs)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    note = ("\nAccuracy in % (± standard error over problems). Greedy runs report accuracy; sampled runs the mean "
            "over n samples. Mean tokens: response tokens averaged over the tasks. Weights: registry models are 4-bit "
            "GGUF files dequantized to bf16 (models fine-tuned from them keep the label), so their scores are not "
            "comparable with published full-precision numbers.\n")
    note += ("pass@k: unbiased estimate that one of k samples is right; maj@k: the most common answer among the first "
             "k samples is right (both at the largest k; '-' for one sample per problem).\n")
    if any(r.get("status") == "partial" for r in runs):
        note += ("PARTIAL: the run is still going (or was interrupted); its scores cover the problems finished so "
                 "far and change as it goes on.\n")
    sampled = _sampled_lines(runs)
    if sampled:
        note += ("\n## pass@k and maj@k per task\n\n| run | task | n | mean accuracy | pass@k | maj@k |\n"
                 "|---|---|---:|---:|---|---|\n" + "".join(f"{line}\n" for line in sampled))
    cmp_ = _comparison_lines(runs)
    if cmp_:
        note += "\n## Baseline comparisons\n\n" + "".join(f"- {c}\n" for c in cmp_)
    return "\n".join(lines) + "\n" + note


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points (tokens, accuracy) not dominated by another (fewer-or-equal tokens and higher-or-equal
    accuracy, strictly better in one), ordered by tokens."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def plot_scatter(runs: list[dict], path: str | Path) -> Path:
    """Average accuracy against mean response tokens, one point per run, Pareto front as a step line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(r["average"]["mean_tokens"], 100 * r["average"]["accuracy"]) for r in runs]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    right = max(x for x, _ in points)
    for r, (x, y) in zip(runs, points):
        ax.errorbar(x, y, yerr=100 * r["average"]["accuracy_stderr"], fmt="o", capsize=3)
        # Labels of points in the right half go to their left; kept out of tight_layout, which would otherwise
        # shrink the axes to make room for long labels.
        left_side = x > right / 2
        ax.annotate(f"{_model_label(r)} ({_setting(r)})", (x, y), textcoords="offset points", fontsize=7,
                    xytext=(-6 if left_side else 6, 5), ha="right" if left_side else "left").set_in_layout(False)
    front = pareto_front(points)
    if len(front) > 1:
        ax.step([points[i][0] for i in front], [points[i][1] for i in front], where="post", color="gray",
                linestyle="--", label="Pareto front")
        ax.legend(loc="upper left", fontsize=8)  # points cluster at the right, labels to their left
    ax.margins(x=0.1)  # the y limits are set below
    ax.set_xlim(left=0)  # from 0: a zoomed axis makes a 14-token difference look large
    # Likewise for accuracy (one run alone was drawn on a 5.8-7.0% axis), with room above the highest error bar.
    top = max(y + 100 * r["average"]["accuracy_stderr"] for r, (_, y) in zip(runs, points))
    ax.set_ylim(0, max(1.0, 1.15 * top))
    ax.set_xlabel("mean response tokens (average over tasks)")
    ax.set_ylabel("average accuracy (%)")
    ax.set_title("Accuracy vs response length")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def html_page(runs: list[dict], png_name: str | None = "leaderboard.png") -> str:
    header, rows = _rows(runs)
    esc = html.escape
    table = ["<div class='wide'><table class='board'>", "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    for run, row in zip(runs, rows):
        cells = [f"<td title='{esc(run.get('model_source', '?'))}'>{esc(c)}</td>" if i == 1 else f"<td>{esc(c)}</td>"
                 for i, c in enumerate(row)]
        table.append("<tr>" + "".join(cells) + "</tr>")
    table.append("</table></div>")
    details = ["<div class='wide'><table>", "<tr><th>run</th><th>task</th><th>accuracy</th><th>pass@k</th><th>maj@k</th><th>mean tokens "
               "(correct / incorrect)</th><th>truncated</th><th>boxed</th><th>tokens/correct</th><th>tok/s</th></tr>"]
    for r in runs:
        for t, m in r["tasks"].items():
            pk = ", ".join(f"@{k}: {100 * v:.1f}" for k, v in m["pass_at_k"].items())
            mk = ", ".join(f"@{k}: {100 * v:.1f}" for k, v in (m.get("maj_at_k") or {}).items()) or "-"
            tc, ti = m["mean_tokens_correct"], m["mean_tokens_incorrect"]
            tps = m.get("generation", {}).get("tokens_per_second")
            tpc = m["tokens_per_correct"]
            details.append("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in (
                r["run_name"], t, _cell(m), pk, mk, f"{m['mean_tokens']:.0f} ({tc or 0:.0f} / {ti or 0:.0f})",
                f"{100 * m['truncation_rate']:.0f}%", f"{100 * m['boxed_rate']:.0f}%",
                f"{tpc:.0f}" if tpc else "-", tps if tps else "-")) + "</tr>")
    details.append("</table></div>")
    cmp_ = "".join(f"<li>{esc(c)}</li>" for c in _comparison_lines(runs))
    if cmp_:
        details.append(f"<h2>Baseline comparisons</h2><ul>{cmp_}</ul>")
    img = f'<p><img src="{esc(png_name)}" alt="accuracy vs mean tokens"></p>' if png_name else ""
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "div.wide{overflow-x:auto}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}"
             "table.board td:nth-child(-n+3),table.board th:nth-child(-n+3),td:first-child,th:first-child{text-align:left}"
             "table{font-size:13px}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>kdrl math leaderboard</title>"
            f"<style>{style}</style></head><body><h1>Math leaderboard</h1>"
            f"<p>Accuracy in % ± standard error over problems. Settings per row; averages over the tasks of each run. "
            f"Weights column: registry models are 4-bit GGUF files dequantized to bf16 (hover for the source); "
            f"their scores are not comparable with published full-precision numbers. pass@k: unbiased estimate that one of k samples is "
            f"right; maj@k: the most common answer among the first k samples is right. PARTIAL: a run still going; "
            f"its scores cover the problems finished so far."
            f"</p>{''.join(table)}{img}<h2>Per task</h2>{''.join(details)}</body></html>\n")


def write_leaderboard(out_dir: str | Path) -> list[Path]:
    """Write leaderboard.md, leaderboard.html and leaderboard.png in out_dir from all its runs."""
    out_dir = Path(out_dir)
    runs = load_runs(out_dir)
    if not runs:
        raise ValueError(f"write_leaderboard: no */results.json in {out_dir}")
    md = out_dir / "leaderboard.md"
    md.write_text("# Math leaderboard\n\n" + markdown_table(runs))
    png = plot_scatter(runs, out_dir / "leaderboard.png")
    page = out_dir / "leaderboard.html"
    page.write_text(html_page(runs, png.name))
    return [md, page, png]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Rebuild the leaderboard from the runs in a directory")
    parser.add_argument("--dir", default=str(Path(__file__).resolve().parents[1] / "runs" / "evals"))
    for p in write_leaderboard(parser.parse_args().dir):
        print(p)
