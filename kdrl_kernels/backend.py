"""Backend selection: Triton for CUDA tensors, the chunked PyTorch path elsewhere; and autocast handling.

An explicit ``backend=`` argument wins, then the environment variable ``KDRL_KERNELS_BACKEND``, then the device
of the inputs. Triton is imported lazily, so ``import kdrl_kernels`` works without it.

Autocast: inside ``torch.autocast(device, dtype)`` our ops treat their matmul operands as ``nn.Linear`` does there:
hidden states and lm_head weights are cast to the autocast dtype (a differentiable cast, so an fp32 parameter gets
an fp32 gradient), then the kernels run with autocast off, because they pick their own precision per op (fp32
softmax, bf16 GEMMs with fp32 outputs) and autocast would recast those ops. Biases are not cast: they are added to
the fp32 logits. Outside autocast, mixed dtypes stay an error (``validation.check_same_dtype``).
"""
from __future__ import annotations

import functools
import importlib.util
import os
from types import SimpleNamespace

import torch

ENV_VAR = "KDRL_KERNELS_BACKEND"
BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreter_enabled() -> bool:
    """True when Triton kernels run on the CPU through ``TRITON_INTERPRET=1`` (for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend, device) -> str:
    """Return ``"torch"`` or ``"triton"`` for tensors on ``device``; raise ValueError on impossible requests."""
    if backend is None:
        backend = "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package (pip install 'kdrl-kernels[triton]')")
        if device.type != "cuda" and not triton_interpreter_enabled():
            raise ValueError(f"backend='triton' needs CUDA tensors, got tensors on {device}; "
                             "use backend='torch' on CPU (or set TRITON_INTERPRET=1 to run kernels for testing)")
    return backend


_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)  # autocast leaves float64 alone, as it does for nn.Linear


def autocast_dtype(device):
    """The dtype an enclosing ``torch.autocast`` gives matmuls on ``device`` (a torch.device), or None outside one."""
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except (RuntimeError, ValueError):  # a device type autocast does not know
        return None
    return torch.get_autocast_dtype(device.type) if enabled else None


def autocast_inputs(device, *tensors):
    """``tensors`` (None allowed) cast to the autocast dtype of ``device`` when an autocast region is active."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.dtype in _CASTABLE else t for t in tensors)


def no_autocast(device):
    """A context in which autocast is off for ``device``'s type (our kernels choose each op's precision)."""
    return torch.autocast(device.type, enabled=False)


def _drop(fn, *names):
    """``fn`` accepting and ignoring the keywords ``names`` (hints only the PyTorch path can use)."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        for name in names:
            kwargs.pop(name, None)
        return fn(*args, **kwargs)
    return call


@functools.lru_cache(maxsize=None)
def _triton_impl():
    # The kernels always produce the entropy and every gradient, so the PyTorch path's skip hints are dropped.
    from .triton import kl, logprobs
    return SimpleNamespace(logprobs_forward=_drop(logprobs.logprobs_forward, "need_entropy"),
                           logprobs_backward=_drop(logprobs.logprobs_backward, "needs"),
                           kl_forward=kl.kl_forward, kl_backward=_drop(kl.kl_backward, "needs"))


def get_impl(backend: str, chunk_size=None):
    """The module-like object implementing the backend contract of docs/DESIGN.md for ``backend``.

    Every backend accepts the same keywords: ``need_entropy`` (forward) and ``needs`` (backward: which of hidden,
    weight, bias want gradients) are skip hints that the PyTorch path honours and the Triton path ignores.
    """
    if backend == "triton":
        return _triton_impl()
    from . import chunked
    bind = functools.partial
    return SimpleNamespace(
        logprobs_forward=bind(chunked.logprobs_forward, chunk_size=chunk_size),
        logprobs_backward=bind(chunked.logprobs_backward, chunk_size=chunk_size),
        kl_forward=bind(chunked.kl_forward, chunk_size=chunk_size),
        kl_backward=bind(chunked.kl_backward, chunk_size=chunk_size))
