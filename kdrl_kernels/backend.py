"""Backend selection: Triton for CUDA tensors, the chunked PyTorch path elsewhere.

An explicit ``backend=`` argument wins, then the environment variable ``KDRL_KERNELS_BACKEND``, then the device
of the inputs. Triton is imported lazily, so ``import kdrl_kernels`` works without it.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from types import SimpleNamespace

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
