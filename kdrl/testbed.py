"""A KD + RL testbed that learns in minutes on a CPU: ``python -m kdrl.testbed``.

Task: add four one-digit numbers, writing every partial sum, e.g. ``7+5+9+3=`` -> ``12;21;24`` then
end-of-sequence (three chained additions, nine tokens). Reward 1 when the text after the last ``;`` equals the true sum (exact match),
else 0. A digit-level tokenizer (16 symbols) and tiny Llama models built from a config are trained here:
a teacher pre-trained by supervised learning to be good but imperfect, and a smaller student stopped early.

From the same student every method runs through the trainer's own chain: batched sampling -> exact-match
reward -> :func:`kdrl.rollout.build_batch` (group-normalised advantages) -> teacher hidden states ->
:func:`kdrl.train.backward_microbatches` (``kdrl_kernels.KDRLLoss``, with the exact KL logged beside k1/k2/k3) ->
AdamW step. Held-out accuracy (greedy, and mean@8 at temperature 1) is measured every few steps. Results go to ``results/testbed/``
(checkpoints of the pre-trained pair are cached there) and, with ``--docs``, to ``docs/testbed.md`` and
``docs/testbed.png``.
"""
from __future__ import annotations

import signal
import sys
import time

_T0 = time.perf_counter()
if __name__ == "__main__":
    print("[kdrl.testbed +0.0s] starting: importing torch and transformers ...", flush=True)
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))  # Ctrl-C during the imports: no traceback

import argparse
import dataclasses
import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kdrl.rollout import PromptSampler, build_batch, rollout_metrics
from kdrl.train import backward_microbatches, hidden_states, kd_groups_whole
from kdrl_kernels import KDRLConfig, KDRLLoss

__all__ = ["Problem", "TestbedConfig", "quick_config", "METHODS", "make_problems", "build_model", "pretrain_pair", "sample",
           "evaluate", "rl_run", "run_table", "main"]

# ---- task and tokenizer ---------------------------------------------------------------------------------------
SYMBOLS = ["<pad>", "<bos>", "<eos>"] + list("0123456789+=;")
PAD, BOS, EOS = 0, 1, 2
STOI = {s: i for i, s in enumerate(SYMBOLS)}
VOCAB = len(SYMBOLS)
TERMS = 4


def encode(text: str) -> list[int]:
    return [STOI[c] for c in text]


def decode(ids) -> str:
    return "".join(SYMBOLS[i] for i in ids if i > EOS)


@dataclass(frozen=True)
class Problem:
    terms: tuple[int, ...]

    @property
    def question(self) -> str:
        return "+".join(map(str, self.terms)) + "="

    @property
    def answer(self) -> str:
        return str(sum(self.terms))

    @property
    def solution(self) -> str:
        """The chain of partial sums, the last one being the answer: ``a+b;a+b+c``."""
        sums, acc = [], 0
        for i, x in enumerate(self.terms):
            acc += x
            if i:
                sums.append(str(acc))
        return ";".join(sums)

    def prompt_ids(self) -> list[int]:
        return [BOS] + encode(self.question)


def correct(problem: Problem, response: list[int]) -> bool:
    """Exact match of the final answer: the response must end with EOS and its last ``;`` field is the sum."""
    if not response or response[-1] != EOS:
        return False
    return decode(response).split(";")[-1] == problem.answer


def make_problems(n: int, seed: int, exclude: set | None = None) -> list[Problem]:
    """``n`` distinct problems (four terms in 0..9), none of them in ``exclude``."""
    rng, seen, out = random.Random(seed), set(exclude or ()), []
    if n + len(seen) > 10 ** TERMS:
        raise ValueError(f"only {10 ** TERMS} problems exist")
    while len(out) < n:
        p = Problem(tuple(rng.randint(0, 9) for _ in range(TERMS)))
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


# ---- models --------------------------------------------------------------------------------------------------
MAX_NEW = 12  # "12;21;24" is 8 characters + EOS: 12 leaves room for a wrong, longer answer


INIT_STD = 0.1  # not transformers' 0.02: with RMSNorm, tiny embeddings make the loss very sharp in them


