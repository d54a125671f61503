#!/usr/bin/env python3
"""Benchmark the fused KD + RL losses against naive PyTorch, Liger-Kernel and torch's linear_cross_entropy.

    python bench/run.py              # default preset: about 7 minutes on a quiet 2-core CPU (419 s measured)
    python bench/run.py --quick      # under 1 minute
    python bench/run.py --full       # every workload, model pair, dtype, token count and a vocabulary sweep
    python bench/run.py --device cuda

Prints a table per case, the target checks and the static GPU report; the LAST stdout line is one JSON document.
Appends every record to <out>/results.jsonl and <out>/results.csv and draws <out>/plots/*.png.
Progress goes to stderr. A long run interrupted part-way resumes with ``--resume RUN_ID`` (cases already recorded
under that run id are not run again). Every argument, the output folder and the run id are checked before the
first case (a bad one: one line naming it, exit 2). See bench/README.md for the FLOP model and what memory counts.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:          # `python bench/run.py` puts bench/ on the path, not the repository
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench import gpu_report, isolated, memory, naive, providers, report, results, timing, workloads  # noqa: E402

SUMMARY_KEYS = ("workload", "model", "vocab", "n_tokens", "dtype", "device", "provider", "speed_ok", "flop_model",
                "time_median_s", "time_p20_s", "time_p80_s", "tokens_per_s", "gflops_useful", "gflops_executed",
                "extra_peak_mb", "extra_peak_excl_grads_mb", "time_vs_naive", "mem_vs_naive", "loss", "loss_err",
                "note")


class UsageError(ValueError):
    """A bad argument, found before the first case."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (``run.py: error: ...``) and exit 2, not a usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (--help for usage)\n")


def _check_out(out) -> None:
    """``out`` is a directory we can write into or create (nearest existing ancestor writable); creates nothing."""
    p = Path(out).expanduser().absolute()
    probe = p
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"--out {out}: " + ("is a file" if probe == p else f"cannot be created: {probe} is a file")
                         + "; expected a directory")
    try:  # a real write, not os.access: that says yes to root everywhere, /proc included
        tempfile.TemporaryFile(dir=probe).close()
    except OSError as err:
        raise UsageError(f"--out {out}: cannot write in {probe} ({err.strerror})") from None
    for name in ("results.jsonl", "results.csv"):
        f = p / name
        if f.exists() and (not f.is_file() or not os.access(f, os.W_OK)):
            raise UsageError(f"--out {out}: {f} is not a writable file")


def _check_resume(out, run_id) -> None:
    """``run_id`` has records in ``out/results.jsonl``; else the error names the run ids that are there."""
    try:
        ids = list(dict.fromkeys(r.get("run_id") for r in results.load(out)))
    except (OSError, ValueError) as err:
        raise UsageError(f"--resume {run_id}: cannot read {Path(out) / 'results.jsonl'}: {err}") from None
    if run_id not in ids:
        there = ", ".join(map(str, ids[-5:])) + (f" (and {len(ids) - 5} older)" if len(ids) > 5 else "")
        raise UsageError(f"--resume {run_id}: no such run in {Path(out) / 'results.jsonl'}; "
                         + (f"runs there: {there}" if ids else "it holds no runs"))


def _check(args, ap) -> None:
    """Every argument checked before any work: one line naming the option and what it expects, exit 2."""
    for opt, vals, low in (("--tokens", args.tokens, 1), ("--warmup", [args.warmup], 0),
                           ("--repeats", [args.repeats], 1), ("--threads", [args.threads], 1)):
        for v in vals or []:
            if v is not None and v < low:
                ap.error(f"{opt} {v}: expected an integer >= {low}")
    if args.interpret and not args.smoke:
        ap.error("--interpret runs Triton kernels in the interpreter and is only allowed with --smoke")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch.cuda.is_available() is False")
    try:
        providers.select(args.providers, liger_compiled=not args.liger_eager)
        _check_out(args.out)
        if args.resume is not None:
            _check_resume(args.out, args.resume)
        plan(args)
    except (UsageError, ValueError) as err:
        ap.error(str(err))


