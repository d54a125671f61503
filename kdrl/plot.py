"""Plot a run's curves: ``python -m kdrl.plot runs/kdrl/metrics.jsonl -o curves.png``.

Six panels: reward and accuracy; response length (all / correct / incorrect); KL to the teacher (k2, exact);
loss terms; clip fraction, entropy and beta; and where each step's time went (stacked bars).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from kdrl.logging import read_metrics

PANELS = [
    ("reward", ["reward_mean", "accuracy", "eval_accuracy"]),
    ("response tokens", ["len_mean", "len_correct", "len_incorrect"]),
    ("KL to teacher", ["k2", "exact_kl"]),
    ("loss", ["loss", "pg_loss", "kd_loss"]),
    ("clip / entropy / beta", ["clip_frac", "entropy", "beta"]),
]
TIME_KEYS = ["time_generation", "time_grading", "time_teacher", "time_old_logprobs", "time_student_fwd_bwd",
             "time_optimizer", "time_weight_sync", "time_eval", "time_checkpoint"]


def plot(records: list[dict], out: str | Path, title: str = "") -> None:
    """Write the six-panel figure of ``records`` (rows of metrics.jsonl) to ``out`` (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    if not records:
        raise ValueError("no records to plot")
    steps = [r["step"] for r in records]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (name, keys) in zip(axes.flat, PANELS):
        for key in keys:
            points = [(s, r[key]) for s, r in zip(steps, records) if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), marker="o", label=key)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    ax = axes.flat[-1]
    bottom = [0.0] * len(records)
    for key in TIME_KEYS:
        values = [float(r.get(key) or 0.0) for r in records]
        if any(values):
            ax.bar(steps, values, bottom=bottom, label=key.removeprefix("time_"))
            bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_title("seconds per step")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kdrl.plot", description=__doc__.splitlines()[0])
    parser.add_argument("metrics", help="a metrics.jsonl written by kdrl.train")
    parser.add_argument("-o", "--output", default=None, help="PNG path (default: next to the metrics file)")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    out = args.output or str(Path(args.metrics).with_name("curves.png"))
    plot(read_metrics(args.metrics), out, args.title)
    print(out)


if __name__ == "__main__":
    main()
