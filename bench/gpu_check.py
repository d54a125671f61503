"""One-command GPU proof: accuracy of every Triton kernel against float64, then the KDRL step's speed and memory.

    bash bench/gpu_check.sh --device-run          # on the GPU machine: report under $OUT/gpu_check (< 8 minutes)
    bash bench/gpu_check.sh                       # the same, report under bench/results/gpu_check/
    bash bench/gpu_check.sh --device-run --smoke  # dry run: tiny shapes on CPU under TRITON_INTERPRET=1

Needs only Python, torch and (for the Triton rows) triton: the project is imported from this checkout, nothing is
installed. The parts of ``bench/gpu_check_parts.py`` run one after another, each in its own process under a time
cap (``CAPS``; ``BUDGET_S`` in all), most important first: accuracy, then the KDRL step against naive PyTorch and
the PyTorch backend, then Liger (only if importable) and the tile configurations. A part that fails or runs out of
time is recorded as such and the next one starts; each keeps the rows it finished. Writes ``gpu_check.json``,
``gpu_check.md`` and ``parts/<part>.{jsonl,log}`` under the report folder, and prints a compact summary last
(its last line is one JSON object). Exit status: 0 when every part finished and every accuracy row passed.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.gpu_check_parts import PARTS, TEMPERATURE  # noqa: E402  (its module level is stdlib only)

# Seconds per part, not yet checked on a GPU (the first Triton compiles, about 28 kernels, should dominate the
# accuracy part). The total stays under 8 minutes so that a 15-minute machine loan leaves room for a rerun.
CAPS = {"accuracy": 210, "speed": 150, "liger": 75, "tiles": 25}
BUDGET_S = 465


def run_part(name, cmd, cap_s, log_path, env=None):
    """Run one part's command in its own process group; kill the whole group at ``cap_s``.

    Returns ``{"part", "status" (ok | failed | timed out), "rc", "seconds", "log_tail"}``."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                start_new_session=True)  # torch.compile workers die with their parent part
        try:
            rc = proc.wait(timeout=max(cap_s, 1))
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, status = proc.wait(), "timed out"
    tail = Path(log_path).read_text(errors="replace")[-1500:]
    return dict(part=name, status=status, rc=rc, seconds=round(time.perf_counter() - start, 1), cap_s=cap_s,
                log_tail=tail)


def read_rows(path):
    """The JSON lines a part managed to write (a part killed mid-line leaves a partial last line: dropped)."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def collect(out: Path, smoke: bool, budget_s: float = BUDGET_S, parts=PARTS, python=sys.executable,
            after_part=None):
    """Run ``parts`` in order, each under its cap and all under ``budget_s``; return the report document.

    ``after_part(doc)`` is called after each part (the report so far), so that a run stopped from outside still
    leaves the figures of the parts it finished."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.pop("TRITON_INTERPRET", None)  # a GPU run must compile its kernels, whatever the caller's shell had set
    if smoke:
        env["TRITON_INTERPRET"] = "1"
    (out / "parts").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    doc = dict(smoke=smoke, parts=[], meta={}, accuracy=[], speed=[], tiles=[], compiled=[])
    for name in parts:
        cap = min(CAPS[name], budget_s - (time.perf_counter() - start))
        if cap < 5:
            doc["parts"].append(dict(part=name, status="not run", rc=None, seconds=0.0, cap_s=cap,
                                     log_tail="the overall time budget was spent"))
            continue
        (out / "parts" / f"{name}.jsonl").unlink(missing_ok=True)  # no rows of an earlier run in the same folder
        cmd = [python, "-m", "bench.gpu_check_parts", name, "--out", str(out), "--cap-s", str(cap)]
        result = run_part(name, cmd + (["--smoke"] if smoke else []), cap, out / "parts" / f"{name}.log", env)
        rows = read_rows(out / "parts" / f"{name}.jsonl")
        result["finished"] = any(r.get("kind") == "done" for r in rows)
        doc["parts"].append(result)
        print(f"gpu check: {name} {result['status']} in {result['seconds']:.0f} s (cap {cap:.0f} s)",
              file=sys.stderr, flush=True)
        for r in rows:
            kind = r.pop("kind", None)
            if kind == "meta" and not doc["meta"]:
                doc["meta"] = r
            elif kind in ("accuracy", "speed", "tiles", "compiled"):
                doc[kind].append(r)
        _finish(doc, start)
        if after_part:
            after_part(doc)
    _finish(doc, start)
    return doc


