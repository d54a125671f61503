"""What a run will cost and how far it is: a projection before the first token (from throughputs measured on
this project's 2-core machine) and an overall ETA that updates after every saved chunk from the run's own pace.

    est = projected_seconds(samples=2866, max_new_tokens=512, model="qwen2.5-coder-0.5b-instruct", backend="hf")
    progress = RunProgress(total_samples=2866, done_samples=0, max_new_tokens=512, prior_tok_s=est_rate)
    progress.update(samples=64, tokens=27000)   # after each chunk
    print(progress.line())                      # "progress 64/2866 samples (2.2%) ... ETA 2 h 5 min (about 17:12 UTC)"
"""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

__all__ = ["MEASURED_TOK_S", "MEASURED_BATCH", "TOKENS_PER_SAMPLE_FRACTION", "measured_rate", "projected_seconds",
           "projected_load_seconds", "fmt_duration", "RunProgress"]

# Response tokens per second, (busy machine, quiet machine), measured here with greedy decoding at 512 new tokens
# (see evals/README.md, "Defaults and how long they take"). A pair with one value was measured once.
MEASURED_TOK_S: dict[tuple[str, str], tuple[float, float]] = {
    ("smollm2-135m-instruct", "vllm"): (166.0, 411.0),
    ("smollm2-135m-instruct", "hf"): (20.9, 20.9),
    # quiet: the full default suite at 349 tok/s on a 2-core AMX Xeon (194.5 on a 2-core AMD EPYC); busy: load 8-12.
    ("qwen2.5-coder-0.5b-instruct", "vllm"): (85.0, 349.0),
    # hf, one batch of 16 GSM8K problems: 4,975 tokens in 52.6 min wall (1.6 tok/s) at load 7-10 from other jobs,
    # niced, 29% of a core; 929 s of CPU time, so 5.4 tok/s where it has a core of its own.
    ("qwen2.5-coder-0.5b-instruct", "hf"): (1.6, 5.4),
    ("qwen2.5-coder-1.5b-instruct", "vllm"): (47.0, 84.0),
}
# Sequences generated together when each rate above was measured, (busy, quiet): 20-prompt chunks in the busy
# 140-sample subset, 64-prompt chunks in the quiet runs, one batch of 16 for hf. The 1.5B's quiet rate was measured
# batched without the batch recorded; 64 is the cautious choice (it projects small runs slower).
MEASURED_BATCH: dict[tuple[str, str], tuple[int, int]] = {
    ("smollm2-135m-instruct", "vllm"): (20, 64),
    ("smollm2-135m-instruct", "hf"): (16, 16),
    ("qwen2.5-coder-0.5b-instruct", "vllm"): (20, 64),
    ("qwen2.5-coder-0.5b-instruct", "hf"): (16, 16),
    ("qwen2.5-coder-1.5b-instruct", "vllm"): (20, 64),
}
# Seconds before the first token, (quiet, busy). Converted model: vLLM engine start + load, SmolLM2 (evals/README).
# First use of a registry model (download from the package registry + conversion to bf16, then the engine): the
# default model took 104 s on a quiet 2-core AMX Xeon (3,114 s in all minus 3,010 s of generation) and 343 s for
# download and conversion alone on a loaded machine.
LOAD_S: dict[tuple[str, str], tuple[float, float]] = {("smollm2-135m-instruct", "vllm"): (24.0, 62.0)}
FIRST_USE_S: dict[str, tuple[float, float]] = {"qwen2.5-coder-0.5b-instruct": (104.0, 343.0)}
# The example runs wrote 402-445 tokens per answer at a 512-token budget (many answers hit the limit).
TOKENS_PER_SAMPLE_FRACTION = 0.85


def measured_rate(model: str, backend: str) -> tuple[float, float] | None:
    """(busy, quiet) tok/s measured for a registry model on a backend, or None when never measured."""
    return MEASURED_TOK_S.get((str(model), backend))


