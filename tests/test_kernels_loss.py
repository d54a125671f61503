"""KDRLLoss against a float64 full-logits reference, plus the semantic checks of GRPO / KDRL / TRRD."""
import pytest
import torch

from kdrl_kernels import KDRLConfig, KDRLLoss, fused_linear_kl, objectives as O
from kdrl_kernels.loss import token_losses
from kdrl_kernels.reference import reference_kl, reference_logprobs
from tolerance import bf16_grad_tol

B, T, D, DT, V = 4, 9, 24, 16, 203


def batch(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g) / D ** 0.5 * 2).to(dtype).requires_grad_()
    th = torch.randn(B, T, DT, generator=g).to(dtype)
    tw = (torch.randn(V, DT, generator=g) / DT ** 0.5 * 2).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    targets[~mask] = -100  # padding ids outside the vocabulary must be harmless where masked
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    groups = torch.tensor([0, 0, 1, 1])
    old = (torch.randn(B, T, generator=g) * 0.2 - 5.5)
    return dict(hidden=hidden, weight=weight, teacher_hidden=th, teacher_weight=tw, targets=targets, mask=mask,
                rewards=rewards, group_ids=groups, old_logprobs=old)


def reference_loss(cfg, b, pg_weights=None):
    """The loss written the naive way, in float64 with full logits."""
    m = b["mask"]
    rows = m.reshape(-1)
    tgt = b["targets"].reshape(-1)[rows]
    h, th = b["hidden"].reshape(-1, D)[rows], b["teacher_hidden"].reshape(-1, DT)[rows]
    s = reference_logprobs(h, b["weight"], tgt, temperature=cfg.temperature)[0]
    t = reference_logprobs(th, b["teacher_weight"], tgt, temperature=cfg.temperature)[0].detach()
    kl = reference_kl(h, b["weight"], th, b["teacher_weight"], temperature=cfg.temperature)
    adv = O.group_advantages(b["rewards"], b["group_ids"])[:, None].expand(B, T)[m].double()
    w_pg = O.aggregation_weights(m, cfg.aggregation)[m].double()
    w_kd = w_pg * O.kd_sequence_mask(b["rewards"] > 0, b["group_ids"], cfg.kd_mask)[:, None].expand(B, T)[m]
    if pg_weights is not None:
        w_pg = w_pg * pg_weights[m].double()
    old = b["old_logprobs"][m].double() if b["old_logprobs"] is not None else None
    pg, kd = token_losses(s, t, old, adv, kl, cfg, cfg.beta)
    loss = torch.zeros((), dtype=torch.float64)
    if pg is not None:
        loss = loss + (w_pg * pg).sum()
    if kd is not None:
        loss = loss + (1.0 if cfg.objective == "kd" else cfg.beta) * (w_kd * kd).sum()
    return loss


def run(cfg, b, **extra):
    keys = ("rewards", "group_ids", "old_logprobs", "teacher_hidden", "teacher_weight")
    kw = {k: b[k] for k in keys}
    kw.update(extra)
    return KDRLLoss(cfg)(b["hidden"], b["weight"], b["targets"], b["mask"], **kw)


# k1 and k3 only enter the objectives with a KD loss term; "exact" elsewhere still exercises the KL metric.
COMBOS = [(o, e) for o in ("kd", "kdrl") for e in ("k1", "k2", "k3", "exact")]
COMBOS += [(o, e) for o in ("grpo", "kdrl_shaping", "trrd") for e in ("k2", "exact")]


@pytest.mark.parametrize("objective,estimator", COMBOS)
@pytest.mark.parametrize("single_pass", [True, False])
def test_loss_and_grads_match_reference(objective, estimator, single_pass):
    cfg = KDRLConfig(objective=objective, kl_estimator=estimator, beta=0.3, aggregation="seq_mean",
                     kd_mask="incorrect", temperature=0.9, single_pass=single_pass, chunk_size=5, log_exact_kl=True)
    b = batch()
    b["old_logprobs"] = b["old_logprobs"] * 0.1 + 0.9 * reference_old(b)  # ratios near 1, some clipped
    loss, metrics = run(cfg, b)
    ref = reference_loss(cfg, b)
    grads = torch.autograd.grad(loss, (b["hidden"], b["weight"]))
    ref_grads = torch.autograd.grad(ref, (b["hidden"], b["weight"]))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-4, atol=1e-6)
    assert metrics["num_tokens"] == int(b["mask"].sum())
    assert metrics["logp_mean"] <= 0 and metrics["exact_kl"] >= 0


