"""kdrl-kernels: fused KD + RL losses computed straight from hidden states and lm_head weights."""
from . import objectives, reference

__version__ = "0.1.0"
