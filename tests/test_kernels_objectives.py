"""Per-token objectives: semantics that can be checked by hand."""
import math

import pytest
import torch

from kdrl_kernels import objectives as O


def test_clipping_binds_exactly_where_it_should():
    eps_low, eps_high = 0.2, 0.28
    log_ratio = torch.log(torch.tensor([0.5, 0.79, 0.81, 1.0, 1.27, 1.29, 2.0] * 2)).requires_grad_()
    adv = torch.tensor([1.0] * 7 + [-1.0] * 7)
    loss = O.clipped_surrogate(log_ratio, adv, eps_low, eps_high)
    (grad,) = torch.autograd.grad(loss.sum(), log_ratio)
    clipped = O.clip_mask(log_ratio, adv, eps_low, eps_high)
    # A > 0: only ratios above 1 + eps_high are cut; A < 0: only ratios below 1 - eps_low.
    expect = torch.tensor([False] * 5 + [True, True] + [True, True] + [False] * 5)
    assert torch.equal(clipped, expect)
    assert torch.all(grad[clipped] == 0) and torch.all(grad[~clipped] != 0)


def test_gradient_signs_follow_the_advantage():
    s = torch.zeros(2, requires_grad=True)
    loss = O.clipped_surrogate(s - s.detach(), torch.tensor([1.0, -1.0])).sum()
    (g,) = torch.autograd.grad(loss, s)
    assert g[0] < 0 < g[1]  # descent raises the log-prob of good tokens and lowers bad ones


def test_dual_clip_bounds_negative_advantage_loss():
    log_ratio = torch.log(torch.tensor([10.0]))
    adv = torch.tensor([-1.0])
    assert O.clipped_surrogate(log_ratio, adv).item() == pytest.approx(10.0)
    assert O.clipped_surrogate(log_ratio, adv, dual_clip=3.0).item() == pytest.approx(3.0)
    assert O.clip_mask(log_ratio, adv, dual_clip=3.0).item()


def test_kl_estimators_values_and_k2_gradient():
    s = torch.tensor([-1.0, -2.0], requires_grad=True)
    t = torch.tensor([-1.5, -1.0])
    r = t - s.detach()
    torch.testing.assert_close(O.kl_estimator(s, t, "k1"), -r)
    torch.testing.assert_close(O.kl_estimator(s, t, "k2"), 0.5 * r ** 2)
    torch.testing.assert_close(O.kl_estimator(s, t, "k3"), r.exp() - r - 1)
    (g,) = torch.autograd.grad(O.kl_estimator(s, t, "k2").sum(), s)
    torch.testing.assert_close(g, -r)
    with pytest.raises(ValueError, match="kind"):
        O.kl_estimator(s, t, "k4")


def test_trrd_alpha_one_is_grpo_and_clamp_applies():
    s, old, t = torch.tensor([-1.0, -3.0]), torch.tensor([-1.2, -2.0]), torch.tensor([-4.0, -1.0])
    torch.testing.assert_close(O.trrd_log_ratio(s, old, t, alpha=1.0), O.grpo_log_ratio(s, old))
    mixed = O.trrd_log_ratio(s, old, t, alpha=0.5, clamp=1.0)
    torch.testing.assert_close(mixed, 0.5 * (s - old) + 0.5 * (s - t).clamp(-1, 1))


def test_group_advantages_population_std_and_dr_grpo():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 7, 7])
    adv = O.group_advantages(rewards, groups, eps=0.0 + 1e-12)
    first = rewards[:4]
    torch.testing.assert_close(adv[:4], (first - first.mean()) / first.std(unbiased=False))
    assert torch.all(O.group_advantages(rewards, groups)[4:] == 0)  # all-correct group: no signal
    torch.testing.assert_close(O.group_advantages(rewards, groups, scale=False)[:4], first - 0.25)


def test_aggregation_weights():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    per_token = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0]])
    assert O.aggregate(per_token, mask, "token_mean").item() == pytest.approx(10 / 4)
    assert O.aggregate(per_token, mask, "seq_mean").item() == pytest.approx((6 / 3 + 4) / 2)
    assert O.aggregate(per_token, mask, "dr_grpo").item() == pytest.approx(10 / (2 * 4))
    assert O.aggregate(per_token, mask, "dr_grpo", max_len=10).item() == pytest.approx(10 / 20)
    assert O.aggregation_weights(torch.zeros(2, 3, dtype=torch.bool)).sum() == 0


def test_beta_schedules():
    assert O.beta_at(7, 2e-3) == 2e-3
    assert O.beta_at(0, 5e-3, "linear", 1e-3, 5e-5) == pytest.approx(5e-3)
    assert O.beta_at(40, 5e-3, "linear", 1e-3, 5e-5) == pytest.approx(3e-3)
    assert O.beta_at(1000, 5e-3, "linear", 1e-3, 5e-5) == pytest.approx(1e-3)
    assert O.beta_at(50, 1.0, "cosine", 0.0, total_steps=100) == pytest.approx(0.5)
    assert O.beta_at(100, 1.0, "cosine", 0.1, total_steps=100) == pytest.approx(0.1)
    assert O.beta_at(25, 1.0, "cosine", 0.0, total_steps=100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    with pytest.raises(ValueError, match="total_steps"):
        O.beta_at(1, 1.0, "cosine")


def test_kd_masks():
    correct = torch.tensor([True, False, False, False])
    groups = torch.tensor([0, 0, 1, 1])
    assert O.kd_sequence_mask(correct, mode="none").tolist() == [1, 1, 1, 1]
    assert O.kd_sequence_mask(correct, mode="incorrect").tolist() == [0, 1, 1, 1]
    assert O.kd_sequence_mask(correct, groups, mode="group_all_wrong").tolist() == [0, 0, 1, 1]