def parse_args(argv=None):
    ap = _Parser(prog="bench/run.py", description=__doc__.split("\n\n")[0],
                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="one small KDRL case (< 1 min)")
    size.add_argument("--full", action="store_true", help="all workloads, shapes, dtypes and sweeps")
    size.add_argument("--smoke", action="store_true", help="tiny shapes, seconds (tests, CI)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--workloads", nargs="+", choices=workloads.WORKLOADS, help="keep only these workloads")
    ap.add_argument("--providers", nargs="+", help="keep only these providers (e.g. naive ours-kdrlloss)")
    ap.add_argument("--models", nargs="+", choices=sorted(workloads.MODELS), help="keep only these model pairs")
    ap.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], help="replace the preset's dtypes")
    ap.add_argument("--tokens", nargs="+", type=int, help="replace the preset's token counts")
    ap.add_argument("--warmup", type=int, help="untimed rounds (default: the preset's)")
    ap.add_argument("--repeats", type=int, help="timed rounds (default: the preset's)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's, all cores)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--gpu-report", choices=["auto", "yes", "no"], default="auto",
                    help="static sm_80/sm_90 report (auto: not for --quick/--smoke)")
    ap.add_argument("--liger-eager", action="store_true", help="run Liger without torch.compile")
    ap.add_argument("--in-process", action="store_true",
                    help="CPU: time every provider in this process (default: a worker process per provider)")
    ap.add_argument("--interpret", action="store_true",
                    help="with --smoke: also run our Triton kernels under TRITON_INTERPRET=1 (labelled, not timed)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"), help="results directory")
    ap.add_argument("--resume", metavar="RUN_ID", help="continue an interrupted run with this run id")
    args = ap.parse_args(argv)
    _check(args, ap)
    return args


def plan(args):
    """The preset's cases with the command-line filters applied."""
    name = "quick" if args.quick else "full" if args.full else "smoke" if args.smoke else "default"
    pre = workloads.preset(name, args.device)
    cases = [c for c in pre.cases if (not args.workloads or c.workload in args.workloads)
             and (not args.models or c.model in args.models)]
    # --tokens / --dtypes replace the preset's values (other shape fields kept, so smoke's tiny d/V stay tiny).
    variants = {}
    for c in cases:
        for n in args.tokens or [c.n_tokens]:
            for dtype in args.dtypes or [c.dtype]:
                seq = min(n, c.seq_len)
                if n % seq:
                    raise UsageError(f"--tokens {n}: expected a multiple of the sequence length {seq}")
                nc = dataclasses.replace(c, n_tokens=n, seq_len=seq, dtype=dtype)
                variants.setdefault(nc.key(), nc)
    cases = list(variants.values())
    warmup = pre.warmup if args.warmup is None else args.warmup
    repeats = pre.repeats if args.repeats is None else args.repeats
    if repeats < 1 or warmup < 0:
        raise UsageError("--repeats must be >= 1 and --warmup >= 0")
    return name, cases, warmup, repeats, pre


def _preflight(provs, step, progress):
    """Run each provider once (this is the first warm-up round); drop and report those that fail.

    ``step(provider) -> (seconds, loss)`` runs one step in process or in the provider's worker.
    """
    ok, notes, losses = [], {}, {}
    for p in provs:
        progress(f"{p.name} first step")
        try:
            losses[p.name] = step(p)[1]
            ok.append(p)
        except Exception as err:  # one broken provider must not sink the others' results
            notes[p.name] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return ok, notes, losses