def _finish(doc, start):
    doc["elapsed_s"] = round(time.perf_counter() - start, 1)
    measured = [r for r in doc["accuracy"] if "pass" in r]
    doc["accuracy_pass"] = bool(measured) and all(r["pass"] for r in measured) and \
        not [r for r in doc["accuracy"] if "error" in r or "skipped" in r]


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def speed_ratios(rows):
    """Per token count: naive and single-pass time / Triton time, and their extra peak memory / Triton's."""
    by_n = {}
    for r in rows:
        if "median_s" in r:
            by_n.setdefault(r["n_tokens"], {})[r["provider"]] = r
    out = {}
    for n, p in sorted(by_n.items()):
        tri = p.get("kdrlloss-triton")
        if tri is None:
            continue
        for other in ("naive", "kdrlloss-single-pass", "liger-grpo"):
            if other in p:
                mem = (p[other].get("extra_peak_mb"), tri.get("extra_peak_mb"))
                out[f"{n}/{other}"] = dict(speedup=p[other]["median_s"] / tri["median_s"],
                                           memory_ratio=mem[0] / mem[1] if None not in mem and mem[1] else None)
    return out


def markdown(doc):
    m, shape = doc["meta"], doc["meta"].get("shape", {})
    lines = [f"# GPU check ({'smoke, interpreter: not speeds' if doc['smoke'] else 'full'})", "",
             f"{m.get('device_name', '?')} | python {m.get('python', '?')} | torch {m.get('torch', '?')} | "
             f"triton {m.get('triton', '?')} | liger {m.get('liger', '?')} | {m.get('date', '?')} | "
             f"{doc['elapsed_s']:.0f} s | d={shape.get('d')} d_t={shape.get('d_t')} V={shape.get('vocab')} "
             f"temperature {TEMPERATURE}", "", "| part | status | seconds | cap s |", "|---|---|---:|---:|"]
    lines += [f"| {p['part']} | {p['status']}{'' if p.get('finished', True) else ' (unfinished)'} | "
              f"{p['seconds']:.0f} | {p['cap_s']:.0f} |" for p in doc["parts"]]
    lines += ["", f"## Accuracy: {'all pass' if doc['accuracy_pass'] else 'FAILURES or gaps'}", "",
              "max |x - float64|; pass: |ours - gt| <= |torch in the input dtype - gt| + tol elementwise", "",
              "| op | dtype | N | backend | quantity | ours | torch bf16 | torch fp32 | pass |",
              "|---|---|---:|---|---|---:|---:|---:|---|"]
    for r in doc["accuracy"]:
        head = f"| {r['op']} | {r['dtype']} | {r['n']} | {r['backend']} |"
        if "pass" in r:
            lines.append(f"{head} {r['quantity']} | {r['ours']:.2e} | {r['torch_bf16']:.2e} | "
                         f"{r['torch_fp32']:.2e} | {'yes' if r['pass'] else 'NO'} |")
        else:
            lines.append(f"{head} | {r.get('error') or r.get('skipped')} | | | |")
    lines += ["", "## KDRL step (bf16): time and memory" + (" (smoke: proves the path runs, not a speed)"
                                                            if doc["smoke"] else ""), "",
              "| N | provider | median ms | TFLOP/s useful | TFLOP/s executed | extra peak MB |",
              "|---:|---|---:|---:|---:|---:|"]
    for r in doc["speed"]:
        if "median_s" not in r:
            lines.append(f"| {r.get('n_tokens', '-')} | {r['provider']} | {r.get('error') or r.get('skipped')} "
                         "| | | |")
            continue
        lines.append(f"| {r['n_tokens']} | {r['provider']} | {1e3 * r['median_s']:.2f} | {r['tflops_useful']:.1f} | "
                     f"{r['tflops_executed']:.1f} | {_fmt(r.get('extra_peak_mb'), '.0f')} |")
    ratios = speed_ratios(doc["speed"])
    if ratios:
        lines += ["", "| N / against | Triton speed-up | memory: other / Triton |", "|---|---:|---:|"]
        lines += [f"| {k} | {v['speedup']:.2f}x | {_fmt(v['memory_ratio'], '.2f')} |" for k, v in ratios.items()]
    lines += ["", "## Tile configurations", "", "| kernel | dtype | BLOCK_N | BLOCK_V | BLOCK_D | warps | stages |",
              "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {c['kernel']} | {c['dtype']} | {c['BLOCK_N']} | {c['BLOCK_V']} | {c['BLOCK_D']} | "
              f"{c['num_warps']} | {c['num_stages']} |" for c in doc["tiles"] if "kernel" in c]
    if doc["compiled"]:
        lines += ["", "## Kernels as compiled on this machine (registers and spills from the loaded binaries)", "",
                  "| kernel | input | constexprs | warps/stages | regs | spill B | smem B |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for c in doc["compiled"]:
            if "error" in c:
                lines.append(f"| {c['kernel']} | failed: {c['error']} | | | | | |")
                continue
            consts = ", ".join(f"{k}={c[k]}" for k in c if k.isupper())
            lines.append(f"| {c['kernel']} | {c['input']} | {consts} | {c['num_warps']}/{c['num_stages']} | "
                         f"{c['registers']} | {c['spill_bytes']} | {c['shared_bytes']} |")
    bad = [p for p in doc["parts"] if p["status"] != "ok"]
    for p in bad:
        lines += ["", f"## Log tail of part {p['part']} ({p['status']})", "", "```", p["log_tail"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def summary(doc, out):
    """A few lines for a terminal or a log tail; the last line is one JSON object."""
    m = doc["meta"]
    acc = [r for r in doc["accuracy"] if "pass" in r]
    gaps = [r for r in doc["accuracy"] if "pass" not in r]
    lines = [f"== GPU check summary ({'smoke' if doc['smoke'] else 'full'}) ==",
             f"machine: {m.get('device_name', '?')} | python {m.get('python', '?')} | torch {m.get('torch', '?')} | "
             f"triton {m.get('triton', '?')} | liger {m.get('liger', '?')}",
             "parts: " + " | ".join(f"{p['part']} {p['status']} {p['seconds']:.0f}/{p['cap_s']:.0f} s"
                                    for p in doc["parts"]) + f" | total {doc['elapsed_s']:.0f} s"]
    for dtype in ("bf16", "fp32"):
        rows = [r for r in acc if r["dtype"] == dtype]
        if rows:
            worst = max(rows, key=lambda r: r["excess"])
            lines.append(f"accuracy {dtype}: {sum(r['pass'] for r in rows)}/{len(rows)} pass; closest to the limit: "
                         f"{worst['op']} {worst['backend']} {worst['quantity']} ours {worst['ours']:.1e} vs torch "
                         f"{worst['torch_' + dtype]:.1e}")
    if gaps:
        lines.append(f"accuracy gaps: {len(gaps)} (errors or skipped groups; see the report)")
    for n in sorted({r["n_tokens"] for r in doc["speed"] if "n_tokens" in r}):
        cells = []
        for r in (r for r in doc["speed"] if r.get("n_tokens") == n):
            if "median_s" in r:
                cells.append(f"{r['provider']} {1e3 * r['median_s']:.1f} ms"
                             + (f" {r['extra_peak_mb'] / 1024:.2f} GiB" if r.get("extra_peak_mb") is not None else ""))
            else:
                cells.append(f"{r['provider']} {'failed' if 'error' in r else 'skipped'}")
        lines.append(f"KDRL step N={n}: " + " | ".join(cells))
    ratios = speed_ratios(doc["speed"])
    if ratios:
        lines.append(("smoke, not a speed: " if doc["smoke"] else "") + "Triton speed-up: "
                     + ", ".join(f"{k} {v['speedup']:.2f}x" for k, v in ratios.items()))
    comp = [c for c in doc["compiled"] if "error" not in c]
    if doc["compiled"]:
        lines.append(f"kernels compiled here: {len(comp)}, spilling: {sum(c['spill_bytes'] > 0 for c in comp)}, "
                     f"max registers {max((c['registers'] for c in comp), default='-')}, "
                     f"unreadable: {len(doc['compiled']) - len(comp)}")
    lines.append(f"report: {out / 'gpu_check.md'} (and gpu_check.json, parts/*.log)")
    lines.append(json.dumps(dict(smoke=doc["smoke"], accuracy_pass=doc["accuracy_pass"],
                                 accuracy=f"{sum(r['pass'] for r in acc)}/{len(acc)}", gaps=len(gaps),
                                 parts={p["part"]: p["status"] for p in doc["parts"]},
                                 speedup={k: round(v["speedup"], 3) for k, v in ratios.items()},
                                 elapsed_s=doc["elapsed_s"])))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--device-run", action="store_true",
                    help="report under $OUT/gpu_check (the folder the GPU machine hands back), else as --out")
    ap.add_argument("--out", default=None, help="report folder (default: bench/results/gpu_check)")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S, help="time budget of all parts together")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="parts to run (default: all)")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else REPO / "bench" / "results" / "gpu_check"
    if args.device_run and os.environ.get("OUT") and not args.out:
        out = Path(os.environ["OUT"]) / "gpu_check"
    if not args.smoke:
        import torch  # only to refuse early: the parts import it again in their own processes
        if not torch.cuda.is_available():
            ap.error("no CUDA device: this check needs an NVIDIA GPU and a CUDA torch (or --smoke for the CPU run)")
    print(f"gpu check: {'smoke' if args.smoke else 'full'}, report under {out}", file=sys.stderr, flush=True)
    def write(doc):
        (out / "gpu_check.json").write_text(json.dumps(doc, indent=1))
        (out / "gpu_check.md").write_text(markdown(doc))
    doc = collect(out, args.smoke, args.budget_s, args.parts, after_part=write)
    write(doc)
    print(summary(doc, out))
    ok = doc["accuracy_pass"] and all(p["status"] == "ok" for p in doc["parts"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
