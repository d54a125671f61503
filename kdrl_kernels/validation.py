"""Argument checks shared by the public functions: each error names the argument and what was expected."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_matrix(name, x, rows=None, cols=None):
    """``x`` must be a 2-D floating tensor, optionally with the given number of rows / columns."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32, bfloat16, float16), got {x.dtype}")
    if rows is not None and x.shape[0] != rows:
        raise ValueError(f"{name} must have {rows} rows, got shape {tuple(x.shape)}")
    if cols is not None and x.shape[1] != cols:
        raise ValueError(f"{name} must have {cols} columns, got shape {tuple(x.shape)}")


def check_vector(name, x, length, *, dtype_kind="float"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1 or x.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got {tuple(x.shape)}")
    if dtype_kind == "float" and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if dtype_kind == "int" and x.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 tensor, got {x.dtype}")
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
    if not (isinstance(temperature, (int, float)) and temperature > 0 and temperature != float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def match_teacher_vocab(student_weight, teacher_weight, truncate, teacher_bias=None):
    """Slice a teacher whose vocabulary only adds padding rows (Qwen 152,064 vs 151,936) to the student's size."""
    v_s, v_t = student_weight.shape[0], teacher_weight.shape[0]
    if v_t == v_s:
        return teacher_weight, teacher_bias
    if v_t > v_s and truncate:
        return teacher_weight[:v_s], (teacher_bias[:v_s] if teacher_bias is not None else None)
    hint = " (pass truncate_teacher_vocab=True if the extra teacher rows are padding)" if v_t > v_s else ""
    raise ValueError(f"teacher_weight has {v_t} vocabulary rows but student_weight has {v_s}{hint}")