@pytest.mark.parametrize("objective", ["grpo", "kdrl", "kdrl_shaping", "trrd"])
@pytest.mark.parametrize("single_pass", [True, False])
def test_pg_weights_multiply_the_policy_term_only(objective, single_pass):
    """Per-token pg_weights (an importance-sampling correction) scale the policy-gradient term, not the KD term."""
    cfg = KDRLConfig(objective=objective, beta=0.3, single_pass=single_pass, chunk_size=5)
    b = batch()
    b["old_logprobs"] = b["old_logprobs"] * 0.1 + 0.9 * reference_old(b)
    w = torch.rand(B, T, generator=torch.Generator().manual_seed(3)) * 2
    w[0, :3] = 0.0
    w[~b["mask"]] = float("nan")  # only the tokens under the mask are read
    loss, _ = run(cfg, b, pg_weights=w)
    ref = reference_loss(cfg, b, pg_weights=w)
    grads = torch.autograd.grad(loss, (b["hidden"], b["weight"]))
    ref_grads = torch.autograd.grad(ref, (b["hidden"], b["weight"]))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="pg_weights must be finite and >= 0"):
        run(cfg, b, pg_weights=-w.nan_to_num())


def reference_old(b):
    with torch.no_grad():
        lp = reference_logprobs(b["hidden"].reshape(-1, D), b["weight"], b["targets"].reshape(-1).clamp_min(0))[0]
    return (lp.float() + 0.3 * torch.randn(lp.shape, generator=torch.Generator().manual_seed(5))).reshape(B, T)


def test_bf16_inputs_give_fp32_loss_close_to_fp64_reference():
    cfg = KDRLConfig(objective="kdrl", beta=0.5)
    b = batch(dtype=torch.bfloat16)
    loss, _ = run(cfg, b)
    assert loss.dtype == torch.float32
    gh, gw = torch.autograd.grad(loss, (b["hidden"], b["weight"]))
    assert gh.dtype == gw.dtype == torch.bfloat16
    ref = reference_loss(cfg, b)
    rh, rw = torch.autograd.grad(ref, (b["hidden"], b["weight"]))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    for g, r in zip((gh, gw), (rh, rw)):  # dz rounded to bf16 for the gradient matmuls, then the result
        assert ((g.double() - r.double()).abs() <= bf16_grad_tol(r)).all()


def test_expected_k2_gradient_equals_exact_reverse_kl_gradient():
    """On a tiny vocabulary, E_{o ~ p}[grad k2(o)] enumerated exactly equals grad KL(p || q)."""
    g = torch.Generator().manual_seed(0)
    v, d = 6, 4
    hidden = torch.randn(1, 1, d, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(v, d, generator=g, dtype=torch.float64).requires_grad_()
    th, tw = torch.randn(1, 1, 3, generator=g, dtype=torch.float64), torch.randn(v, 3, generator=g,
                                                                                  dtype=torch.float64)
    p = torch.softmax((hidden @ weight.T).reshape(-1), -1).detach()
    loss_fn = KDRLLoss(objective="kd", kl_estimator="k2", compute_entropy=False)
    mask = torch.ones(1, 1, dtype=torch.bool)
    expected = [torch.zeros_like(hidden), torch.zeros_like(weight)]
    for token in range(v):
        loss, _ = loss_fn(hidden, weight, torch.tensor([[token]]), mask, teacher_hidden=th, teacher_weight=tw)
        for acc, gr in zip(expected, torch.autograd.grad(loss, (hidden, weight))):
            acc += p[token] * gr
    exact = fused_linear_kl(hidden.reshape(1, d), weight, th.reshape(1, 3), tw).sum()
    for e, gr in zip(expected, torch.autograd.grad(exact, (hidden, weight))):
        torch.testing.assert_close(e, gr, rtol=1e-5, atol=1e-7)


def test_on_policy_grpo_ratio_is_one_and_nothing_is_clipped():
    b = batch()
    _, metrics = run(KDRLConfig(objective="grpo"), b, old_logprobs=None)
    assert metrics["ratio_mean"] == pytest.approx(1.0) and metrics["ratio_max"] == pytest.approx(1.0)
    assert metrics["clip_frac"] == 0.0


def test_trrd_binds_from_the_first_on_policy_step():
    _, metrics = run(KDRLConfig(objective="trrd"), batch(), old_logprobs=None)
    assert metrics["ratio_min"] < 0.8 or metrics["ratio_max"] > 1.2
    assert metrics["clip_frac"] > 0


def test_trrd_with_alpha_one_equals_grpo():
    b = batch()
    grpo, _ = run(KDRLConfig(objective="grpo"), b)
    g1 = torch.autograd.grad(grpo, (b["hidden"], b["weight"]))
    trrd, _ = run(KDRLConfig(objective="trrd", trrd_alpha=1.0), b)
    g2 = torch.autograd.grad(trrd, (b["hidden"], b["weight"]))
    torch.testing.assert_close(trrd, grpo)
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c)


