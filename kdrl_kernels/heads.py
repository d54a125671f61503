"""One lm_head on the PyTorch path: fp32-quality logits of a chunk, and the chunk's gradient matmuls.

Precision policy (the backend contract: logits are never rounded to a low-precision dtype). A head's ``method``:
- ``"fp32"``: fp32 and fp16 weights: an fp32 copy of the weight and fp32 matmuls.
- ``"single"`` (bf16 weights of at most :data:`SINGLE_MAX_WEIGHT_BYTES` on CPUs with AMX): **one GEMM with an fp32
  output**. oneDNN runs an fp32 matmul with bf16 inputs and fp32 accumulation when
  ``torch.backends.mkldnn.matmul.fp32_precision == "bf16"``; on bf16 values upcast to fp32 (exact) that is the
  bf16 x bf16 -> fp32 GEMM CPU torch otherwise lacks. The weight is upcast one vocabulary block at a time into the
  chunk's scratch buffer (no fp32 copy of the weight exists). Logit error against float64: fp32-GEMM class (4.6e-6
  measured where fp32 gives 5.8e-6). The flag is process-global: see :func:`_bf16_fpmath`.
- ``"compensated"`` (larger bf16 weights, and CPUs without AMX): CPU torch's bf16 GEMM accumulates in fp32 before
  rounding, and ``addmm(C, h, W.T, beta=-1)`` rounds ``h W^T - C`` from that accumulator. So ``hi = round(h W^T)``
  and ``lo = round(h W^T - hi)`` are two bf16 GEMMs whose sum carries about 16 mantissa bits; the target column is
  then recomputed exactly (an fp32 dot per row). Log-prob error at V = 151,936, T = 0.7: at most ~2e-5.
- ``"out_dtype"`` (bf16 weights on CUDA, torch with ``mm(..., out_dtype=)``): one bf16 GEMM with an fp32 output.

The rule, measured on a 2-core Xeon with AMX (torch 2.13.0+cpu, 2 threads). Paired bench steps in one process
(``scripts/bf16_method_ab.py``), single / compensated, quiet machine: SmolLM2 KDRL 0.90x, GRPO 0.87x, exact KL 0.91x,
Qwen KDRL 1.17x; beside other low-priority jobs 0.64-0.87x and 0.83x. On a 2-core AMD EPYC (avx512_bf16, no AMX) the
flag's GEMM on a whole fp32 weight took 0.82 s where one bf16 GEMM took 0.43 s ((512 x 896) x 151,936), about the
pair's two GEMMs before the upcast added here; not timed there with this code, so CPUs without AMX keep the pair.
``KDRL_KERNELS_BF16_GEMM=single|compensated|auto`` overrides the rule.
The gradient matmuls of every bf16 method take ``dz`` rounded to bf16, as bf16 autograd and the Triton kernels do;
``dW`` is summed over chunks by the GEMM into the bf16 gradient, folded into fp32 every few chunks
(``chunked._Accumulator``).
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch

__all__ = ["Head", "add_bf16_", "bf16_gemms", "head_method", "BF16_GEMM_ENV", "BF16_CPU_METHODS",
           "SINGLE_MAX_WEIGHT_BYTES"]

_ADD_ROWS = 8     # rows per fp32 staging slab of add_bf16_
BF16_GEMM_ENV = "KDRL_KERNELS_BF16_GEMM"
BF16_CPU_METHODS = ("auto", "single", "compensated")
# The single GEMM upcasts the whole weight once per chunk. Measured on the AMX Xeon (paired bench steps, quiet): with
# SmolLM2 heads (57 and 94 MB in bf16) it beat the pair (0.87-0.91x its step time); with Qwen2.5 0.5B/1.5B heads (272
# and 467 MB, beyond the caches) it lost (1.17x): there the extra pass over the weight costs more than the second GEMM.
SINGLE_MAX_WEIGHT_BYTES = 128 * 2**20


@functools.lru_cache(maxsize=None)
def single_gemm_available() -> bool:
    """torch exposes oneDNN's bf16 fpmath flag for fp32 matmuls (torch >= 2.9 built with oneDNN)."""
    mkldnn = torch.backends.mkldnn
    return mkldnn.is_available() and hasattr(getattr(mkldnn, "matmul", None), "fp32_precision")


@functools.lru_cache(maxsize=None)
def _has_amx() -> bool:
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch 2.13; absent means "unknown"
    return bool(probe()) if probe is not None else False


@functools.lru_cache(maxsize=None)
def _cuda_out_dtype() -> bool:
    """``torch.mm(a, b, out_dtype=torch.float32, out=c)``, the form :meth:`Head.logits` uses, works for bf16 CUDA
    tensors (checked once, on the GPU; torch 2.13 has ``aten::mm.dtype_out``)."""
    try:
        a = torch.ones(2, 2, dtype=torch.bfloat16, device="cuda")
        c = torch.empty(2, 2, dtype=torch.float32, device="cuda")
        torch.mm(a, a, out_dtype=torch.float32, out=c)
        return bool((c == 2).all())
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def head_method(weight) -> str:
    """``"fp32"``, ``"single"``, ``"compensated"`` or ``"out_dtype"`` for an lm_head ``weight`` (module docstring)."""
    if weight.dtype != torch.bfloat16:
        return "fp32"
    if weight.device.type == "cuda":
        return "out_dtype" if _cuda_out_dtype() else "fp32"
    if weight.device.type != "cpu":
        return "fp32"
    choice = os.environ.get(BF16_GEMM_ENV, "auto") or "auto"
    if choice not in BF16_CPU_METHODS:
        raise ValueError(f"{BF16_GEMM_ENV} must be one of {BF16_CPU_METHODS}, got {choice!r}")
    if choice == "auto":
        small = weight.numel() * weight.element_size() <= SINGLE_MAX_WEIGHT_BYTES
        choice = "single" if _has_amx() and small else "compensated"
    if choice == "single" and not single_gemm_available():
        return "compensated"
    return choice


