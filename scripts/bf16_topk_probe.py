"""Accuracy probe: bf16 GEMM logits with only the target and the top-k logits (student's and teacher's) recomputed
exactly, against float64, beside the fp32 GEMM, on the precision test's flat / bench-like / spread-out / peaked rows
(V = 151,936, T = 0.7). Prints the max error per row kind of the target log-prob, the entropy and the exact reverse KL.

    python scripts/bf16_topk_probe.py        # seconds to a minute on 2 cores
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_kernels_bf16_precision import T, make  # noqa: E402

KINDS = ("flat", "std2", "medium", "peaked")


def stats(z, targets, zt):
    logp = torch.log_softmax(z / T, 1)
    p = logp.exp()
    logq = torch.log_softmax(zt / T, 1)
    return dict(logp=logp.gather(1, targets[:, None]).squeeze(1), entropy=-(p * logp).sum(1),
                kl=(p * (logp - logq)).sum(1))


def fix(z, h, w, cols):
    """Overwrite the logits at ``cols`` ``(c, k)`` with exact fp32 dot products."""
    return z.scatter_(1, cols, torch.einsum("cd,ckd->ck", h.float(), w[cols].float()))


def main():
    h, w, targets = (x.detach() for x in make(0, 12))
    ht, wt, _ = (x.detach() for x in make(1, 12))
    gt = stats(h.double() @ w.double().T, targets, ht.double() @ wt.double().T)

    def report(name, s):
        cells = []
        for key, val in s.items():
            err = (val.double() - gt[key]).abs().view(len(KINDS), -1).max(1).values
            cells.append(f"{key} " + " ".join(f"{x:.0e}" for x in err))
        print(f"{name:12s}", " | ".join(cells))

    print("max |error| vs float64 per row kind", KINDS)
    report("fp32 GEMM", stats(h.float() @ w.float().T, targets, ht.float() @ wt.float().T))
    for k in (32, 128, 256, 512):
        zs, zt = torch.mm(h, w.T).float(), torch.mm(ht, wt.T).float()
        cols = torch.cat([targets[:, None], zs.topk(k, 1).indices, zt.topk(k, 1).indices], 1)
        report(f"bf16 top{k}", stats(fix(zs, h, w, cols), targets, fix(zt, ht, wt, cols)))


if __name__ == "__main__":
    main()
