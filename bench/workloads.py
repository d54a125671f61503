"""What gets benchmarked: model shapes, workloads, the FLOP model, run presets and input generation.

A *case* is one (workload, model pair, token count, dtype, device) point; every provider runs every case it
supports on the same input tensors. Token layout: ``N = B * T`` response tokens, ``B`` sequences of ``T`` tokens,
all on the mask (prompt and padding tokens are not part of the benchmark: every provider would skip or pay for them
differently, and the FLOP model counts the ``N`` tokens the loss is taken over).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

WORKLOADS = ("kdrl", "grpo", "rkl")
WORKLOAD_HELP = {
    "kdrl": "KDRL step: student + teacher log-probs of sampled tokens, k2 to the teacher, clipped GRPO surrogate",
    "grpo": "GRPO alone: student log-probs of sampled tokens, clipped surrogate (on-policy)",
    "rkl": "exact reverse-KL distillation over the full vocabulary, KL(student || teacher), token mean",
}


@dataclass(frozen=True)
class ModelPair:
    """Student hidden size ``d``, teacher hidden size ``d_t`` and the shared vocabulary ``V``."""
    name: str
    d: int
    d_t: int
    vocab: int
    note: str


MODELS = {
    "qwen2.5-0.5b/1.5b": ModelPair("qwen2.5-0.5b/1.5b", 896, 1536, 151936,
                                   "Qwen2.5 0.5B student, 1.5B teacher (the project's real pair)"),
    "smollm2-135m/360m": ModelPair("smollm2-135m/360m", 576, 960, 49152,
                                   "SmolLM2-135M student, SmolLM2-360M teacher (d_t = 960)"),
    "llama3-8b/70b": ModelPair("llama3-8b/70b", 4096, 8192, 128256,
                               "Llama-3-8B student, Llama-3-70B teacher (d_t = 8192)"),
}


@dataclass(frozen=True)
class Case:
    workload: str
    model: str
    d: int
    d_t: int
    vocab: int
    n_tokens: int
    seq_len: int
    dtype: str          # "float32" | "bfloat16"
    device: str = "cpu"

    @property
    def batch(self) -> int:
        return self.n_tokens // self.seq_len

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def key(self) -> str:
        return f"{self.workload}|{self.model}|V={self.vocab}|N={self.n_tokens}|{self.dtype}|{self.device}"

    def as_dict(self) -> dict:
        return asdict(self)


def make_case(workload, model, n_tokens, dtype, device="cpu", vocab=None, seq_len=None) -> Case:
    """A case for ``model`` (a key of MODELS), optionally with the vocabulary overridden (vocabulary sweeps)."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")
    if model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {model!r}")
    m = MODELS[model]
    seq_len = seq_len or min(n_tokens, 512)
    if n_tokens <= 0 or n_tokens % seq_len:
        raise ValueError(f"n_tokens must be a positive multiple of seq_len={seq_len}, got {n_tokens}")
    return Case(workload, model, m.d, m.d_t, vocab or m.vocab, n_tokens, seq_len, dtype, device)


# --- FLOP model -------------------------------------------------------------------------------------------------
# One (N, d) x (d, V) GEMM is 2*N*d*V FLOPs. The trained student needs its forward (2NdV) and two backward GEMMs
# (dH and dW: 4NdV) = 6NdV; a path that does not keep logits and recomputes them in backward pays 8NdV. The teacher
# is forward only (2*N*d_t*V); a KL backward that also recomputes the teacher's logits pays it twice.
# GRPO alone has no teacher. Softmax/exp work (O(N*V)) is not counted.
FLOP_MODELS = {
    "min": "6*N*d*V + 2*N*d_t*V (student fwd+bwd, teacher fwd; logits kept or grads computed in forward)",
    "recompute": "8*N*d*V + 2*N*d_t*V (student logits recomputed in backward)",
    "recompute_both": "8*N*d*V + 4*N*d_t*V (student and teacher logits recomputed in backward)",
}


def flops(case: Case, model: str = "min") -> float:
    """FLOPs of one forward+backward step of ``case`` under FLOP model ``model`` (a key of FLOP_MODELS)."""
    if model not in FLOP_MODELS:
        raise ValueError(f"FLOP model must be one of {sorted(FLOP_MODELS)}, got {model!r}")
    n, v = case.n_tokens, case.vocab
    student = (8 if model.startswith("recompute") else 6) * n * case.d * v
    teacher_passes = 2 if model == "recompute_both" else 1
    teacher = 0 if case.workload == "grpo" else teacher_passes * 2 * n * case.d_t * v
    return float(student + teacher)


# --- presets ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    """Which cases to run and how many timed repeats (after ``warmup`` untimed rounds)."""
    name: str
    cases: tuple
    warmup: int
    repeats: int
    # (provider, workload or "*", min_vocab): the provider is left out of this preset's cases of that workload with
    # V >= min_vocab because its steps cost more than the preset's time budget allows (the output says so;
    # --full runs everything, and naming providers with --providers runs them wherever they apply).
    skip: tuple = ()

    def skipped(self, provider: str, case: Case) -> bool:
        return any(p == provider and w in ("*", case.workload) and case.vocab >= v for p, w, v in self.skip)


def _cases(workloads, models, tokens, dtypes, device, vocabs=(None,)):
    return tuple(make_case(w, m, n, dt, device, vocab=v)
                 for w in workloads for m in models for v in vocabs for n in tokens for dt in dtypes)


