"""The testbed's task and models: add four one-digit numbers writing every partial sum, tiny Llama models,
supervised pre-training, batched sampling and held-out evaluation (greedy and mean@8)."""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch

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
