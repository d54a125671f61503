"""A KD + RL testbed that learns in minutes on a CPU: ``python -m kdrl.testbed``.

Task: add four one-digit numbers, writing every partial sum, e.g. ``7+5+9+3=`` -> ``12;21;24`` then
end-of-sequence (three chained additions, nine tokens). Reward 1 when the text after the last ``;`` equals the true sum (exact match),
else 0. A digit-level tokenizer (16 symbols) and tiny Llama models built from a config are trained here:
a teacher pre-trained by supervised learning to be good but imperfect, and a smaller student stopped early.

From the same student every method runs through the trainer's own chain: batched sampling -> exact-match
reward -> :func:`kdrl.trainer.rollout.build_batch` (group-normalised advantages) -> teacher hidden states ->
:func:`kdrl.trainer.step.backward_microbatches` (``kdrl_kernels.KDRLLoss``, with the exact KL logged beside k1/k2/k3) ->
AdamW step. Held-out accuracy (greedy, and mean@8 at temperature 1) is measured every few steps. Results go to ``results/testbed/``
(checkpoints of the pre-trained pair are cached there) and, with ``--docs``, to ``docs/testbed.md`` and
``docs/testbed.png``.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kdrl.testbed.report import markdown_table, ordering, plot, summarise
from kdrl.testbed.task import (EVAL_SAMPLES, INIT_STD, PAD, Problem, build_model, correct, evaluate, make_problems,
                               sample, sft)
from kdrl.trainer.rollout import PromptSampler, build_batch, rollout_metrics
from kdrl.trainer.step import backward_microbatches, hidden_states, kd_groups_whole, optimizer_step
from kdrl_kernels import KDRLConfig, KDRLLoss, registry

__all__ = ["TestbedConfig", "quick_config", "METHODS", "datasets", "pretrain_pair", "rl_run", "run_table", "main"]

_T0 = time.perf_counter()


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


def method_config(method: str, steps: int) -> dict:
    """The KDRLConfig fields of ``method``: a named method of the table, or any objective registered in
    ``kdrl_kernels.registry`` (then with the table's constant beta)."""
    named = method_configs(steps)
    if method in named:
        return named[method]
    if method in registry.OBJECTIVES:
        return dict(objective=method, beta=2e-3 * BETA_SCALE)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)} or a registered objective "
                     f"({', '.join(sorted(registry.OBJECTIVES))})")


def rl_run(method: str, seed: int, student_state: dict, teacher, cfg: TestbedConfig, train, heldout,
           say=print) -> dict:
    """One run from the pre-trained student; returns its curve (held-out accuracy every ``eval_every`` steps)."""
    torch.manual_seed(seed)
    model = build_model(cfg.student_hidden, cfg.student_layers, seed=0)
    model.load_state_dict(student_state)
    model.eval()  # no dropout anyway; eval() keeps sampling and training on the same function
    lc = KDRLConfig(**method_config(method, cfg.steps), log_exact_kl=True, compute_entropy=False)
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
        m = backward_microbatches(model, loss_fn, batch, micro_batch_size=cfg.micro_batch_size,
                                  teacher_hidden=t_hidden, teacher_weight=t_weight, step=step)
        m["grad_norm"] = optimizer_step(opt, model.parameters(), lr=cfg.lr, step=step,
                                        warmup_steps=cfg.warmup_steps, grad_clip=1.0)
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
exact-match reward -> `kdrl.trainer.rollout.build_batch` (group-normalised advantages) -> teacher hidden states ->
`kdrl.trainer.step.backward_microbatches` (`kdrl_kernels.KDRLLoss`) -> AdamW. Checkpoints of the pre-trained pair are cached
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
        unknown = set(cfg.methods) - set(METHODS) - set(registry.OBJECTIVES)
        if unknown:
            parser.error(f"unknown methods {sorted(unknown)}; choose from {','.join(METHODS)} or a registered "
                         f"objective ({','.join(sorted(registry.OBJECTIVES))})")
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
