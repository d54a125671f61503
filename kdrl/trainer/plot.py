"""Plot a run's curves: ``python -m kdrl.trainer.plot runs/smoke`` (or ``runs/smoke/metrics.jsonl -o curves.png``).

Nine panels, each with quantities of one scale on its own y axis: reward and accuracy; response length; where each
step's time went (stacked bars); the KD term as it enters the loss (``beta * kd``); the raw KL estimates to the
teacher (k1, k2, k3, exact); beta alone; the loss and its policy-gradient part; fractions (clipped tokens, truncated
responses, groups without signal); entropy and gradient norm (two axes).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from kdrl.trainer.logging import read_metrics

# (title, y label, [(metric, legend label)]): one panel each, in reading order (3 x 3 with the time panel).
PANELS = [
    ("reward / accuracy", "per response", [("reward_mean", "reward (train)"), ("accuracy", "accuracy (train)"),
                                           ("eval_accuracy", "accuracy (eval, greedy)")]),
    ("response length", "tokens", [("len_mean", "all"), ("len_correct", "correct"), ("len_incorrect", "incorrect")]),
    None,  # seconds per step (stacked bars)
    ("KD term in the loss: beta * kd", "loss units", [("kd_term", "beta * kd")]),
    ("raw KL to the teacher (per token)", "nats", [("kd_raw", "kd (as in the loss, before beta)"),
                                                  ("k1", "k1"), ("k2", "k2"), ("k3", "k3"),
                                                  ("exact_kl", "exact reverse KL"),
                                                  ("eval_kl", "exact reverse KL (eval, greedy)")]),
    ("beta (KD coefficient applied)", "beta", [("beta", "beta")]),
    ("loss", "loss units", [("loss", "total loss"), ("pg_loss", "policy-gradient part")]),
    ("fractions", "fraction", [("clip_frac", "clipped tokens"), ("truncated_frac", "truncated responses"),
                               ("zero_adv_group_frac", "groups with zero advantage")]),
    ("entropy / gradient norm", "entropy (nats)", [("entropy", "entropy")]),
]
TWIN = ("grad_norm", "gradient norm")  # on the right axis of the last panel
TIME_KEYS = ["time_generation", "time_grading", "time_teacher", "time_old_logprobs", "time_student_fwd_bwd",
             "time_optimizer", "time_weight_sync", "time_eval", "time_checkpoint"]
TITLES = [p[0] if p else "seconds per step" for p in PANELS]
# Series of one panel often coincide (reward = accuracy with a 0/1 reward; kd = k2): each later series is drawn
# thinner, dashed and with a smaller marker, so a hidden one still shows through.
STYLES = [dict(linestyle="-", marker="o", markersize=8, linewidth=3.0, alpha=0.6),
          dict(linestyle="--", marker="s", markersize=5, linewidth=1.8),
          dict(linestyle="-.", marker="^", markersize=4, linewidth=1.3),
          dict(linestyle=":", marker="D", markersize=3, linewidth=1.3),
          dict(linestyle="--", marker="v", markersize=3, linewidth=1.0)]


def _with_kd_term(record: dict) -> dict:
    """Logs written before ``kd_term`` / ``kd_raw`` existed: a positive ``kd_loss`` is kd's or kdrl's raw KD term,
    which enters the loss times ``beta``; otherwise (grpo, trrd, kdrl_shaping) nothing can be derived."""
    if "kd_term" in record or not record.get("kd_loss") or record.get("beta") is None:
        return record
    return {**record, "kd_raw": record["kd_loss"], "kd_term": record["beta"] * record["kd_loss"]}


def _points(steps, records, key):
    return [(s, r[key]) for s, r in zip(steps, records) if isinstance(r.get(key), (int, float))]


def plot(records: list[dict], out: str | Path, title: str = "") -> dict[str, list[str]]:
    """Write the nine-panel figure of ``records`` (rows of metrics.jsonl) to ``out`` (PNG).

    Returns what was drawn, read back from the figure: panel title -> the labels of its series (a panel with a
    second y axis lists both axes' series; the time panel lists its bars).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not records:
        raise ValueError("no records to plot")
    records = [_with_kd_term(r) for r in records]
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(3, 3, figsize=(16, 11))
    for ax, panel in zip(axes.flat, PANELS):
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if panel is None:
            _time_panel(ax, steps, records)
            continue
        name, ylabel, keys = panel
        ax.set_title(name)
        ax.set_ylabel(ylabel)
        drawn = 0
        for key, label in keys:
            points = _points(steps, records, key)
            if points:
                ax.plot(*zip(*points), label=label, **STYLES[drawn % len(STYLES)])
                drawn += 1
        if name.startswith("entropy"):
            points = _points(steps, records, TWIN[0])
            if points:
                right = ax.twinx()
                right.plot(*zip(*points), marker="s", markersize=4, color="tab:red", label=TWIN[1])
                right.set_ylabel(TWIN[1], color="tab:red")
                right.tick_params(axis="y", colors="tab:red")
                drawn += 1
                handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
                ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="best")
                continue
        if name.startswith(("reward", "fractions")):
            ax.set_ylim(-0.05, 1.05)
            legend = dict(loc="best")
        else:  # head room above the curves for the legend, in at most three rows
            lo, hi = ax.get_ylim()
            ax.set_ylim(lo, hi + 0.4 * (hi - lo))
            legend = dict(loc="upper center", ncol=2 if drawn > 3 else 1)
        if drawn:
            ax.legend(fontsize=8, **legend)
        else:
            ax.text(0.5, 0.5, "not in this log", ha="center", va="center", transform=ax.transAxes,
                    color="gray")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    drawn = {}
    for ax in axes.flat:
        twins = [a for a in fig.axes if a is not ax and a.bbox.bounds == ax.bbox.bounds]
        drawn[ax.get_title()] = [h.get_label() for a in [ax, *twins]
                                 for h in a.get_lines() + [c for c in a.containers]]
    plt.close(fig)
    return drawn


def _time_panel(ax, steps, records):
    bottom = [0.0] * len(records)
    for key in TIME_KEYS:
        values = [float(r.get(key) or 0.0) for r in records]
        if any(values):
            ax.bar(steps, values, bottom=bottom, label=key.removeprefix("time_"))
            bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_title("seconds per step")
    ax.set_ylabel("s")
    ax.set_ylim(0, 1.6 * max(max(bottom), 1e-9))  # head room for the legend above the bars
    ax.legend(fontsize=7, loc="upper center", ncol=3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kdrl.trainer.plot", description=__doc__.splitlines()[0])
    parser.add_argument("metrics", help="a run directory or the metrics.jsonl written by kdrl.train")
    parser.add_argument("-o", "--output", default=None, help="PNG path (default: curves.png next to the metrics)")
    parser.add_argument("--title", default=None, help="figure title (default: the run directory)")
    args = parser.parse_args(argv)
    path = Path(args.metrics)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.exists():
        parser.error(f"{path} does not exist")
    out = args.output or str(path.with_name("curves.png"))
    plot(read_metrics(path), out, args.title if args.title is not None else str(path.parent))
    print(out)


if __name__ == "__main__":
    main()