def test_kdrl_joint_and_shaping_forms_give_the_same_gradient_on_policy():
    b = batch()
    joint, _ = run(KDRLConfig(objective="kdrl", beta=0.4), b, old_logprobs=None)
    g1 = torch.autograd.grad(joint, (b["hidden"], b["weight"]))
    shaped, _ = run(KDRLConfig(objective="kdrl_shaping", beta=0.4), b, old_logprobs=None)
    g2 = torch.autograd.grad(shaped, (b["hidden"], b["weight"]))
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-7)


def test_kd_steps_move_student_logprobs_toward_teacher():
    b = batch()
    hidden, weight = b["hidden"].detach(), b["weight"].detach().clone().requires_grad_()
    loss_fn = KDRLLoss(objective="kd", kl_estimator="k2")
    k2 = []
    for _ in range(5):
        loss, m = loss_fn(hidden, weight, b["targets"], b["mask"], teacher_hidden=b["teacher_hidden"],
                          teacher_weight=b["teacher_weight"])
        k2.append(m["k2"])  # mean 0.5 * (t - s)^2 over the sampled tokens
        (g,) = torch.autograd.grad(loss, weight)
        with torch.no_grad():
            weight -= 0.5 * g
    assert all(later < earlier for earlier, later in zip(k2, k2[1:]))
    assert k2[-1] < 0.1 * k2[0]


def test_precomputed_teacher_logprobs_match_teacher_hidden():
    b = batch()
    cfg = KDRLConfig(objective="kdrl", beta=0.5, compute_entropy=False)
    with_hidden, _ = run(cfg, b)
    g1 = torch.autograd.grad(with_hidden, b["weight"])
    lp = torch.zeros(B, T)
    m = b["mask"]
    lp[m] = reference_logprobs(b["teacher_hidden"][m], b["teacher_weight"], b["targets"][m])[0].float()
    with_lp, _ = run(cfg, b, teacher_hidden=None, teacher_weight=None, teacher_logprobs=lp)
    g2 = torch.autograd.grad(with_lp, b["weight"])
    torch.testing.assert_close(with_lp, with_hidden)
    torch.testing.assert_close(g1[0], g2[0])


def test_upstream_scale_and_accumulation_reach_the_stored_gradients():
    b = batch()
    cfg = KDRLConfig(objective="kdrl")
    loss, _ = run(cfg, b)
    (g,) = torch.autograd.grad(loss, b["weight"])
    loss2, _ = run(cfg, b)
    (g3,) = torch.autograd.grad(3.0 * loss2, b["weight"])
    torch.testing.assert_close(g3, 3.0 * g)


def test_all_masked_batch_gives_zero_loss_and_zero_grads():
    b = batch()
    b["mask"] = torch.zeros(B, T, dtype=torch.bool)
    loss, metrics = run(KDRLConfig(objective="kdrl"), b)
    assert loss.item() == 0.0 and metrics["num_tokens"] == 0
    loss.backward()
    assert b["weight"].grad is None or torch.all(b["weight"].grad == 0)


def test_padded_teacher_vocab_needs_the_truncation_option():
    b = batch()
    b["teacher_weight"] = torch.cat([b["teacher_weight"], torch.randn(7, DT)])
    with pytest.raises(ValueError, match="truncate_teacher_vocab"):
        run(KDRLConfig(objective="kdrl"), b)
    loss, _ = run(KDRLConfig(objective="kdrl", truncate_teacher_vocab=True), b)
    b["teacher_weight"] = b["teacher_weight"][:V]
    torch.testing.assert_close(loss, run(KDRLConfig(objective="kdrl"), b)[0])
