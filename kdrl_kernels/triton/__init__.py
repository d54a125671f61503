"""Triton backend of kdrl_kernels: fused log-probs and KL kernels, plus an ahead-of-time compile report.

Importing this package does not import Triton; the submodules do, when first used:
``kdrl_kernels.triton.logprobs``, ``kdrl_kernels.triton.kl``, ``kdrl_kernels.triton.aot``.
"""
import importlib

__all__ = ["logprobs_forward", "logprobs_backward", "kl_forward", "kl_backward", "compile_report"]

_HOMES = {"logprobs_forward": "logprobs", "logprobs_backward": "logprobs", "kl_forward": "kl",
          "kl_backward": "kl", "compile_report": "aot"}


def __getattr__(name):
    # PEP 562 lazy attributes: `from kdrl_kernels.triton import kl_forward` imports triton only at that point.
    if name in _HOMES:
        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
