"""Time the trainer's two teacher paths on one rollout-sized batch, and check that they agree.

    python scripts/teacher_timing.py                      # the Qwen pair's 1.5B teacher, 8 responses x 384 tokens
    python scripts/teacher_timing.py --teacher smollm2-135m-instruct --tokens 64

(a) ``model.teacher_backend=hf``: the teacher's final hidden states in micro-batches, then
    ``fused_linear_logprobs`` (what ``Trainer.teacher_signal`` does when the exact KL is not logged);
(b) ``model.teacher_backend=vllm``: one ``prompt_logprobs`` request per response to a vLLM engine
    (``kdrl.trainer.teacher.VLLMTeacher``).
The batch is GSM8K-train prompts in the chat template with their reference solutions as responses, cut or
repeated to ``--tokens`` tokens (the scoring cost depends on lengths, not on who wrote the tokens). Each path is
warmed up once and timed ``--repeats`` times; medians are printed. Needs vLLM (``bash scripts/setup_eval.sh``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time


def build_batch(tokenizer, n: int, tokens: int, group: int):
    from kdrl.data import load_task
    from kdrl.prompts import build_messages
    from kdrl.trainer.rollout import build_batch as pack
    problems = load_task("gsm8k_train", limit=n // group)
    prompts, groups = [], []
    for p in problems:
        text = tokenizer.apply_chat_template(build_messages(p.question), tokenize=False, add_generation_prompt=True)
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        solution = tokenizer(p.meta.get("solution", p.answer), add_special_tokens=False)["input_ids"]
        row = (solution * (tokens // max(1, len(solution)) + 1))[:tokens]
        groups.append([row[:tokens - 7 * j] for j in range(group)])  # slightly different lengths, as sampled ones
    flags = [[False] * group for _ in groups]
    return pack(prompts, groups, flags, flags, pad_id=tokenizer.pad_token_id or 0, scale_advantages=True)


def timed(fn, repeats: int):
    fn()  # warm-up (allocations, first-call compilation)
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--responses", type=int, default=8, help="rollout responses (prompts x group size)")
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=384, help="response tokens of the longest response")
    ap.add_argument("--micro-batch", type=int, default=4, help="the torch path's optim.micro_batch_size")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the hf path")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if args.responses % args.group:
        ap.error("--responses must be a multiple of --group")
    import torch

    from kdrl.generation import vllm_available
    from kdrl.models import load_model_and_tokenizer, resolve_model
    from kdrl.trainer.step import hidden_states
    from kdrl_kernels import fused_linear_logprobs
    if not vllm_available():
        print("teacher_timing: vLLM is not importable; set it up with `bash scripts/setup_eval.sh`", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    path = resolve_model(args.teacher)
    model, tok = load_model_and_tokenizer(path, dtype=torch.bfloat16)
    model.requires_grad_(False).eval()
    batch = build_batch(tok, args.responses, args.tokens, args.group)
    n_tok = int(batch.mask.sum())
    weight = model.get_output_embeddings().weight

    @torch.no_grad()
    def torch_path():
        mb = args.micro_batch
        return torch.cat([fused_linear_logprobs(hidden_states(model, p), weight, p.targets.masked_fill(~p.mask, -100))
                          for p in (batch.rows(i, i + mb) for i in range(0, len(batch), mb))])

    t_hf, all_hf, lp_hf = timed(torch_path, args.repeats)
    print(f"hf   (torch {torch.__version__}, {args.threads} threads, micro-batch {args.micro_batch}): "
          f"{t_hf:.2f} s median of {[round(t, 2) for t in all_hf]}", flush=True)
    del model
    from kdrl.trainer.teacher import VLLMTeacher
    t0 = time.perf_counter()
    engine = VLLMTeacher(path, dtype="bfloat16", progress=False)
    start = time.perf_counter() - t0
    t_vl, all_vl, lp_vl = timed(lambda: engine.logprobs(batch), args.repeats)
    info = engine.info()
    print(f"vllm ({info['vllm']}, engine start {start:.1f} s): {t_vl:.2f} s median of {[round(t, 2) for t in all_vl]}")
    diff = (lp_hf - lp_vl).abs()[batch.mask]
    print(f"\n{args.responses} responses, {n_tok} response tokens, prompts {batch.prompt_width} wide, teacher "
          f"{args.teacher} (bf16)")
    print("| teacher path | s per step (median) | response tokens / s |")
    print("| --- | ---: | ---: |")
    print(f"| hf: hidden states + fused_linear_logprobs | {t_hf:.2f} | {n_tok / t_hf:.0f} |")
    print(f"| vllm: prompt_logprobs | {t_vl:.2f} | {n_tok / t_vl:.0f} |")
    print(f"agreement: max |hf - vllm| {float(diff.max()):.3g}, mean {float(diff.mean()):.3g} nats per token "
          "(two bf16 implementations)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