def preset(name: str, device: str = "cpu") -> Preset:
    """``smoke`` (seconds; tests), ``quick`` (< 1 min here), ``default`` (~7 min here, includes the KDRL target
    point N=2048, V=151,936), ``full`` (every workload, model, dtype and a token/vocab sweep)."""
    q, s, ll = "qwen2.5-0.5b/1.5b", "smollm2-135m/360m", "llama3-8b/70b"
    gpu = device == "cuda"
    if name == "smoke":
        cases = tuple(replace(c, d=64, d_t=96, vocab=2048) for c in _cases(WORKLOADS, [s], [256], ["float32"],
                                                                            device))
        return Preset(name, cases, warmup=1, repeats=2)
    if name == "quick":
        if gpu:
            return Preset(name, _cases(["kdrl"], [q], [8192], ["bfloat16"], device), warmup=1, repeats=3)
        return Preset(name, _cases(["kdrl"], [s], [512], ["bfloat16"], device), warmup=1, repeats=3,
                      skip=(("torch-lce", "*", 0), ("ours-chunked", "*", 0)))
    if name == "default":
        if gpu:
            cases = (_cases(["kdrl"], [q], [4096, 16384], ["bfloat16"], device)
                     + _cases(["grpo", "rkl"], [q], [16384], ["bfloat16"], device))
            return Preset(name, cases, warmup=2, repeats=10)
        # The 2-core CPU budget (~7 min) holds the target point with naive, ours and Liger, plus every workload at a
        # small shape; the full comparison (fp32, every provider everywhere) is --full.
        cases = (_cases(["kdrl"], [q], [2048], ["bfloat16"], device)
                 + _cases(WORKLOADS, [s], [512], ["bfloat16"], device))
        return Preset(name, cases, warmup=1, repeats=3,
                      skip=(("torch-lce", "*", 0), ("ours-chunked", "*", 0)))
    if name == "full":
        tokens = [4096, 16384, 32768] if gpu else [512, 1024, 2048, 4096]
        big = [4096, 16384] if gpu else [512, 1024]
        # The KDRL step in bf16 also at N = 8192 on CPU: the memory sweep N = 512 .. 8192 (ours flat in N).
        cases = (_cases(WORKLOADS, [q, s], tokens, ["float32", "bfloat16"], device)
                 + (() if gpu else _cases(["kdrl"], [q], [8192], ["bfloat16"], device))
                 + _cases(WORKLOADS, [ll], big, ["float32", "bfloat16"], device)
                 + _cases(["kdrl"], [q], [tokens[1]], ["bfloat16"], device, vocabs=(16384, 32768, 65536)))
        return Preset(name, cases, warmup=1, repeats=5)
    raise ValueError(f"preset must be smoke, quick, default or full, got {name!r}")


# --- inputs -----------------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """Tensors of one case. Student leaves ``hidden (N, d)`` and ``weight (V, d)`` require grad; the teacher's
    ``t_hidden (N, d_t)``, ``t_weight (V, d_t)`` do not. ``targets (B, T)`` int64, ``mask (B, T)`` bool,
    ``advantages (B,)`` float32. Hyper-parameters of the objective ride along so every provider uses the same."""
    hidden: torch.Tensor
    weight: torch.Tensor
    t_hidden: torch.Tensor | None
    t_weight: torch.Tensor | None
    targets: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor
    beta: float = 0.02
    eps_low: float = 0.2
    eps_high: float = 0.2

    def zero_grads(self):
        self.hidden.grad = None
        self.weight.grad = None

    def grad_bytes(self) -> int:
        """Bytes of the gradients every provider must return (dH and dW, in the input dtype)."""
        return sum(t.numel() * t.element_size() for t in (self.hidden, self.weight))


def grad_bytes(case: Case) -> int:
    """Bytes of dH ``(N, d)`` and dW ``(V, d)`` in the input dtype: what every provider's step returns."""
    return (case.n_tokens + case.vocab) * case.d * torch.empty((), dtype=case.torch_dtype).element_size()


def make_inputs(case: Case, seed: int = 0) -> Inputs:
    """Random inputs with logits of standard deviation about 2 (a trained LM head's range, not a flat softmax)."""
    gen = torch.Generator().manual_seed(seed)
    dtype, dev = case.torch_dtype, torch.device(case.device)

    def randn(*shape, scale=1.0):
        # Drawn in the target dtype directly: a 152k x 1536 fp32 draw plus a cast costs seconds per case.
        return torch.empty(*shape, dtype=dtype).normal_(0.0, scale, generator=gen).to(dev)

    n, b, t = case.n_tokens, case.batch, case.seq_len
    hidden = randn(n, case.d).requires_grad_(True)
    weight = randn(case.vocab, case.d, scale=2.0 / case.d ** 0.5).requires_grad_(True)
    teacher = case.workload != "grpo"
    t_hidden = randn(n, case.d_t) if teacher else None
    t_weight = randn(case.vocab, case.d_t, scale=2.0 / case.d_t ** 0.5) if teacher else None
    targets = torch.randint(0, case.vocab, (b, t), generator=gen).to(dev)
    mask = torch.ones(b, t, dtype=torch.bool, device=dev)
    advantages = torch.randn(b, generator=gen).to(dev)
    return Inputs(hidden, weight, t_hidden, t_weight, targets, mask, advantages)
