"""kdrl-kernels: fused KD + RL losses computed straight from hidden states and lm_head weights.

Public API: :func:`fused_linear_logprobs`, :func:`fused_linear_kl`, :class:`KDRLLoss` / :class:`KDRLConfig`, the
per-token objectives in :mod:`kdrl_kernels.objectives`, what each objective means in :mod:`kdrl_kernels.registry`
(read by every trainer adapter), and :func:`teacher_head` (a teacher lm_head cut to the student's vocabulary).
``kdrl_kernels.reference`` holds the full-logits spec.
"""
from . import objectives, reference, registry
from .api import fused_linear_kl, fused_linear_logprobs
from .loss import KDRLConfig, KDRLLoss
from .validation import teacher_head

__all__ = ["fused_linear_logprobs", "fused_linear_kl", "KDRLLoss", "KDRLConfig", "objectives", "reference", "registry",
           "teacher_head"]
__version__ = "0.1.0"