def bf16_gemms(weight) -> bool:
    """The head's gradient matmuls run in bf16 (dz rounded to bf16; dW summed in bf16, see chunked._Accumulator)."""
    return head_method(weight) != "fp32"


# Serialises our own changes of the global flag: two threads each saving and restoring it could otherwise leave it
# changed (A sets, B saves "bf16", A restores, B restores "bf16"). It cannot protect a user's thread that runs an fp32
# matmul of its own while one of our GEMMs holds the flag: that matmul would then run with bf16 inputs. The flag is
# held for one GEMM at a time to keep that window short; KDRL_KERNELS_BF16_GEMM=compensated avoids it altogether.
_FLAG_LOCK = threading.Lock()


@contextlib.contextmanager
def _bf16_fpmath():
    """``torch.backends.mkldnn.matmul.fp32_precision = "bf16"`` for the body only, restored on any exit."""
    matmul = torch.backends.mkldnn.matmul
    with _FLAG_LOCK:
        before = matmul.fp32_precision
        matmul.fp32_precision = "bf16"
        try:
            yield
        finally:
            matmul.fp32_precision = before


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

    def __init__(self, weight, bias, temperature=1.0, method=None):
        self.method = method or head_method(weight)
        self.low = self.method != "fp32"
        self.weight = weight if self.low else weight.float()
        self.bias = None if bias is None else bias.float()
        self.temperature = temperature

    @property
    def scratch_buffers(self) -> int:
        """fp32-sized ``(rows, V)`` buffers this head needs besides the caller's: one for the bf16 methods (the
        compensated pair's two bf16 products or the single GEMM's upcast weight blocks, then the bf16 dz of
        backprop), none for fp32."""
        return 1 if self.low else 0

    def _scratch(self, ws):
        """The fp32 ``(rows, V)`` scratch shared by both heads of a step (they take turns with it)."""
        return ws.take("scratch", ws.rows)

    def logits(self, ws, h, out, targets=None):
        """fp32 logits ``(h @ W.T + b) / T`` ``(c, V)`` written into ``out``; ``ws`` holds the scratch.

        ``targets`` ``(c,)`` int64: columns whose logit the compensated method recomputes exactly (its only error
        that does not average out over the vocabulary is the one in the target logit itself).
        """
        if self.method == "single":
            self._single_gemm(ws, h, out)
        elif self.method == "compensated":
            self._compensated(ws, h, out, targets)
        elif self.method == "out_dtype":
            torch.mm(h, self.weight.T, out_dtype=torch.float32, out=out)
        else:
            torch.matmul(h.float(), self.weight.T, out=out)
        if self.bias is not None:
            out += self.bias
        if self.temperature != 1.0:
            out /= self.temperature
        return out

    def _single_gemm(self, ws, h, out):
        # Weight blocks as large as the scratch allows (a few thousand to tens of thousands of rows): each block is one
        # upcast and one GEMM, and every op costs a thread synchronisation that a busy 2-core machine makes expensive.
        vocab, d = self.weight.shape
        flat = self._scratch(ws).view(-1)
        block = max(1, min(vocab, flat.numel() // d))
        buf = flat[:block * d].view(block, d) if flat.numel() >= d else ws.scratch("wblock", (1, d), torch.float32)
        h32 = h.float()
        for v0 in range(0, vocab, block):
            v1 = min(v0 + block, vocab)
            wb = buf[:v1 - v0].copy_(self.weight[v0:v1])
            with _bf16_fpmath():
                torch.mm(h32, wb.T, out=out[:, v0:v1])

    def _compensated(self, ws, h, out, targets):
        n = h.shape[0]
        pair = self._scratch(ws).view(-1).view(torch.bfloat16)  # two bf16 (rows, V) halves
        half = ws.rows * out.shape[1]
        hi = torch.mm(h, self.weight.T, out=pair[:n * out.shape[1]].view(n, -1))
        lo = torch.addmm(hi, h, self.weight.T, beta=-1, out=pair[half:half + n * out.shape[1]].view(n, -1))
        out.copy_(hi)
        add_bf16_(out, lo, ws.scratch("stage_z", (_ADD_ROWS, out.shape[1]), torch.float32))
        if targets is not None:
            exact = torch.einsum("cd,cd->c", h.float(), self.weight[targets].float())
            out.scatter_(1, targets[:, None], exact[:, None])

    def backprop(self, ws, dz, h, idx, grad_hidden, grad_weight32, grad_bias32):
        """Add one chunk's logit gradient dz ``(c, V)`` fp32 to the gradients (``dz`` already over T)."""
        if grad_bias32 is not None:
            grad_bias32 += dz.sum(0)
        if not self.low:
            if grad_hidden is not None:
                grad_hidden[idx] = (dz @ self.weight).to(grad_hidden.dtype)
            if grad_weight32 is not None:
                grad_weight32.add_product(dz.T, h.float())
            return
        n = dz.shape[0]
        dzb = self._scratch(ws).view(-1).view(torch.bfloat16)[:dz.numel()].view(n, -1).copy_(dz)
        if grad_hidden is not None:
            grad_hidden[idx] = (dzb @ self.weight).to(grad_hidden.dtype)
        if grad_weight32 is not None:
            grad_weight32.add_product(dzb.T, h)
