"""Workarounds for Triton's CPU interpreter (``TRITON_INTERPRET=1``), applied once when the kernels are imported.

The interpreter only runs in tests and CPU smoke runs; compiled GPU kernels never go through this module. Each
patch is a no-op where the installed Triton already behaves (checked against Triton 3.6.0 and 3.9.0).
"""
from __future__ import annotations

import numpy as np  # the interpreter needs numpy anyway; GPU use does not import this module
import triton.language as tl
from triton.runtime import interpreter


def _patch_bf16_dot() -> None:
    """Triton 3.6 and 3.9 store bf16 as raw uint16 bits and multiply those bits in ``tl.dot`` (results around
    1e10). Widen bf16 operands to fp32 first: exact, and the same as a tensor core, which forms bf16 products
    exactly and accumulates them in fp32. Harmless if a later Triton handles bf16 itself (the original then simply
    receives fp32 operands)."""
    builder = type(interpreter.interpreter_builder)
    original = builder.create_dot
    if getattr(original, "_kdrl_patch", False):
        return

    def widen(x):
        if x.dtype != tl.bfloat16:
            return x
        bits = x.data.astype(np.uint32) << 16  # bf16 is the top half of an fp32
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    create_dot._kdrl_patch = True
    builder.create_dot = create_dot


def _patch_scalar_index() -> None:
    """Every scalar is a 1-element array in the interpreter, and Triton 3.6 turns one into a Python int (a ``range``
    bound such as ``range(0, V, BLOCK_V)``) with ``int(array)``, which NumPy >= 2.4 refuses ("only 0-dimensional
    arrays can be converted to Python scalars"): every kernel failed at its first loop. Triton 3.9 squeezes the
    array first; do the same on the versions that do not."""
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_kdrl_patch", False):
        return  # a Triton without this hook: nothing known to fix

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        # the scope restores attributes in reverse order, so this override is undone before the original's
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._kdrl_patch = True
    interpreter._patch_lang_tensor = patch_lang_tensor


def apply() -> None:
    _patch_bf16_dot()
    _patch_scalar_index()
