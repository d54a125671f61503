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

__all__ = ["MEASURED_TOK_S", "TOKENS_PER_SAMPLE_FRACTION", "measured_rate", "projected_seconds", "fmt_duration",
           "RunProgress"]

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
# The example runs wrote 402-445 tokens per answer at a 512-token budget (many answers hit the limit).
TOKENS_PER_SAMPLE_FRACTION = 0.85


def measured_rate(model: str, backend: str) -> tuple[float, float] | None:
    """(busy, quiet) tok/s measured for a registry model on a backend, or None when never measured."""
    return MEASURED_TOK_S.get((str(model), backend))


def projected_seconds(samples: int, max_new_tokens: int, model: str, backend: str) -> tuple[float, float] | None:
    """(fastest, slowest) projected generation seconds for `samples` answers, or None for an unmeasured pair."""
    rate = measured_rate(model, backend)
    if rate is None or samples <= 0:
        return None if rate is None else (0.0, 0.0)
    tokens = samples * TOKENS_PER_SAMPLE_FRACTION * max_new_tokens
    return tokens / max(rate), tokens / min(rate)


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