def projected_seconds(samples: int, max_new_tokens: int, model: str, backend: str,
                      batch: int | None = None) -> tuple[float, float] | None:
    """(fastest, slowest) projected generation seconds for `samples` answers, or None for an unmeasured pair.

    batch: sequences per generate call (None: at least the batch the rates were measured at). Decoding a small
    batch on a CPU is bound by reading the weights once per step, whatever the batch, so throughput falls about in
    proportion to the batch below the measured one (a run of 3 problems per task gets about 3/20 of the busy rate).
    Checked against one measured small run: `--tasks math --limit 3` (Qwen 0.5B, vLLM, chunks of 3 prompts) took 18
    min of generation at 7.4 tok/s on a loaded machine, where this projects 9-12 min (and said 26 s - 1 min before).
    """
    rate = measured_rate(model, backend)
    if rate is None or samples <= 0:
        return None if rate is None else (0.0, 0.0)
    tokens = samples * TOKENS_PER_SAMPLE_FRACTION * max_new_tokens
    busy_b, quiet_b = MEASURED_BATCH.get((str(model), backend), (1, 1))
    busy, quiet = min(rate), max(rate)
    if batch is not None:
        busy *= min(1.0, batch / busy_b)
        quiet *= min(1.0, batch / quiet_b)
    return tokens / quiet, tokens / busy


def projected_load_seconds(model: str, backend: str, first_use: bool) -> tuple[float, float] | None:
    """(quiet, busy) seconds from start to the first token (model download/conversion on first use, engine start),
    or None where not measured."""
    if first_use:
        return FIRST_USE_S.get(str(model))
    return LOAD_S.get((str(model), backend))


def fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 90:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 90:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


class RunProgress:
    """Overall progress of a run over all its tasks.

    total_samples: every (problem, sample) the run needs; done_samples: those already on disk (a resumed run).
    The ETA is remaining samples x tokens per sample / tokens per second, both taken from this invocation's own
    chunks once it has some (tokens per wall-clock second, so grading and saving are counted), and from
    `prior_tok_s` and `TOKENS_PER_SAMPLE_FRACTION * max_new_tokens` before that.
    """

    def __init__(self, total_samples: int, done_samples: int, max_new_tokens: int,
                 prior_tok_s: float | None = None, clock=time.monotonic, now=None):
        self.total, self.done = total_samples, min(done_samples, total_samples)
        self.max_new_tokens, self.prior_tok_s = max_new_tokens, prior_tok_s
        self.clock = clock
        self.now = now or (lambda: datetime.now(timezone.utc))
        self.start = clock()
        self.new_samples = self.new_tokens = 0

    def update(self, samples: int, tokens: int) -> None:
        self.done = min(self.total, self.done + samples)
        self.new_samples += samples
        self.new_tokens += tokens

    @property
    def elapsed(self) -> float:
        return self.clock() - self.start

    def tokens_per_sample(self) -> float:
        if self.new_samples:
            return self.new_tokens / self.new_samples
        return TOKENS_PER_SAMPLE_FRACTION * self.max_new_tokens

    def tok_s(self) -> float | None:
        if self.new_tokens and self.elapsed > 0:
            return self.new_tokens / self.elapsed
        return self.prior_tok_s

    def eta_seconds(self) -> float | None:
        remaining = self.total - self.done
        if remaining <= 0:
            return 0.0
        rate = self.tok_s()
        return remaining * self.tokens_per_sample() / rate if rate else None

    def line(self) -> str:
        pct = 100 * self.done / self.total if self.total else 100.0
        out = f"progress {self.done}/{self.total} samples ({pct:.1f}%)"
        if self.new_samples:
            out += (f", {self.new_tokens:,} tokens in {fmt_duration(self.elapsed)} at {self.tok_s():.1f} tok/s "
                    f"({self.tokens_per_sample():.0f} per answer)")
        eta = self.eta_seconds()
        if eta is None:
            out += "; ETA after the first chunk"
        elif eta == 0:
            out += "; done"
        else:
            at = (self.now() + timedelta(seconds=eta)).strftime("%H:%M UTC")
            out += f"; ETA {fmt_duration(eta)} (about {at})" + ("" if self.new_samples else ", projected")
        return out
