"""Probe: ways to fp32 logits from bf16 hidden states and a bf16 lm_head on CPU, one chunk at a time.

Times, paired and alternating in one process (median after a warm-up), for a chunk ``h`` ``(c, d)`` against ``W``
``(V, d)``, all bf16:
  bf16      one bf16 GEMM, bf16 output (the accuracy class we refuse: 8 mantissa bits)
  comp      the compensated pair hi + lo, summed into fp32 (kdrl_kernels.heads today)
  flag      one fp32 GEMM with torch.backends.mkldnn.matmul.fp32_precision = "bf16" on the upcast values
            (exact: bf16 -> fp32 loses nothing), W's fp32 form made once (not timed; its memory is reported)
  flagblk   the same, W converted to fp32 block by block into a small buffer per call (timed)
  fp32      one plain fp32 GEMM
Error: max |logit - float64 logit| over the chunk. Usage: python3 scripts/bf16_gemm_probe.py [reps]
"""
import statistics
import sys
import time

import torch

sys.path.insert(0, ".")
from kdrl_kernels.chunked import Workspace  # noqa: E402
from kdrl_kernels.heads import add_bf16_  # noqa: E402


def comp(h, w, out, ws):
    n = h.shape[0]
    hi = torch.mm(h, w.T, out=ws.take("hi", n, torch.bfloat16))
    lo = torch.addmm(hi, h, w.T, beta=-1, out=ws.take("lo", n, torch.bfloat16))
    out.copy_(hi)
    add_bf16_(out, lo, ws.scratch("stage", (8, out.shape[1]), torch.float32))


def flag(h32, w32, out):
    prev = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        torch.mm(h32, w32.T, out=out)
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = prev


def flagblk(h, w, out, blk, buf):
    prev = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        h32 = h.float()
        for v0 in range(0, w.shape[0], blk):
            v1 = min(v0 + blk, w.shape[0])
            wb = buf[:v1 - v0].copy_(w[v0:v1])
            torch.mm(h32, wb.T, out=out[:, v0:v1])
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = prev


def main():
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}")
    for c, d, V in ((128, 576, 49152), (128, 960, 49152), (165, 896, 151936), (165, 1536, 151936),
                    (512, 896, 151936)):
        h = (torch.randn(c, d) * 2).bfloat16()
        w = (torch.randn(V, d) * 0.05).bfloat16()
        ref = h.double() @ w.double().T
        ws = Workspace(c, V, "cpu")
        out = torch.empty(c, V)
        w32 = w.float()
        h32 = h.float()
        buf = torch.empty(2048, d)
        fns = {
            "bf16": lambda: torch.mm(h, w.T, out=ws.take("hi", c, torch.bfloat16)),
            "comp": lambda: comp(h, w, out, ws),
            "flag": lambda: flag(h32, w32, out),
            "flagblk": lambda: flagblk(h, w, out, 2048, buf),
            "fp32": lambda: torch.mm(h32, w32.T, out=out),
        }
        errs = {}
        for name, fn in fns.items():
            fn()
            got = ws.take("hi", c, torch.bfloat16) if name == "bf16" else out
            errs[name] = (got.double() - ref).abs().max().item()
        times = {k: [] for k in fns}
        for _ in range(reps):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\n(c={c} x d={d}) x V={V}: W fp32 copy {w32.numel() * 4 / 2**20:.0f} MiB")
        for name in fns:
            print(f"  {name:8s} {med[name] * 1e3:8.1f} ms  ({med[name] / med['comp']:.2f}x comp)"
                  f"  max|err| {errs[name]:.2e}")
    print(f"flag restored: {torch.backends.mkldnn.matmul.fp32_precision!r}")


if __name__ == "__main__":
    main()
