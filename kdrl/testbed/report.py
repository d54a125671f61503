"""The testbed's table and plot (``docs/testbed.md``, ``docs/testbed.png``)."""
from __future__ import annotations

from pathlib import Path

from kdrl.testbed.task import EVAL_SAMPLES

# ---- the table --------------------------------------------------------------------------------------------------
def summarise(runs: list[dict]) -> dict[str, dict]:
    """method -> mean and standard error (over seeds) of the final accuracy, length and KLs."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        def stat(xs):
            m = sum(xs) / len(xs)
            se = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) ** 0.5 if len(xs) > 1 else 0.0
            return m, se
        out[method] = {"n": len(rs), "final": stat([r["final"] for r in rs]),
                       "sampled": stat([r["final_sampled"] for r in rs]), "clip_frac": stat([r["clip_frac"] for r in rs]),
                       "start": rs[0]["curve"][0]["accuracy"], "start_sampled": rs[0]["curve"][0]["sampled"],
                       "length": stat([r["length"] for r in rs]),
                       **{k: stat([r["kl"][k] for r in rs]) for k in ("k1", "k2", "k3", "exact_kl")},
                       "seconds": sum(r["seconds"] for r in rs) / len(rs),
                       "cpu_seconds": sum(r.get("cpu_seconds", r["seconds"]) for r in rs) / len(rs)}
    return out


LABELS = {"grpo": "GRPO", "kd_k2": "KD (k2)", "kd_exact": "KD (exact RKL)", "kdrl": "KDRL (constant beta)",
          "kdrl_anneal": "KDRL (annealed beta)", "kdrl_mask": "KDRL (KD on incorrect only)",
          "kdrl_shaping": "KDRL shaping", "trrd": "TRRD"}


def markdown_table(summary: dict, info: dict) -> str:
    lines = ["| method | greedy accuracy (mean ± s.e.) | Δ vs start | mean@8, T=1 (mean ± s.e.) | Δ vs start |"
             " response length | exact KL | k1 | k2 | k3 | clip frac | s/run (CPU / wall) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("teacher", "student"):
        label = "teacher (SFT)" if name == "teacher" else "student at start (SFT)"
        lines.append(f"| {label} | {100 * info[name]['accuracy']:.1f} | | {100 * info[name]['sampled']:.1f} | | "
                     f"{info[name]['length']:.2f} | {'0' if name == 'teacher' else ''} | | | | | |")
    for method, s in sorted(summary.items(), key=lambda kv: kv[1]["final"][0]):
        (f, se), (fs, ses) = s["final"], s["sampled"]
        lines.append(f"| {LABELS.get(method, method)} | {100 * f:.1f} ± {100 * se:.1f} | "
                     f"{100 * (f - s['start']):+.1f} | {100 * fs:.1f} ± {100 * ses:.1f} | "
                     f"{100 * (fs - s['start_sampled']):+.1f} | {s['length'][0]:.2f} | {s['exact_kl'][0]:.3f} | "
                     f"{s['k1'][0]:.3f} | {s['k2'][0]:.3f} | {s['k3'][0]:.3f} | {s['clip_frac'][0]:.3f} | "
                     f"{s['cpu_seconds']:.0f} / {s['seconds']:.0f} |")
    return "\n".join(lines)


def ordering(summary: dict, key: str = "final") -> str:
    items = sorted(summary.items(), key=lambda kv: kv[1][key][0])
    return " < ".join(f"{LABELS.get(m, m)} {100 * s[key][0]:.1f}" for m, s in items)


def plot(runs: list[dict], summary: dict, info: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    axes = axes.ravel()
    colors = plt.get_cmap("tab10")
    for i, method in enumerate(summary):
        rs = [r for r in runs if r["method"] == method]
        n = min(len(r["curve"]) for r in rs)
        steps = [rs[0]["curve"][j]["step"] for j in range(n)]
        samples = [rs[0]["curve"][j]["samples"] for j in range(n)]
        acc = [100 * sum(r["curve"][j]["accuracy"] for r in rs) / len(rs) for j in range(n)]
        at_t = [100 * sum(r["curve"][j]["sampled"] for r in rs) / len(rs) for j in range(n)]
        kw = dict(color=colors(i), lw=2, label=LABELS.get(method, method), marker="o", ms=3)
        axes[0].plot(steps, acc, **kw)
        axes[1].plot(samples, acc, **kw)
        axes[2].plot(steps, at_t, **kw)
        tr = [r["train"] for r in rs]
        m = min(len(t) for t in tr)
        kl = [sum(t[j]["exact_kl"] for t in tr) / len(tr) for j in range(m)]
        axes[3].plot(range(1, m + 1), _smooth(kl), color=colors(i), lw=2, label=LABELS.get(method, method))
    for ax in axes[:2]:
        ax.set_ylabel(f"held-out greedy accuracy (%); teacher {100 * info['teacher']['accuracy']:.1f}")
    axes[2].set_ylabel(f"held-out mean@{EVAL_SAMPLES} at T=1 (%); teacher {100 * info['teacher']['sampled']:.1f}")
    for ax, x in zip(axes, ("RL step", "sampled responses", "RL step", "RL step")):
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    axes[3].set_ylabel("exact KL(student || teacher) per token, on rollouts")
    axes[3].set_yscale("log")
    n_seeds = max(s["n"] for s in summary.values())
    axes[0].set_title(f"greedy accuracy vs steps (mean of {n_seeds} seeds)")
    axes[1].set_title("greedy accuracy vs samples")
    axes[2].set_title(f"mean@{EVAL_SAMPLES} at the rollout temperature vs steps")
    axes[3].set_title("exact KL to the teacher (smoothed)")
    axes[0].legend(fontsize=9, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _smooth(xs, k: int = 5):
    return [sum(xs[max(0, i - k + 1):i + 1]) / len(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]