def build_model(hidden: int, layers: int, seed: int):
    """A tiny Llama from a config (no download); untied embeddings, 4 heads."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                      tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                      initializer_range=INIT_STD, attn_implementation="eager")
    return LlamaForCausalLM(cfg).float()


def sft_batch(problems: list[Problem]):
    """Teacher-forced ``(input_ids, labels)``: loss on the solution tokens and EOS only."""
    rows = [(p.prompt_ids(), encode(p.solution) + [EOS]) for p in problems]
    width = max(len(a) + len(b) for a, b in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for i, (a, b) in enumerate(rows):
        ids[i, :len(a) + len(b)] = torch.tensor(a + b)
        labels[i, len(a):len(a) + len(b)] = torch.tensor(b)
    return ids, labels


def sft(model, problems: list[Problem], steps: int, *, batch: int = 64, lr: float = 3e-3, seed: int = 0,
        say=print, name: str = "model"):
    """Supervised pre-training on correct solutions (cosine learning rate). Returns the model."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = torch.randint(len(problems), (batch,), generator=g).tolist()
        ids, labels = sft_batch([problems[i] for i in idx])
        logits = model(input_ids=ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % max(1, steps // 5) == 0:
            say(f"  sft {name}: step {step + 1}/{steps} loss {float(loss.detach()):.3f} ({time.perf_counter() - t0:.0f}s)")
    model.eval()
    return model


@torch.no_grad()
def sample(model, prompts: list[list[int]], *, temperature: float = 1.0, generator=None,
           max_new: int = MAX_NEW) -> tuple[list[list[int]], list[bool]]:
    """Batched autoregressive sampling with a KV cache (greedy at ``temperature=0``).

    Every prompt has the same length here, so no padding is needed. Returns the responses (up to and including
    EOS) and whether each hit ``max_new`` without EOS.
    """
    ids = torch.tensor(prompts, dtype=torch.long)
    b = ids.shape[0]
    out = model(input_ids=ids, use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1]
    tokens = torch.zeros(b, max_new, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool)
    for t in range(max_new):
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(logits.float() / temperature, -1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        nxt = torch.where(done, torch.full_like(nxt, PAD), nxt)
        tokens[:, t] = nxt
        done = done | (nxt == EOS)
        if bool(done.all()) or t == max_new - 1:
            break
        out = model(input_ids=nxt[:, None], past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
    responses, truncated = [], []
    for row in tokens.tolist():
        r = row[:row.index(EOS) + 1] if EOS in row else [x for x in row if x != PAD]
        responses.append(r)
        truncated.append(EOS not in row)
    return responses, truncated


EVAL_SAMPLES = 8   # held-out mean@8 at the rollout temperature, beside greedy accuracy
EVAL_SEED = 4321   # every evaluation draws the same random stream, so two models' scores are paired


@torch.no_grad()
def evaluate(model, problems: list[Problem], batch: int = 512, samples: int = EVAL_SAMPLES) -> dict:
    """Held-out accuracy: greedy (``accuracy``), and mean@``samples`` at temperature 1 (``sampled``, the reward
    RL maximises, as the papers report mean@k at a temperature); mean greedy response length (tokens, EOS included).
    """
    ok, lengths = 0, 0
    for i in range(0, len(problems), batch):
        part = problems[i:i + batch]
        responses, _ = sample(model, [p.prompt_ids() for p in part], temperature=0.0)
        ok += sum(correct(p, r) for p, r in zip(part, responses))
        lengths += sum(len(r) for r in responses)
    out = {"accuracy": ok / len(problems), "length": lengths / len(problems)}
    if samples:
        gen, hits, per = torch.Generator().manual_seed(EVAL_SEED), 0, max(1, batch // samples)
        for i in range(0, len(problems), per):
            part = [p for p in problems[i:i + per] for _ in range(samples)]
            responses, _ = sample(model, [p.prompt_ids() for p in part], temperature=1.0, generator=gen)
            hits += sum(correct(p, r) for p, r in zip(part, responses))
        out["sampled"] = hits / (len(problems) * samples)
    return out


# ---- the pre-trained pair, cached -------------------------------------------------------------------------------
@dataclass
class TestbedConfig:
    """Everything that decides the numbers; its hash names the cached checkpoints."""
    teacher_hidden: int = 64
    teacher_layers: int = 2
    teacher_sft_steps: int = 280
    student_hidden: int = 64
    student_layers: int = 2
    student_sft_steps: int = 110
    sft_lr: float = 3e-3
    sft_batch: int = 64
    init_std: float = INIT_STD
    train_problems: int = 9000
    heldout_problems: int = 300
    data_seed: int = 1234
    # RL
    steps: int = 120
    prompts_per_step: int = 32
    group_size: int = 8
    lr: float = 2e-4
    optimizer: str = "adamw"       # adamw | sgd (momentum 0.9)
    warmup_steps: int = 5
    eval_every: int = 10
    micro_batch_size: int = 256
    seeds: tuple = (0, 1, 2)
    methods: tuple = ()

    def pair_key(self) -> str:
        keys = ("teacher_hidden", "teacher_layers", "teacher_sft_steps", "student_hidden", "student_layers",
                "student_sft_steps", "sft_lr", "sft_batch", "init_std", "train_problems", "heldout_problems", "data_seed")
        blob = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]

    def run_key(self) -> str:
        """Hash of everything a single RL run depends on (not the list of seeds and methods)."""
        blob = json.dumps({k: v for k, v in dataclasses.asdict(self).items() if k not in ("seeds", "methods")},
                          sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


def quick_config() -> TestbedConfig:
    """The test suite's version: the table's configuration with one seed, GRPO, KDRL and KD (k2) only."""
    return TestbedConfig(seeds=(0,), methods=("grpo", "kdrl", "kd_k2"))


def datasets(cfg: TestbedConfig) -> tuple[list[Problem], list[Problem]]:
    heldout = make_problems(cfg.heldout_problems, cfg.data_seed + 1)
    train = make_problems(cfg.train_problems, cfg.data_seed, exclude=set(heldout))
    return train, heldout


def pretrain_pair(cfg: TestbedConfig, out: Path, say=print):
    """The SFT teacher and student (trained here once, then loaded from ``out/pair-<hash>/``)."""
    train, heldout = datasets(cfg)
    path = out / f"pair-{cfg.pair_key()}"
    teacher = build_model(cfg.teacher_hidden, cfg.teacher_layers, seed=cfg.data_seed)
    student = build_model(cfg.student_hidden, cfg.student_layers, seed=cfg.data_seed + 7)
    if (path / "pair.pt").exists():
        state = torch.load(path / "pair.pt", weights_only=True)
        teacher.load_state_dict(state["teacher"])
        student.load_state_dict(state["student"])
        teacher.eval(), student.eval()
        say(f"loaded the pre-trained teacher and student from {path}/pair.pt")
        info = state["info"]
        for name, model in (("teacher", teacher), ("student", student)):
            if "sampled" not in info[name]:  # a pair cached before mean@k was measured
                info[name] = evaluate(model, heldout)
        return teacher, student, info
    say(f"pre-training the teacher ({cfg.teacher_layers} layers, d={cfg.teacher_hidden}, "
        f"{cfg.teacher_sft_steps} SFT steps) and the student ({cfg.student_layers} layers, d={cfg.student_hidden}, "
        f"{cfg.student_sft_steps} steps); cached in {path}/ for the next run")
    sft(teacher, train, cfg.teacher_sft_steps, batch=cfg.sft_batch, lr=cfg.sft_lr, seed=cfg.data_seed, say=say,
        name="teacher")
    sft(student, train, cfg.student_sft_steps, batch=cfg.sft_batch, lr=cfg.sft_lr, seed=cfg.data_seed + 7, say=say,
        name="student")
    info = {"teacher": evaluate(teacher, heldout), "student": evaluate(student, heldout),
            "teacher_params": sum(p.numel() for p in teacher.parameters()),
            "student_params": sum(p.numel() for p in student.parameters())}
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "pair.pt.tmp"
    torch.save({"teacher": teacher.state_dict(), "student": student.state_dict(), "info": info}, tmp)
    tmp.replace(path / "pair.pt")
    return teacher, student, info


# ---- methods --------------------------------------------------------------------------------------------------
# The papers' beta (2e-3; annealed 5e-3 -> 1e-3) is small against advantages of size ~1 on long math answers; on
# these 8-token answers it has no visible effect, so the testbed scales every beta by 50 (documented in docs/).
BETA_SCALE = 50.0


def method_configs(steps: int) -> dict[str, dict]:
    """name -> KDRLConfig fields. The annealed beta reaches its floor at 2/3 of the run, as in the paper."""
    b, hi, lo = 2e-3 * BETA_SCALE, 5e-3 * BETA_SCALE, 1e-3 * BETA_SCALE
    anneal = dict(beta=hi, beta_schedule="linear", beta_min=lo, beta_decay=(hi - lo) / max(1, 2 * steps // 3))
    return {
        "grpo": dict(objective="grpo"),
        "kd_k2": dict(objective="kd", kl_estimator="k2"),
        "kd_exact": dict(objective="kd", kl_estimator="exact"),
        "kdrl": dict(objective="kdrl", beta=b),
        "kdrl_anneal": dict(objective="kdrl", **anneal),
        "kdrl_mask": dict(objective="kdrl", beta=b, kd_mask="incorrect"),
        "kdrl_shaping": dict(objective="kdrl_shaping", beta=b),
        "trrd": dict(objective="trrd", trrd_alpha=0.5, eps_high=0.28),
    }


METHODS = tuple(method_configs(1))


def rl_run(method: str, seed: int, student_state: dict, teacher, cfg: TestbedConfig, train, heldout,
           say=print) -> dict:
    """One run from the pre-trained student; returns its curve (held-out accuracy every ``eval_every`` steps)."""
    torch.manual_seed(seed)
    model = build_model(cfg.student_hidden, cfg.student_layers, seed=0)
    model.load_state_dict(student_state)
    model.eval()  # no dropout anyway; eval() keeps sampling and training on the same function
    lc = KDRLConfig(**method_configs(cfg.steps)[method], log_exact_kl=True, compute_entropy=False)
    loss_fn = KDRLLoss(lc)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    sampler = PromptSampler(train, seed=seed)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 17)
    t_weight = teacher.get_output_embeddings().weight.detach()
    G = cfg.group_size
    curve = [{"step": 0, "samples": 0, **evaluate(model, heldout)}]
    train_log = []
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(cfg.steps):
        problems = sampler.next(cfg.prompts_per_step)
        prompts = [p.prompt_ids() for p in problems for _ in range(G)]
        responses, cut = sample(model, prompts, temperature=1.0, generator=gen)
        ok = [correct(p, r) for p, r in zip([p for p in problems for _ in range(G)], responses)]
        batch = build_batch([p.prompt_ids() for p in problems],
                            [responses[i * G:(i + 1) * G] for i in range(len(problems))],
                            [ok[i * G:(i + 1) * G] for i in range(len(problems))],
                            [cut[i * G:(i + 1) * G] for i in range(len(problems))],
                            pad_id=PAD, scale_advantages=lc.scale_rewards)
        stats = rollout_metrics(batch)
        if lc.kd_mask == "group_all_wrong":
            batch = kd_groups_whole(batch)
        with torch.no_grad():
            t_hidden = hidden_states(teacher, batch)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
        opt.zero_grad(set_to_none=True)
        m = backward_microbatches(model, loss_fn, batch, micro_batch_size=cfg.micro_batch_size,
                                  teacher_hidden=t_hidden, teacher_weight=t_weight, step=step)
        m["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        if lc.objective in ("grpo", "trrd", "kd"):  # the KD coefficient applied, as kdrl.train logs it
            m["beta"] = 1.0 if lc.objective == "kd" else 0.0
        train_log.append({"step": step + 1, **{k: stats[k] for k in ("accuracy", "len_mean")},
                          **{k: m.get(k) for k in ("k1", "k2", "k3", "exact_kl", "beta", "clip_frac", "grad_norm")}})
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            curve.append({"step": step + 1, "samples": (step + 1) * len(batch), **evaluate(model, heldout)})
    last = train_log[-max(1, len(train_log) // 5):]  # the last fifth of the run: KL and length estimates
    mean = (lambda k: sum(r[k] for r in last if r[k] is not None) / max(1, sum(r[k] is not None for r in last)))
    return {"method": method, "seed": seed, "curve": curve, "train": train_log,
            "final": curve[-1]["accuracy"], "final_sampled": curve[-1]["sampled"], "length": curve[-1]["length"],
            "kl": {k: mean(k) for k in ("k1", "k2", "k3", "exact_kl")}, "clip_frac": mean("clip_frac"),
            "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}


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


def run_table(cfg: TestbedConfig, out: Path, say=print, fresh: bool = False) -> tuple[list[dict], dict, dict]:
    """Pre-train (or load) the pair, then every method x seed; ``out/runs.jsonl`` grows as runs finish.

    Runs already in ``out/runs.jsonl`` with the same :meth:`TestbedConfig.run_key` are reused unless ``fresh``.
    """
    train, heldout = datasets(cfg)
    teacher, student, info = pretrain_pair(cfg, out, say)
    say(f"held-out accuracy ({len(heldout)} problems), greedy / mean@{EVAL_SAMPLES} at T=1: teacher "
        f"{100 * info['teacher']['accuracy']:.1f}% / {100 * info['teacher']['sampled']:.1f}%, student "
        f"{100 * info['student']['accuracy']:.1f}% / {100 * info['student']['sampled']:.1f}%")
    state = {k: v.clone() for k, v in student.state_dict().items()}
    methods = cfg.methods or METHODS
    key, path = cfg.run_key(), out / "runs.jsonl"
    done = {}
    if path.exists() and not fresh:  # runs of this exact config finished earlier (an interrupted table, a rerun)
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r.get("key") == key:
                done[(r["method"], r["seed"])] = r
    runs = []
    total = len(methods) * len(cfg.seeds)
    reused = sum((m, s) in done for s in cfg.seeds for m in methods)
    if reused:
        say(f"reusing {reused} of {total} runs from {path} (same config; --fresh recomputes)")
    with path.open("a" if not fresh else "w") as log:
        for seed in cfg.seeds:
            for method in methods:
                if (method, seed) in done:
                    runs.append(done[(method, seed)])
                    continue
                r = {"key": key, **rl_run(method, seed, state, teacher, cfg, train, heldout, say)}
                runs.append(r)
                log.write(json.dumps(r) + "\n")
                log.flush()
                say(f"[{len(runs)}/{total}] {method:13s} seed {seed}: held-out greedy "
                    f"{100 * r['curve'][0]['accuracy']:.1f}% -> {100 * r['final']:.1f}%, mean@{EVAL_SAMPLES} "
                    f"{100 * r['curve'][0]['sampled']:.1f}% -> {100 * r['final_sampled']:.1f}% in {cfg.steps} steps, "
                    f"length {r['length']:.2f}, exact KL {r['kl']['exact_kl']:.3f} ({r['seconds']:.0f}s, {r['cpu_seconds']:.0f}s CPU)")
    return runs, summarise(runs), info


PAPERS = ("KDRL paper (AIME/MATH averages): GRPO 54.6 < KD-RKL 56.1 < KDRL 56.8 < KDRL-annealing 57.2; "
          "RLAD paper: GRPO 51.2 < KDRL 55.1 < TRRD 57.8")


def write_docs(runs, summary, info, cfg: TestbedConfig, docs: Path, wall: float, cpu: float, command: str,
               note: str = "", say=print) -> Path:
    """``docs/testbed.png`` (curves) and ``docs/testbed.md`` (setup, table, orderings), regenerated each run."""
    docs.mkdir(parents=True, exist_ok=True)
    png = docs / "testbed.png"
    plot(runs, summary, info, png)
    betas = method_configs(cfg.steps)
    text = f"""# KD + RL testbed: GRPO, KD, KDRL and TRRD in minutes on a CPU

<!-- generated by `{command}`; rerun it to refresh this page and testbed.png -->

`python -m kdrl.testbed --docs docs` pre-trains a teacher and a student on a small reasoning task, then trains the
same student with every method, {len(cfg.seeds)} seeds each, through the trainer's own code: batched sampling ->
exact-match reward -> `kdrl.rollout.build_batch` (group-normalised advantages) -> teacher hidden states ->
`kdrl.train.backward_microbatches` (`kdrl_kernels.KDRLLoss`) -> AdamW. Checkpoints of the pre-trained pair are cached
in `results/testbed/pair-<hash>/`, every finished run is appended to `results/testbed/runs.jsonl`.

**Task.** Add four one-digit numbers and write every partial sum: `7+5+9+3=` -> `12;21;24<eos>`. Reward 1 if the
response ends with end-of-sequence and its last field is the sum, else 0. 16-symbol digit tokenizer,
{cfg.train_problems} training problems, {cfg.heldout_problems} held-out problems (disjoint),
evaluated greedily and by mean@{EVAL_SAMPLES} at temperature 1 (the same random stream for every model).

**Models** (transformers `LlamaConfig`, built here, no download). Teacher: {cfg.teacher_layers} layers,
d={cfg.teacher_hidden}, {info['teacher_params']:,} parameters, {cfg.teacher_sft_steps} SFT steps. Student:
{cfg.student_layers} layers, d={cfg.student_hidden}, {info['student_params']:,} parameters, {cfg.student_sft_steps}
SFT steps.

**RL.** {cfg.steps} steps x {cfg.prompts_per_step} prompts x {cfg.group_size} samples (temperature 1, fully
on-policy: one update per rollout), {cfg.optimizer} lr {cfg.lr} ({cfg.warmup_steps} warmup steps), gradient clip 1, token-mean aggregation, clip 0.2 (TRRD
0.2 / 0.28, alpha 0.5). The papers' beta (2e-3; annealed 5e-3 -> 1e-3) is tuned for long math answers where it
still moves the policy; here every beta is scaled by {BETA_SCALE:g}: KDRL constant beta {betas['kdrl']['beta']:g},
annealed max({betas['kdrl_anneal']['beta']:g} - {betas['kdrl_anneal']['beta_decay']:.4g} k, {betas['kdrl_anneal']['beta_min']:g})
(the floor at 2/3 of the run), shaping beta {betas['kdrl_shaping']['beta']:g}. KD uses beta 1. KL columns: per-token
means on the rollouts of the last fifth of each run, as `KDRLLoss` logs them (`exact_kl` is the full-vocabulary
reverse KL(student || teacher); k1/k2/k3 are its sample estimates on the sampled tokens).

![accuracy vs steps, vs samples, exact KL](testbed.png)

{markdown_table(summary, info)}

Accuracy after the last step on the held-out problems, mean ± standard error over seeds {list(cfg.seeds)}: greedy, and
mean@{EVAL_SAMPLES} at temperature 1 (the rollouts' distribution, the reward RL maximises; the papers report mean@k at a
temperature). Clip frac: share of response tokens whose ratio was clipped (last fifth of the run); fully on-policy it
is 0 except for TRRD, whose ratio is anchored to the teacher.
Response length: tokens including end-of-sequence, greedy, on the held-out set.

**Measured ordering**, greedy: {ordering(summary)}.

Mean@{EVAL_SAMPLES}: {ordering(summary, "sampled")}.

**Papers' ordering**: {PAPERS}.

**Time.** The {len(runs)} RL runs took {sum(r['seconds'] for r in runs) / 60:.1f} min wall clock in all,
{sum(r.get('cpu_seconds', r['seconds']) for r in runs) / 60:.1f} min of CPU time (one torch thread); pre-training the
pair adds about half a minute of CPU. The invocation that wrote this page took {wall / 60:.1f} min ({cpu / 60:.1f} min
CPU; runs already in `runs.jsonl` and the cached pair are reused). {note}

Note: on-policy (one update per rollout, ratio 1, clipping inert) KDRL's joint loss and its reward-shaping form give
the same per-token gradient, `(A + beta (t - s)) grad s`, up to rounding: over 40 steps their rows were identical;
over 120 the rounding differences change sampled tokens and the runs drift apart (within their standard errors).
With several updates per rollout they would differ by design (the ratio moves, and the clip treats the shaped
advantage differently).
"""
    md = docs / "testbed.md"
    md.write_text(text)
    say(f"wrote {png} and {md}")
    return md


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdrl.testbed", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/testbed", help="checkpoints of the pair and runs.jsonl")
    parser.add_argument("--docs", default=None, help="also write testbed.png and testbed.md into this folder")
    parser.add_argument("--note", default="", help="a sentence for testbed.md's timing paragraph (machine load)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--methods", default=None, help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--fresh", action="store_true", help="recompute runs found in runs.jsonl (not the pair)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest for these tiny models)")
    args = parser.parse_args(argv)
    say = (lambda msg: print(f"[kdrl.testbed +{time.perf_counter() - _T0:.1f}s] {msg}", flush=True))
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TestbedConfig(seeds=tuple(range(args.seeds)))
    if args.steps:
        cfg.steps = args.steps
    if args.methods:
        cfg.methods = tuple(args.methods.split(","))
        unknown = set(cfg.methods) - set(METHODS)
        if unknown:
            parser.error(f"unknown methods {sorted(unknown)}; choose from {','.join(METHODS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    say(f"writing to {out}/ (runs.jsonl, cached pre-trained pair)"
        + (f" and {args.docs}/testbed.png, {args.docs}/testbed.md" if args.docs else ""))
    start, cpu0 = time.perf_counter(), time.process_time()
    try:
        runs, summary, info = run_table(cfg, out, say, fresh=args.fresh)
    except KeyboardInterrupt:
        say(f"interrupted: finished runs are in {out}/runs.jsonl; the cached pair (if written) is kept")
        return 130
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    print(markdown_table(summary, info))
    say(f"ordering: {ordering(summary)}")
    if args.docs:
        write_docs(runs, summary, info, cfg, Path(args.docs), wall, cpu, f"python -m kdrl.testbed --docs {args.docs}"
                   + (" --note ..." if args.note else ""), args.note, say)
    say(f"done in {wall / 60:.1f} min ({cpu / 60:.1f} min CPU); runs in {out}/runs.jsonl")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on main() catches KeyboardInterrupt
    sys.exit(main())
