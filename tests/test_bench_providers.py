"""Every benchmark provider computes the same objective: losses and gradients agree at a small shape.

The naive provider is checked against ``kdrl_kernels.reference`` in float64 (the spec); the others against the
naive one. Liger's KDRL peer uses k3 instead of k2, so for KDRL it is checked against a k3 variant of the naive
loss. Liger runs eagerly here (compiling costs ~20 s and is exercised by the benchmark run itself).
"""
import pytest
import torch

from bench import naive, providers, workloads
from kdrl_kernels import reference

SHAPE = dict(d=24, d_t=40, vocab=507)     # a vocabulary that is not a multiple of any chunk or tile


def _case(workload, dtype="float32", n=96, seq=48):
    return workloads.Case(workload, "test", SHAPE["d"], SHAPE["d_t"], SHAPE["vocab"], n, seq, dtype)


def _grads(provider, inp, case):
    inp.zero_grads()
    loss = provider.step(inp, case)
    return loss, inp.hidden.grad.detach().float().clone(), inp.weight.grad.detach().float().clone()


def _spec_loss(inp, workload):
    """The objective from the float64 reference log-probs (kdrl_kernels.reference), token mean."""
    h, w = inp.hidden.double(), inp.weight.double()
    if workload == "rkl":
        kl = reference.reference_kl(h, w, inp.t_hidden.double(), inp.t_weight.double())
        return kl.mean()
    tg = inp.targets.reshape(-1)
    s = reference.reference_logprobs(h, w, tg)[0].view_as(inp.mask)
    ratio = torch.exp(s - s.detach())
    adv = inp.advantages.double()[:, None]
    per = -torch.minimum(ratio * adv, ratio.clamp(1 - inp.eps_low, 1 + inp.eps_high) * adv)
    if workload == "kdrl":
        t = reference.reference_logprobs(inp.t_hidden.double(), inp.t_weight.double(), tg)[0].view_as(s)
        per = per + inp.beta * 0.5 * (t - s) ** 2
    return per.mean()


@pytest.mark.parametrize("workload", workloads.WORKLOADS)
def test_naive_matches_float64_reference(workload):
    case = _case(workload)
    inp = workloads.make_inputs(case, seed=1)
    loss, gh, gw = _grads(providers.Naive(), inp, case)
    h = inp.hidden.detach().clone().requires_grad_(True)
    w = inp.weight.detach().clone().requires_grad_(True)
    spec_inp = workloads.Inputs(h, w, inp.t_hidden, inp.t_weight, inp.targets, inp.mask, inp.advantages)
    spec = _spec_loss(spec_inp, workload)
    spec.backward()
    assert loss == pytest.approx(float(spec.detach()), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(gh, h.grad.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, w.grad.float(), rtol=1e-4, atol=1e-6)


PEERS = [("kdrl", "ours-chunked"), ("grpo", "ours-chunked"), ("rkl", "ours-chunked"), ("kdrl", "ours-kdrlloss"),
         ("grpo", "ours-kdrlloss"), ("rkl", "ours-kdrlloss"), ("grpo", "liger-grpo"), ("rkl", "liger-jsd"),
         ("kdrl", "torch-lce"), ("grpo", "torch-lce")]


@pytest.mark.parametrize("workload,name", PEERS)
def test_providers_agree_with_naive_fp32(workload, name):
    (prov,) = providers.select([name], liger_compiled=False)
    case = _case(workload)
    reason = prov.unavailable(case)
    if reason:
        pytest.skip(reason)
    inp = workloads.make_inputs(case, seed=2)
    ref_loss, ref_gh, ref_gw = _grads(providers.Naive(), inp, case)
    loss, gh, gw = _grads(prov, inp, case)
    assert loss == pytest.approx(ref_loss, rel=1e-4, abs=1e-5)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-3, atol=1e-5)


def test_liger_kdrl_peer_is_grpo_plus_k3_to_teacher():
    """What the Liger KDRL peer computes: the clipped surrogate + beta * k3(teacher, student), token mean."""
    (prov,) = providers.select(["liger-grpo"], liger_compiled=False)
    case = _case("kdrl")
    if prov.unavailable(case):
        pytest.skip(prov.unavailable(case))
    inp = workloads.make_inputs(case, seed=3)
    loss, gh, _ = _grads(prov, inp, case)
    h = inp.hidden.detach().clone().requires_grad_(True)
    s = naive.token_logprobs(h, inp.weight.detach(), inp.targets).view_as(inp.mask)
    t = naive.token_logprobs(inp.t_hidden, inp.t_weight, inp.targets).view_as(s)
    k3 = torch.exp(t - s) - (t - s) - 1
    expect = naive.token_mean(naive.clipped_pg(s, s.detach(), inp.advantages, 0.2, 0.2) + inp.beta * k3, inp.mask)
    expect.backward()
    assert loss == pytest.approx(float(expect.detach()), rel=1e-4)
    torch.testing.assert_close(gh, h.grad, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("name", ["ours-chunked", "ours-kdrlloss"])
@pytest.mark.parametrize("workload", workloads.WORKLOADS)
def test_ours_bf16_is_no_worse_than_naive_bf16(workload, name):
    """In bf16 our fp32-logit path must be at least as close to the float64 spec as the naive bf16 loss is."""
    (prov,) = providers.select([name])
    case = _case(workload, "bfloat16")
    if prov.unavailable(case):
        pytest.skip(prov.unavailable(case))
    inp = workloads.make_inputs(case, seed=4)
    naive_loss = providers.Naive().step(inp, case)
    inp.zero_grads()
    ours = prov.step(inp, case)
    spec_inp = workloads.Inputs(inp.hidden.detach(), inp.weight.detach(), inp.t_hidden, inp.t_weight, inp.targets,
                                inp.mask, inp.advantages)
    spec = float(_spec_loss(spec_inp, workload))
    assert abs(ours - spec) <= abs(naive_loss - spec) + 1e-4 * max(1.0, abs(spec))


def test_select_rejects_unknown_provider():
    with pytest.raises(ValueError, match="unknown provider"):
        providers.select(["naive", "flash"])