def _time_providers(ready, case, args, ctx, progress):
    """First step, then interleaved warm-up and timed rounds; returns ``(ready, notes, first_losses, raw, inp)``.

    On CPU every speed provider runs in a worker process of its own (``bench/isolated.py``) unless
    ``--in-process``; interpreter providers (not speeds) always run here, once. ``inp`` is the in-process inputs
    (None when every provider ran in a worker).
    """
    isolate = case.device == "cpu" and not args.in_process
    speed = [p for p in ready if p.speed_ok]
    inp = None
    if not isolate or len(speed) < len(ready):
        inp = workloads.make_inputs(case)
    local_step = (lambda p: timing.time_step(p, inp, case))
    if not isolate:
        ready, notes, losses = _preflight(ready, local_step, progress)
        raw = timing.run_interleaved([p for p in ready if p.speed_ok], inp, case, max(ctx["warmup"] - 1, 0),
                                     ctx["repeats"], progress)
        return ready, notes, losses, raw, inp
    with isolated.Pool(case, speed, not args.liger_eager, args.threads) as pool:
        ok, notes, losses = _preflight(speed, pool.step, progress)
        raw = timing.run_interleaved(ok, None, case, max(ctx["warmup"] - 1, 0), ctx["repeats"], progress,
                                     step=lambda p, _inp, _case: pool.step(p))
    others, more_notes, more_losses = _preflight([p for p in ready if not p.speed_ok], local_step, progress)
    notes.update(more_notes)
    losses.update(more_losses)
    return ok + others, notes, losses, raw, inp


# Cases up to this many logits get a float64 reference loss (an (N, V) float64 tensor per model: 200 MB at SmolLM2
# N = 512; the Qwen target point would need 2.5 GB and seconds, so it gets none).
REFERENCE_MAX_LOGITS = 3 * 10**7


def _reference_loss(case, inp, progress):
    """The case's loss in float64 on the same inputs (None on GPU or above REFERENCE_MAX_LOGITS)."""
    if case.device != "cpu" or case.n_tokens * case.vocab > REFERENCE_MAX_LOGITS:
        return None
    progress("float64 reference loss")
    return naive.reference_loss(inp if inp is not None else workloads.make_inputs(case), case.workload)


def run_case(case, provs, args, ctx, progress):
    """Time and measure every available provider on ``case``; returns its records."""
    ready, notes = [], {}
    for p in provs:
        reason = p.unavailable(case)
        if reason is None and ctx["preset_obj"] is not None and ctx["preset_obj"].skipped(p.name, case):
            reason = (f"left out of preset {ctx['preset']} here to keep its time budget "
                      "(--full, or naming it in --providers, runs it)")
        if reason is None:
            ready.append(p)
        elif case.workload in p.workloads:      # "does not implement" is not news; missing pieces are
            notes[p.name] = f"skipped: {reason}"
    ready, failed, first_losses, raw, inp = _time_providers(ready, case, args, ctx, progress)
    notes.update(failed)
    mems = {}
    if not args.no_memory:
        for p in ready:
            if not p.speed_ok:
                continue
            progress(f"{p.name} memory probe")
            try:
                if case.device == "cuda":
                    extra = memory.measure_cuda(p, inp, case)
                elif ctx["rss_ok"]:
                    extra = memory.measure_subprocess(case, p.name, not args.liger_eager, args.threads)
                else:
                    continue
                mems[p.name] = (extra, extra - workloads.grad_bytes(case))
            except Exception as err:
                notes[p.name] = f"memory probe failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    ref = _reference_loss(case, inp, progress)
    recs = []
    for p in ready:
        summ = dict(timing.summarize(raw[p.name]["times"]), loss=raw[p.name]["loss"]) if p.speed_ok else None
        rec = results.case_record(case, p, summ, mems.get(p.name), ctx["meta"], ctx["run_id"], ctx["preset"],
                                  workloads.flops(case, "min"), workloads.flops(case, p.flop_model_for(case)),
                                  ctx["mem_method"], loss=first_losses[p.name])
        untimed = f"interpreter: one untimed step, loss {first_losses[p.name]:.6g}"
        rec["note"] = notes.pop(p.name, None) or (None if p.speed_ok else untimed)
        rec["loss_err"] = None if ref is None else abs(first_losses[p.name] - ref)
        recs.append(rec)
    for name, note in notes.items():
        recs.append(dict(case.as_dict(), provider=name, note=note, run_id=ctx["run_id"], preset=ctx["preset"],
                         speed_ok=False, **ctx["meta"]))
    del inp
    gc.collect()
    return results.add_ratios(recs)


