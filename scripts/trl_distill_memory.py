"""Peak memory of one distillation loss step: TRL 1.16's own loss against ``kdrl.integrations.trl_distill``'s, same inputs.

    python scripts/trl_distill_memory.py                       # defaults below; one JSON line per measurement
    python scripts/trl_distill_memory.py --tokens 4096 --dtypes float32 --betas 0.5

What is measured: the loss function each trainer calls on the backbones' outputs (TRL:
``trl.trainer.distillation_trainer._chunked_divergence_loss``; ours: ``kdrl.integrations.trl_distill.hidden_state_divergence``,
the divergence plus the entropy TRL logs), forward and backward, with the student's final hidden states ``(B, T, d)``
and lm_head weight as leaves that want gradients and the teacher's ``(B, T, d_t)`` and lm_head without. The backbones
themselves are not run (the same for both). Method as ``bench/memory.py``: each (implementation, dtype, beta) in a
fresh process, glibc told to serve allocations above 64 KiB with mmap (``MALLOC_MMAP_THRESHOLD_=65536``) so freed
buffers leave at once; after the inputs exist, the peak-RSS counter is reset (``/proc/self/clear_refs`` <- 5), VmRSS
read, the step run, and VmHWM read. ``extra_peak`` is VmHWM - VmRSS before; ``grads`` the bytes of the gradients the
step returns (dH and dW in the input dtype, the same for both), included in ``extra_peak``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(impl, dtype_name, beta, tokens, vocab, d_student, d_teacher, temperature, threads):
    import gc

    import torch
    torch.set_num_threads(threads)
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    batch = 2
    width = tokens // batch
    s_hidden = torch.randn(batch, width, d_student, generator=g).to(dtype).requires_grad_()
    t_hidden = torch.randn(batch, width, d_teacher, generator=g).to(dtype)
    s_weight = torch.nn.Parameter((0.05 * torch.randn(vocab, d_student, generator=g)).to(dtype))
    t_weight = (0.05 * torch.randn(vocab, d_teacher, generator=g)).to(dtype)
    lengths = torch.tensor([width, int(0.8 * width)])  # one full completion, one 20% padding
    mask = torch.arange(width)[None] < lengths[:, None]
    ids = torch.randint(0, vocab, (batch, width), generator=g)
    n_items = mask.sum().float()
    if impl == "trl":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        def step():
            loss, _, _ = _chunked_divergence_loss(s_hidden, t_hidden, s_weight, t_weight, mask.long(), beta,
                                                  num_items_in_batch=n_items, temperature=temperature)
            loss.backward()
            return loss
    else:
        from kdrl.integrations.trl_distill import hidden_state_divergence

        def step():
            loss, _, _ = hidden_state_divergence(s_hidden, s_weight, t_hidden, t_weight, mask, beta=beta,
                                                 temperature=temperature, num_items_in_batch=n_items,
                                                 completion_ids=ids)
            loss.backward()
            return loss
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS") * 1024
    start = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM") * 1024
    grads = s_hidden.grad.numel() * s_hidden.grad.element_size() + s_weight.grad.numel() * s_weight.grad.element_size()
    inputs = sum(x.numel() * x.element_size() for x in (s_hidden, t_hidden, s_weight, t_weight))
    return dict(impl=impl, dtype=dtype_name, beta=beta, tokens=tokens, loss_tokens=int(mask.sum()), vocab=vocab,
                d_student=d_student, d_teacher=d_teacher, temperature=temperature, loss=float(loss),
                extra_peak_mib=round((peak - before) / 2**20, 1), grads_mib=round(grads / 2**20, 1),
                inputs_mib=round(inputs / 2**20, 1), seconds=round(seconds, 1), threads=threads)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048, help="B x T positions (B = 2)")
    ap.add_argument("--vocab", type=int, default=151936, help="Qwen2.5's vocabulary")
    ap.add_argument("--d-student", type=int, default=896, help="Qwen2.5-0.5B")
    ap.add_argument("--d-teacher", type=int, default=1536, help="Qwen2.5-1.5B")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--betas", default="0.5,1.0")
    ap.add_argument("--impls", default="trl,kdrl")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--out", help="also append the JSON lines to this file")
    args = ap.parse_args(argv)
    shape = dict(tokens=args.tokens, vocab=args.vocab, d_student=args.d_student, d_teacher=args.d_teacher,
                 temperature=args.temperature, threads=args.threads)
    if args.child:
        print(json.dumps(child(args.impl, args.dtypes, float(args.betas), **shape)))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for dtype in args.dtypes.split(","):
        for beta in args.betas.split(","):
            for impl in args.impls.split(","):
                cmd = [sys.executable, __file__, "--child", "--impl", impl, "--dtypes", dtype, "--betas", beta,
                       *[f"--{k.replace('_', '-')}={v}" for k, v in shape.items()]]
                proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"{impl} {dtype} beta={beta} failed:\n{proc.stderr[-2000:]}")
                line = proc.stdout.strip().splitlines()[-1]
                print(line, flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(line + "\n")


if __name__ == "__main__":
    main()
