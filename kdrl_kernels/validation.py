"""Argument checks shared by the public functions: each error names the argument and what was expected."""
from __future__ import annotations

import math
import numbers

import torch

from .backend import autocast_dtype

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32)
# log-probs may round a little above 0 (fp32 logsumexp of a near-certain token); more than this is not a log-prob
LOGPROB_SLACK = 1e-4


def check_tensor(name, x):
    """``x`` must be a dense (strided) torch.Tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")


def check_matrix(name, x, rows=None, cols=None, min_rows=0):
    """``x`` must be a 2-D floating tensor, optionally with the given number of rows / columns."""
    check_tensor(name, x)
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, bfloat16, float16), got {x.dtype}")
    if rows is not None and x.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got shape {tuple(x.shape)}")
    if cols is not None and x.shape[1] != cols:
        raise ValueError(f"{name} must have {cols} columns, got shape {tuple(x.shape)}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} must have at least {min_rows} row(s) (one per vocabulary entry), "
                         f"got shape {tuple(x.shape)}")


def check_same_dtype(a_name, a, b_name, b):
    """Hidden states and the weight they multiply must share a dtype (no silent mixed-precision matmul), except inside
    an autocast region, where both are cast to its dtype as ``nn.Linear``'s operands are (``backend.autocast_inputs``).
    """
    if a.dtype != b.dtype and autocast_dtype(a.device) is None:
        raise TypeError(f"{a_name} and {b_name} must have the same dtype, got {a_name} {a.dtype} and "
                        f"{b_name} {b.dtype} (cast one of them explicitly)")


def check_vector(name, x, length, *, dtype_kind="float"):
    check_tensor(name, x)
    if x.dim() != 1 or x.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got {tuple(x.shape)}")
    if dtype_kind == "float" and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if dtype_kind == "int" and x.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be an int64 (or int32) tensor, got {x.dtype}")
    if dtype_kind == "bool" and x.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {x.dtype}")


def check_same_device(**tensors):
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_targets(targets, vocab, ignore_index=None):
    """Targets must lie in ``[0, vocab)``, except where equal to ``ignore_index`` (None: every target counts)."""
    vals = targets if ignore_index is None else targets[targets != ignore_index]
    if vals.numel():
        lo, hi = int(vals.min()), int(vals.max())
        if lo < 0 or hi >= vocab:
            allowed = "" if ignore_index is None else f" or equal ignore_index={ignore_index}"
            raise ValueError(f"targets must be in [0, {vocab}){allowed}, got values in [{lo}, {hi}]")


def check_finite(**tensors):
    """Raise naming the first input that holds NaN or inf (a full pass over each: call it on small inputs)."""
    for name, t in tensors.items():
        if t is not None and t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or inf")


def check_outputs_finite(outputs, **inputs):
    """Refuse non-finite results, naming the input responsible.

    Any NaN/inf in hidden states or weights reaches every logsumexp it touches, so checking the ``(N,)`` outputs
    catches it at ``O(N)`` cost instead of scanning the ``(V, d)`` weights on every call; only when something is
    wrong are the inputs scanned to say which one.
    """
    if all(bool(torch.isfinite(o).all()) for o in outputs if o is not None):
        return
    check_finite(**inputs)
    raise ValueError("the result is not finite although every input is: the logits overflow float32 "
                     "(check the scale of hidden states and weights, or raise the temperature)")


def check_temperature(temperature):
    check_number("temperature", temperature, low=0.0, low_open=True)


def _is_real(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_number(name, v, *, low=None, high=None, low_open=False, high_open=False, allow_none=False):
    """``v`` must be a finite real number (not bool, str or tensor) in the given range."""
    if v is None and allow_none:
        return
    if not _is_real(v):
        raise TypeError(f"{name} must be a finite number{' or None' if allow_none else ''}, "
                        f"got {type(v).__name__} {v!r}")
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {v!r}")
    if high is not None and (v >= high if high_open else v > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {v!r}")


def check_int(name, v, *, low=None, allow_none=False):
    """``v`` must be a Python/numpy integer (not bool, not float) >= ``low``."""
    if v is None and allow_none:
        return
    if not isinstance(v, numbers.Integral) or isinstance(v, bool):
        raise TypeError(f"{name} must be an int{' or None' if allow_none else ''}, got {type(v).__name__} {v!r}")
    if low is not None and v < low:
        raise ValueError(f"{name} must be an int >= {low}{' or None' if allow_none else ''}, got {v!r}")


def check_bool(name, v):
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be True or False, got {type(v).__name__} {v!r}")


def check_choice(name, v, allowed):
    if not isinstance(v, str) or v not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {v!r}")


def check_chunk_size(chunk_size):
    check_int("chunk_size", chunk_size, low=1, allow_none=True)


def check_mask(name, mask, shape):
    """A mask is a bool tensor, or an integer tensor holding only 0 and 1 (converted to bool). Returns it as bool."""
    check_tensor(name, mask)
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.is_complex():
        raise TypeError(f"{name} must be a bool tensor (or integer 0/1), got {mask.dtype}")
    if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must hold only 0 and 1 (or be bool), got values in "
                         f"[{int(mask.min())}, {int(mask.max())}]")
    return mask.bool()


def check_logprobs(name, x, mask=None):
    """Per-token log-probs ``x`` must be floating and <= 0 (up to rounding) where ``mask`` is True; O(numel)."""
    if x is None:
        return
    check_tensor(name, x)
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor of log-probs, got {x.dtype}")
    vals = x if mask is None else x[mask]
    if vals.numel() and not torch.isfinite(vals).all():
        raise ValueError(f"{name} contains NaN or inf")
    top = float(vals.max()) if vals.numel() else 0.0
    if top > LOGPROB_SLACK:
        raise ValueError(f"{name} must be log-probabilities (<= 0), got a maximum of {top:.4g}")


def teacher_head(student_vocab, teacher_weight, teacher_bias=None, *, truncate):
    """The teacher lm_head ``(weight (V, d_t), bias (V,) | None)`` cut to the student's ``V = student_vocab`` rows.

    A teacher whose vocabulary only adds padding rows (Qwen 152,064 vs 151,936) is sliced when ``truncate`` (the
    config's ``truncate_teacher_vocab``); any other mismatch is a ValueError naming both sizes. Every caller that
    holds a teacher lm_head (KDRLLoss, fused_linear_kl, the trainer, the TRL adapter) goes through here.
    """
    v_s, v_t = int(student_vocab), teacher_weight.shape[0]
    if v_t == v_s:
        return teacher_weight, teacher_bias
    if v_t > v_s and truncate:
        return teacher_weight[:v_s], (teacher_bias[:v_s] if teacher_bias is not None else None)
    hint = " (pass truncate_teacher_vocab=True if the extra teacher rows are padding)" if v_t > v_s else ""
    raise ValueError(f"teacher_weight has {v_t} vocabulary rows but student_weight has {v_s}{hint}")


def match_teacher_vocab(student_weight, teacher_weight, truncate, teacher_bias=None):
    """:func:`teacher_head` for a student lm_head ``(V, d)``."""
    return teacher_head(student_weight.shape[0], teacher_weight, teacher_bias, truncate=truncate)