def main(argv=None):
    args = parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"   # read by Triton at import and by the provider's label
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    preset_name, cases, warmup, repeats, pre = plan(args)
    provs = providers.select(args.providers, liger_compiled=not args.liger_eager)
    run_id = args.resume or results.new_run_id()
    previous = results.load(args.out, run_id) if args.resume else []
    done = {(r["workload"], r["model"], r["vocab"], r["n_tokens"], r["dtype"], r["device"]) for r in previous}
    meta = results.metadata(torch.get_num_threads(), args.device)
    rss_ok = args.device == "cpu" and memory.rss_supported()
    ctx = dict(meta=meta, run_id=run_id, preset=preset_name, warmup=warmup, repeats=repeats, rss_ok=rss_ok,
               preset_obj=None if args.providers else pre,
               mem_method=memory.METHOD_CUDA if args.device == "cuda" else
               memory.METHOD_CPU if rss_ok else "not measured (no /proc/self/clear_refs)")
    print(f"kdrl-kernels bench | preset {preset_name} | run {run_id} | {meta['machine']} | {meta['cpu']} | "
          f"{meta['threads']} threads | torch {meta['torch']} | git {meta['git_sha'][:12]}")
    print(f"{len(cases)} cases x {len(provs)} providers, {warmup} warm-up + {repeats} timed rounds, interleaved")
    records = list(previous)
    for i, case in enumerate(cases, 1):
        key = (case.workload, case.model, case.vocab, case.n_tokens, case.dtype, case.device)
        if key in done:
            continue
        progress = timing.stderr_progress(f"[case {i}/{len(cases)}] {case.key()}:")
        recs = run_case(case, provs, args, ctx, progress)
        results.append(recs, args.out)
        records.extend(recs)
        sys.stderr.write("\n")
    print(report.table([r for r in records if r.get("time_median_s")]))
    print(report.not_run_text(records))
    targets = report.check_targets(records)
    print(report.targets_text(targets))
    want_gpu = args.gpu_report == "yes" or (args.gpu_report == "auto" and preset_name in ("default", "full"))
    gpu_rows, gpu_reason = ([], "skipped (--gpu-report yes to run it)")
    if want_gpu:
        gpu_rows, gpu_reason = gpu_report.collect(cache_dir=args.out)
    print(gpu_report.text(gpu_rows, gpu_reason))
    plot_paths = [] if args.no_plots else report.plots(records, args.out)
    elapsed = time.perf_counter() - start
    print(f"\nFLOP model for GFLOP/s (useful work, same for every provider): {workloads.FLOP_MODELS['min']}")
    print(f"results: {args.out}/results.jsonl, results.csv; plots: {len(plot_paths)} PNG; {elapsed:.0f} s total")
    doc = {"bench": "kdrl-kernels", "preset": preset_name, "run_id": run_id, "elapsed_s": round(elapsed, 1),
           "meta": meta, "flop_models": workloads.FLOP_MODELS, "memory_method": ctx["mem_method"],
           "results": [{k: r.get(k) for k in SUMMARY_KEYS} for r in records], "targets": targets,
           "gpu_report": gpu_rows if gpu_rows else gpu_reason,
           "outputs": {"jsonl": str(Path(args.out) / "results.jsonl"), "csv": str(Path(args.out) / "results.csv"),
                       "plots": plot_paths}}
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
