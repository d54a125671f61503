"""One lm_head on the PyTorch path: fp32-quality logits of a chunk, and the chunk's gradient matmuls.

Precision policy (the backend contract: logits are never rounded to a low-precision dtype):
- fp32 and fp16 weights: an fp32 copy of the weight and fp32 matmuls.
- bf16 weights on CPU: **compensated bf16 matmuls**. CPU torch has no bf16 x bf16 -> fp32-output GEMM, but its bf16
  GEMM accumulates in fp32 before rounding, and ``addmm(C, h, W.T, beta=-1)`` rounds ``h W^T - C`` from that
  accumulator. So ``hi = round(h W^T)`` and ``lo = round(h W^T - hi)`` are two bf16 GEMMs whose sum carries about
  16 mantissa bits, where one fp32 GEMM cost 2.3-3x a bf16 one here (AMD EPYC, 2 threads, (512 x 896) x
  (896 x 151,936): 1.28 s against 0.56 s).
  The target column is then recomputed exactly (an fp32 dot per row): measured against float64 at V = 151,936,
  T = 0.7, the log-prob error falls from 1e-2..1e-1 (bf16 logits) to at most ~2e-5 (fp32 GEMM: ~2e-6).
  The gradient matmuls take ``dz`` rounded to bf16, as bf16 autograd and the Triton kernels do; ``dW`` is summed
  over chunks by the GEMM into the bf16 gradient, folded into fp32 every few chunks (``chunked._Accumulator``).
"""
from __future__ import annotations

import torch

__all__ = ["Head", "add_bf16_", "compensated"]

_ADD_ROWS = 8     # rows per fp32 staging slab of add_bf16_


def compensated(weight) -> bool:
    """bf16 weights on CPU take the compensated bf16 path (logits here, dW accumulation in chunked._Accumulator)."""
    return weight.dtype == torch.bfloat16 and weight.device.type == "cpu"


def add_bf16_(dst, src, staging):
    """``dst += src`` for fp32 ``dst`` and bf16 ``src`` ``(r, n)``, through an fp32 ``(k, n)`` staging buffer.

    torch's mixed-dtype ``add_`` takes a slow path on CPU (measured 3x slower than a bf16 -> fp32 copy into a small
    cache-resident buffer followed by an fp32 add).
    """
    k = staging.shape[0]
    for r0 in range(0, dst.shape[0], k):
        n = min(k, dst.shape[0] - r0)
        dst[r0:r0 + n].add_(staging[:n].copy_(src[r0:r0 + n]))
    return dst


class Head:
    """weight ``(V, d)``, bias ``(V,)`` or None, for chunks of hidden ``(c, d)`` in the weight's dtype."""

    def __init__(self, weight, bias, temperature=1.0):
        self.compensated = compensated(weight)
        self.weight = weight if self.compensated else weight.float()
        self.bias = None if bias is None else bias.float()
        self.temperature = temperature

    @property
    def scratch_buffers(self) -> int:
        """fp32-sized ``(rows, V)`` buffers this head needs besides the caller's (two bf16 ones = one fp32)."""
        return 1 if self.compensated else 0

    def logits(self, ws, h, out, targets=None):
        """fp32 logits ``(h @ W.T + b) / T`` ``(c, V)`` written into ``out``; ``ws`` holds the bf16 scratch.

        ``targets`` ``(c,)`` int64: columns whose logit is recomputed exactly (the compensated path's only error
        that does not average out over the vocabulary is the one in the target logit itself).
        """
        if self.compensated:
            n = h.shape[0]
            hi = torch.mm(h, self.weight.T, out=ws.take("hi", n, torch.bfloat16))
            lo = torch.addmm(hi, h, self.weight.T, beta=-1, out=ws.take("lo", n, torch.bfloat16))
            out.copy_(hi)
            add_bf16_(out, lo, ws.scratch("stage_z", (_ADD_ROWS, out.shape[1]), torch.float32))
            if targets is not None:
                exact = torch.einsum("cd,cd->c", h.float(), self.weight[targets].float())
                out.scatter_(1, targets[:, None], exact[:, None])
        else:
            torch.matmul(h.float(), self.weight.T, out=out)
        if self.bias is not None:
            out += self.bias
        if self.temperature != 1.0:
            out /= self.temperature
        return out

    def backprop(self, ws, dz, h, idx, grad_hidden, grad_weight32, grad_bias32):
        """Add one chunk's logit gradient dz ``(c, V)`` fp32 to the gradients (``dz`` already over T)."""
        if grad_bias32 is not None:
            grad_bias32 += dz.sum(0)
        if not self.compensated:
            if grad_hidden is not None:
                grad_hidden[idx] = (dz @ self.weight).to(grad_hidden.dtype)
            if grad_weight32 is not None:
                grad_weight32.add_product(dz.T, h.float())
            return
        dzb = ws.take("hi", dz.shape[0], torch.bfloat16).copy_(dz)
        if grad_hidden is not None:
            grad_hidden[idx] = (dzb @ self.weight).to(grad_hidden.dtype)
        if grad_weight32 is not None:
            grad_weight32.add_product(dzb.T, h)
