"""kdrl-kernels: fused KD + RL losses computed straight from hidden states and lm_head weights.

Public API: :func:`fused_linear_logprobs`, :func:`fused_linear_kl`, :class:`KDRLLoss` / :class:`KDRLConfig`, and the
per-token objectives in :mod:`kdrl_kernels.objectives`. ``kdrl_kernels.reference`` holds the full-logits spec.
"""
from . import objectives, reference
from .api import fused_linear_kl, fused_linear_logprobs
from .loss import KDRLConfig, KDRLLoss

__all__ = ["fused_linear_logprobs", "fused_linear_kl", "KDRLLoss", "KDRLConfig", "objectives", "reference"]
__version__ = "0.1.0"
