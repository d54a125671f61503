"""A test-only objective, added by touching its declaration and formula alone (kdrl_kernels.registry).

``test_anchor``: a policy-gradient term on the plain GRPO ratio whose advantage is lowered by ``beta`` times the
detached teacher gap, plus a KD loss term ``3 * beta * k`` with the configured estimator. Tests register it, run it
through a caller (KDRLLoss, the trainer, the testbed, TRL, verl) and compare with :func:`expected_token_loss`.
"""
import contextlib

from kdrl_kernels import objectives as O
from kdrl_kernels import registry as R

NAME = "test_anchor"


def _advantage(adv, s, t, beta):
    return adv - beta * (s - t).detach()


OBJECTIVE = R.Objective(NAME, lambda c: f"{NAME} (test-only)", log_ratio=lambda s, old, t, cfg: s - old,
                        advantage=_advantage, kd="loss", coef=lambda beta: 3.0 * beta, kd_metric="kd_loss")


def expected_token_loss(s, t, old, adv, beta, estimator="k2", eps_low=0.2, eps_high=0.2):
    """The per-token loss written out by hand (not through the registry): ``pg + 3 beta k``."""
    pg = O.clipped_surrogate(s - old, adv - beta * (s - t).detach(), eps_low, eps_high)
    return pg + 3.0 * beta * O.kl_estimator(s, t, estimator)


@contextlib.contextmanager
def registered():
    """The objective registered for the duration of a ``with`` block."""
    R.register_objective(OBJECTIVE)
    try:
        yield OBJECTIVE
    finally:
        R.OBJECTIVES.pop(NAME, None)
