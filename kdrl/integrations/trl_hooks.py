"""The TRL internals our TRL subclasses depend on, as TRL 1.16 has them, and a check that they are still there.

``KDRLGRPOTrainer`` and ``KDRLDistillationTrainer`` override private hooks of TRL's trainers and read private
attributes. TRL may change those in any release without notice; a changed hook would then be called with arguments
the override does not expect, or not at all, and the loss would silently be something else. So each subclass names
the hooks it overrides or calls, with the signature it was written for, and :func:`check_trl_hooks` compares them
with the installed TRL at construction: a difference is a RuntimeError naming the hook, not a quiet change.
setup.py pins ``trl`` to the range checked here (``TRL_RANGE``).
"""
from __future__ import annotations

import inspect

__all__ = ["TRL_RANGE", "TRL_CHECKED", "signature_text", "hook_drift", "check_trl_hooks"]

TRL_CHECKED = "1.16.0"          # the TRL version the signatures below were read from
TRL_RANGE = ">=1.16.0,<1.17"    # setup.py's "train" extra (tests/test_train_trl_hooks.py holds them together)


def signature_text(fn) -> str:
    """``fn``'s parameters as text, without annotations (their spelling varies with Python versions):
    ``"(self, model, inputs, batch_size=None)"``."""
    sig = inspect.signature(fn)
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


def hook_drift(base: type, hooks: dict, attributes: tuple = (), instance=None) -> list[str]:
    """What no longer matches: one line per hook of ``base`` that is missing or whose :func:`signature_text`
    differs from ``hooks[name]``, and per name of ``attributes`` that ``instance`` (after TRL's ``__init__``) lacks."""
    problems = []
    for name, expected in hooks.items():
        fn = getattr(base, name, None)
        if fn is None:
            problems.append(f"{base.__name__}.{name} is gone")
            continue
        got = signature_text(fn)
        if got != expected:
            problems.append(f"{base.__name__}.{name}{got} (written for {name}{expected})")
    if instance is not None:
        problems += [f"{base.__name__} instances have no attribute {a!r}" for a in attributes
                     if not hasattr(instance, a)]
    return problems


def check_trl_hooks(base: type, hooks: dict, attributes: tuple = (), instance=None):
    """RuntimeError listing :func:`hook_drift`'s findings, if any."""
    problems = hook_drift(base, hooks, attributes, instance)
    if problems:
        import trl
        raise RuntimeError(f"TRL {trl.__version__} changed hooks this subclass overrides or relies on (it was written "
                           f"for TRL {TRL_CHECKED}; pip install 'trl{TRL_RANGE}'): " + "; ".join(problems))
