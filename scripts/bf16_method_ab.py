"""Paired A/B of the two CPU bf16 methods of kdrl_kernels.heads inside KDRLLoss, with naive in the same process.

    python3 scripts/bf16_method_ab.py [--cases kdrl-smol grpo-smol rkl-smol kdrl-qwen] [--rounds 5]

Each round runs one step (forward + backward, bench/providers.py) of naive, ours with ``single`` and ours with
``compensated`` (KDRL_KERNELS_BF16_GEMM is read when each head is built), in rotating order; medians after one
warm-up step each. On a machine with other jobs running the absolute times move, the ratios within a round much less;
each line gives the median of the per-round ratios too.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch  # noqa: E402

from bench import providers, workloads  # noqa: E402
from kdrl_kernels.heads import BF16_GEMM_ENV  # noqa: E402

CASES = {"kdrl-smol": ("kdrl", "smollm2-135m/360m", 512), "grpo-smol": ("grpo", "smollm2-135m/360m", 512),
         "rkl-smol": ("rkl", "smollm2-135m/360m", 512), "kdrl-qwen": ("kdrl", "qwen2.5-0.5b/1.5b", 2048)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    naive, ours = providers.Naive(), providers.OursKDRLLoss()
    for name in args.cases:
        workload, model, n = CASES[name]
        case = workloads.make_case(workload, model, n, "bfloat16")
        inp = workloads.make_inputs(case)
        runs = {"naive": lambda: naive.step(inp, case), "single": lambda: ours_step("single"),
                "compensated": lambda: ours_step("compensated")}

        def ours_step(method):
            os.environ[BF16_GEMM_ENV] = method
            try:
                return ours.step(inp, case)
            finally:
                os.environ.pop(BF16_GEMM_ENV, None)

        times = {k: [] for k in runs}
        order = list(runs)
        for r in range(args.rounds + 1):
            for k in order:
                inp.zero_grads()
                t0 = time.perf_counter()
                runs[k]()
                if r:
                    times[k].append(time.perf_counter() - t0)
            order = order[1:] + order[:1]
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))  # noqa: E731
        print(f"{name}: naive {med['naive']:.3f} s, single {med['single']:.3f} s, compensated "
              f"{med['compensated']:.3f} s | per-round ratios: single/naive {ratio('single', 'naive'):.2f}, "
              f"compensated/naive {ratio('compensated', 'naive'):.2f}, single/compensated "
              f"{ratio('single', 'compensated'):.2f} | load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
