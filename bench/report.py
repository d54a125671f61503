"""Human-readable output: the results table, the target checks and the PNG plots."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

TARGET_VOCAB, TARGET_MIN_TOKENS = 151936, 2048
OURS = ("ours-kdrlloss", "ours-chunked")


def _fmt(x, spec, missing="-"):
    return missing if x is None else format(x, spec)


def table(records) -> str:
    """One block per case, one line per provider; speed columns blank for non-speed (interpreter) rows."""
    by_case = defaultdict(list)
    for r in records:
        by_case[(r["workload"], r["model"], r["vocab"], r["n_tokens"], r["dtype"], r["device"])].append(r)
    head = (f"{'provider':<20} {'median ms':>10} {'p20-p80 ms':>17} {'tok/s':>9} {'GFLOP/s':>8} "
            f"{'peak MB':>9} {'-grads MB':>9} {'time/naive':>10} {'mem/naive':>9} {'loss':>10}")
    lines = []
    for (wl, model, vocab, n, dtype, dev), rows in by_case.items():
        r0 = rows[0]
        lines.append(f"\n== {wl} | {model} (d={r0['d']}, d_t={r0['d_t']}) | V={vocab} | N={n} | {dtype} | {dev} "
                     f"| {r0.get('threads')} threads")
        lines.append(head)
        for r in rows:
            speed = r.get("speed_ok", True)
            ms = lambda k: _fmt(r.get(k) and r[k] * 1e3, ".1f")  # noqa: E731
            spread = f"{ms('time_p20_s')}-{ms('time_p80_s')}" if r.get("time_p20_s") else "-"
            lines.append(
                f"{r['provider']:<20} {ms('time_median_s') if speed else 'n/a':>10} {spread if speed else '':>17} "
                f"{_fmt(r.get('tokens_per_s') if speed else None, '.0f'):>9} "
                f"{_fmt(r.get('gflops_useful') if speed else None, '.1f'):>8} "
                f"{_fmt(r.get('extra_peak_mb'), '.0f'):>9} {_fmt(r.get('extra_peak_excl_grads_mb'), '.0f'):>9} "
                f"{_fmt(r.get('time_vs_naive') if speed else None, '.2f'):>10} "
                f"{_fmt(r.get('mem_vs_naive'), '.3f'):>9} {_fmt(r.get('loss'), '.5g'):>10}")
    return "\n".join(lines)


def not_run_text(records) -> str:
    """Providers that did not run (or failed) with their reasons, one line per distinct reason."""
    seen = defaultdict(int)
    for r in records:
        if r.get("note"):
            seen[(r["provider"], r["note"])] += 1
    if not seen:
        return ""
    lines = ["\nNot run / notes:"]
    lines += [f"  {prov}: {note} ({n} case{'s' if n > 1 else ''})" for (prov, note), n in sorted(seen.items())]
    return "\n".join(lines)


def check_targets(records):
    """The README's CPU targets on the KDRL step at N >= 2048, V = 151,936, for each of our providers.

    Met when: time <= naive's, extra peak memory (including gradients) <= naive's / 8, time < Liger GRPO's.
    Returns a list of dicts (one per case and provider of ours), empty when no such case ran.
    """
    out = []
    cases = defaultdict(dict)
    for r in records:
        if (r["workload"] == "kdrl" and r["vocab"] == TARGET_VOCAB and r["n_tokens"] >= TARGET_MIN_TOKENS
                and r["device"] == "cpu" and r.get("time_median_s")):
            cases[(r["model"], r["n_tokens"], r["dtype"])][r["provider"]] = r
    for (model, n, dtype), provs in sorted(cases.items()):
        naive, liger = provs.get("naive"), provs.get("liger-grpo")
        for name in OURS:
            ours = provs.get(name)
            if ours is None or naive is None:
                continue
            t_ratio = ours["time_median_s"] / naive["time_median_s"]
            m_ratio = ours.get("mem_vs_naive")
            l_ratio = ours["time_median_s"] / liger["time_median_s"] if liger else None
            checks = {"time_le_naive": t_ratio <= 1.0,
                      "mem_le_naive_over_8": None if m_ratio is None else m_ratio <= 1 / 8,
                      "faster_than_liger": None if l_ratio is None else l_ratio < 1.0}
            out.append({"model": model, "n_tokens": n, "dtype": dtype, "provider": name,
                        "time_vs_naive": t_ratio, "mem_vs_naive": m_ratio, "time_vs_liger": l_ratio,
                        "checks": checks, "met": all(v is True for v in checks.values())})
    return out


def targets_text(targets) -> str:
    if not targets:
        return "\nTargets: no KDRL case at N >= 2048, V = 151,936 on CPU in this run."
    lines = ["\nTargets (KDRL step, N >= 2048, V = 151,936; time <= naive, mem <= naive/8, faster than Liger):"]
    for t in targets:
        lv = "n/a" if t["time_vs_liger"] is None else f"{t['time_vs_liger']:.2f}x"
        mv = "n/a" if t["mem_vs_naive"] is None else f"{t['mem_vs_naive']:.3f}x"
        lines.append(f"  {t['provider']:<14} N={t['n_tokens']} {t['dtype']:<8}: time {t['time_vs_naive']:.2f}x naive,"
                     f" memory {mv} naive, time {lv} Liger -> {'MET' if t['met'] else 'MISSED'}")
    return "\n".join(lines)


def plots(records, out_dir) -> list:
    """Per (workload, dtype): time and extra memory against token count and against vocabulary size, one line per
    provider. Returns the PNG paths written (none when matplotlib is missing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out = Path(out_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    groups = defaultdict(list)
    for r in records:
        if r.get("speed_ok", True) and r.get("time_median_s"):
            groups[(r["workload"], r["dtype"], r["device"])].append(r)
    paths = []
    for (wl, dtype, dev), rows in sorted(groups.items()):
        fig, axes = plt.subplots(2, 2, figsize=(11, 8))
        for col, (axis_key, label) in enumerate((("n_tokens", "tokens N"), ("vocab", "vocabulary V"))):
            other = "vocab" if axis_key == "n_tokens" else "n_tokens"
            # Hold the other axis at its most common value so each line is a clean 1-D sweep.
            counts = defaultdict(int)
            for r in rows:
                counts[(r["model"], r[other])] += 1
            model, fixed = max(counts, key=counts.get)
            for metric, row_i, ylab in (("time_median_s", 0, "median fwd+bwd time (s)"),
                                        ("extra_peak_mb", 1, "extra peak memory (MB)")):
                ax = axes[row_i][col]
                for prov in sorted({r["provider"] for r in rows}):
                    pts = sorted((r[axis_key], r[metric]) for r in rows
                                 if r["provider"] == prov and r["model"] == model and r[other] == fixed
                                 and r.get(metric) is not None)
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
                if len({r[axis_key] for r in rows if r["model"] == model and r[other] == fixed}) > 1:
                    ax.set_xscale("log", base=2)     # sweeps double N or V
                ax.set_xlabel(label)
                ax.set_ylabel(ylab)
                ax.set_title(f"{model}, {other}={fixed}", fontsize=9)
                ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"{wl} | {dtype} | {dev} | {rows[0].get('threads')} threads | {rows[0].get('run_id')}")
        fig.tight_layout()
        path = out / f"{wl}_{dtype}_{dev}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(str(path))
    return paths
