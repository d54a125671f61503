"""Issue 12: every bad input to the public API gets a ValueError/TypeError naming the argument.

Each case is ``(argument name, call)``; the call must raise ValueError or TypeError whose message contains the name.
The kinds (wrong values, accepted mistakes, dtype policy, vague errors) each get a test, and ``test_count`` runs them
all. Valid-but-unusual inputs that must keep working are at the end.
"""
import math

import numpy as np
import pytest
import torch

from kdrl_kernels import KDRLConfig, KDRLLoss, fused_linear_kl, fused_linear_logprobs
from kdrl_kernels import objectives as O

N, D, VOCAB, DT = 5, 8, 30, 6
B, T = 2, 3


def lp_inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(N, D, generator=g), torch.randn(VOCAB, D, generator=g),
            torch.randint(0, VOCAB, (N,), generator=g))


def kl_inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(N, D, generator=g), torch.randn(VOCAB, D, generator=g),
            torch.randn(N, DT, generator=g), torch.randn(VOCAB, DT, generator=g))


def loss_inputs():
    g = torch.Generator().manual_seed(2)
    return dict(hidden=torch.randn(B, T, D, generator=g), weight=torch.randn(VOCAB, D, generator=g),
                targets=torch.randint(0, VOCAB, (B, T), generator=g), mask=torch.ones(B, T, dtype=torch.bool))


def lp(**over):
    h, w, t = lp_inputs()
    args = dict(hidden=h, weight=w, targets=t)
    args.update(over)
    def call():
        a = dict(args)
        return fused_linear_logprobs(a.pop("hidden"), a.pop("weight"), a.pop("targets"), **a)
    return call


def kl(**over):
    h, w, th, tw = kl_inputs()
    args = dict(student_hidden=h, student_weight=w, teacher_hidden=th, teacher_weight=tw)
    args.update(over)
    def call():
        a = dict(args)
        return fused_linear_kl(a.pop("student_hidden"), a.pop("student_weight"), a.pop("teacher_hidden"),
                               a.pop("teacher_weight"), **a)
    return call


def cfg(**kw):
    return lambda: KDRLConfig(**kw)


def loss(config=None, **over):
    config = config or dict(objective="grpo")
    args = loss_inputs()
    if "advantages" not in over and "rewards" not in over:
        args["advantages"] = torch.ones(B)
    args.update(over)
    args = {k: v for k, v in args.items() if not (isinstance(v, str) and v == "drop")}

    def call():
        a = dict(args)
        fn = KDRLLoss(**config)
        return fn(a.pop("hidden"), a.pop("weight"), a.pop("targets"), a.pop("mask"), **a)
    return call


def kd_loss(**over):
    g = torch.Generator().manual_seed(3)
    extra = dict(teacher_hidden=torch.randn(B, T, DT, generator=g), teacher_weight=torch.randn(VOCAB, DT, generator=g))
    extra.update(over)
    return loss(dict(objective="kdrl"), **extra)


NAN, INF = float("nan"), float("inf")
h0, w0, t0 = lp_inputs()
x = torch.randn(B, T)
neg = -torch.rand(B, T)  # valid log-probs

WRONG_VALUES = [  # used to return a value, some of them wrong
    ("chunk_size", lp(chunk_size=-1)),
    ("chunk_size", lp(chunk_size=0)),
    ("chunk_size", kl(chunk_size=-1)),
    ("chunk_size", cfg(chunk_size=-1)),
    ("chunk_size", cfg(chunk_size=0)),
    ("ignore_index", lp(ignore_index=1.5)),
    ("ignore_index", lp(ignore_index=True)),
    ("backend", cfg(backend="cuda")),
    ("backend", kl(backend="gpu")),
    ("backend", lp(backend=3)),
]

ACCEPTED_MISTAKES = [  # accepted though surely a mistake
    ("targets", lp(hidden=torch.randn(2, 3, D), targets=torch.randint(0, VOCAB, (3, 2)))),
    ("targets", lp(hidden=torch.randn(2, 3, D), targets=torch.randint(0, VOCAB, (6,)))),
    ("teacher_hidden", kl(student_hidden=torch.randn(2, 3, D), teacher_hidden=torch.randn(3, 2, DT))),
    ("mask", kl(mask=torch.full((N,), 0.5))),
    ("mask", kl(mask=torch.full((N,), 2, dtype=torch.int64))),
    ("mask", loss(mask=torch.full((B, T), 0.5))),
    ("mask", loss(mask=torch.full((B, T), 3))),
    ("targets", lp(targets=t0.float())),
    ("targets", loss(targets=torch.zeros(B, T))),
    ("hidden", lp(hidden=h0.long())),
    ("hidden", loss(hidden=torch.ones(B, T, D, dtype=torch.int64))),
    ("bias", lp(bias=torch.zeros(1))),
    ("bias", loss(bias=torch.zeros(1))),
    ("teacher_bias", kd_loss(teacher_bias=torch.zeros(1))),
    ("correct", loss(correct=torch.ones(1, dtype=torch.bool))),
    ("correct", loss(correct=torch.ones(B))),
    ("old_logprobs", loss(old_logprobs=neg + 0.5)),
    ("teacher_logprobs", loss(dict(objective="kd"), teacher_logprobs=neg + 2.0)),
    ("trrd_clamp", cfg(objective="trrd", trrd_clamp=0.0)),
    ("trrd_clamp", cfg(trrd_clamp=-1.0)),
    ("max_len", cfg(aggregation="dr_grpo", max_len=0)),
    ("max_len", cfg(aggregation="dr_grpo", max_len=-4)),
    ("clamp", lambda: O.trrd_log_ratio(x, x, x, 0.5, clamp=0.0)),
    ("old", lambda: O.grpo_log_ratio(x, x[:, :1])),
    ("advantages", lambda: O.clipped_surrogate(x, torch.ones(B))),
    ("t", lambda: O.kl_estimator(x, x[0], "k2")),
    ("per_token", lambda: O.aggregate(torch.ones(B), torch.ones(B, T, dtype=torch.bool))),
    ("eps_low", cfg(eps_low=1.5)),
]

DTYPE_POLICY = [  # hidden and weight must share a dtype: never a silent mixed-precision matmul
    ("weight", lp(weight=w0.bfloat16())),
    ("hidden", lp(hidden=h0.double())),
    ("student_weight", kl(student_weight=torch.randn(VOCAB, D).half())),
    ("teacher_weight", kl(teacher_weight=torch.randn(VOCAB, DT).bfloat16())),
    ("weight", loss(weight=torch.randn(VOCAB, D).bfloat16())),
    ("teacher_weight", kd_loss(teacher_weight=torch.randn(VOCAB, DT).double())),
    ("targets", lp(targets=t0.to(torch.int16))),
    ("targets", loss(targets=torch.zeros(B, T, dtype=torch.uint8))),
]

VAGUE = [  # used to end in AttributeError / deep RuntimeError / a misleading message
    ("hidden", lp(hidden=h0.numpy())),
    ("weight", lp(weight=w0.tolist())),
    ("targets", lp(targets=t0.tolist())),
    ("student_hidden", kl(student_hidden=np.zeros((N, D), dtype=np.float32))),
    ("teacher_hidden", kl(teacher_hidden=None)),
    ("mask", kl(mask=[True] * N)),
    ("mask", loss(mask=None)),
    ("hidden", loss(hidden=np.zeros((B, T, D)))),
    ("targets", loss(targets=[[0] * T] * B)),
    ("weight", lp(weight=w0.to_sparse())),
    ("student_weight", kl(student_weight=torch.randn(VOCAB, D).to_sparse())),
    ("teacher_weight", kd_loss(teacher_weight=torch.randn(VOCAB, DT + 1))),
    ("teacher_weight", kl(teacher_weight=torch.randn(VOCAB, DT + 2))),
    ("bias", lp(bias=torch.zeros(VOCAB + 1))),
    ("student_bias", kl(student_bias=torch.zeros(VOCAB - 1))),
    ("teacher_bias", kl(teacher_bias=torch.zeros(2))),
    ("bias", loss(bias=torch.zeros(VOCAB - 1))),
    ("rewards", loss(rewards=torch.ones(B + 1), group_ids=torch.zeros(B, dtype=torch.int64), advantages=None)),
    ("group_ids", loss(rewards=torch.ones(B), group_ids=torch.zeros(B + 1, dtype=torch.int64), advantages=None)),
    ("group_ids", loss(rewards=torch.ones(B), group_ids=torch.zeros(B), advantages=None)),
    ("correct", loss(correct=torch.ones(B + 2, dtype=torch.bool))),
    ("advantages", loss(advantages=[1.0, 1.0])),
    ("advantages", loss(advantages=torch.ones(B, dtype=torch.int64))),
    ("ignore_index", lp(ignore_index=None)),
    ("chunk_size", lp(chunk_size=2.5)),
    ("chunk_size", cfg(chunk_size="64")),
    ("beta", cfg(beta="0.1")),
    ("eps_high", cfg(eps_high="0.28")),
    ("temperature", cfg(temperature="1")),
    ("temperature", lp(temperature="1")),
    ("temperature", kl(temperature=NAN)),
    ("beta", cfg(beta=NAN)),
    ("beta", kl(kind="jsd", beta=NAN)),
    ("beta", kl(beta="half")),
    ("eps_high", cfg(eps_high=NAN)),
    ("eps_low", cfg(eps_low=INF)),
    ("dual_clip", cfg(dual_clip=NAN)),
    ("dual_clip", cfg(dual_clip=0.5)),
    ("trrd_alpha", cfg(trrd_alpha=NAN)),
    ("trrd_clamp", cfg(trrd_clamp=NAN)),
    ("beta_min", cfg(beta_min=NAN)),
    ("beta_decay", cfg(beta_decay=-1.0)),
    ("adv_eps", cfg(adv_eps=NAN)),
    ("temperature", cfg(temperature=NAN)),
    ("temperature", cfg(temperature=INF)),
    ("total_steps", cfg(total_steps=2.5)),
    ("total_steps", cfg(beta_schedule="cosine", total_steps=0)),
    ("total_steps", cfg(beta_schedule="cosine")),
    ("max_len", cfg(max_len=10.0)),
    ("scale_rewards", cfg(scale_rewards="no")),
    ("single_pass", cfg(single_pass=None)),
    ("objective", cfg(objective=None)),
    ("kl_estimator", cfg(kl_estimator="k4")),
    ("aggregation", cfg(aggregation=["token_mean"])),
    ("step", loss(step=NAN)),
    ("step", loss(step=-1)),
    ("step", loss(step=2.5)),
    ("step", loss(dict(objective="kdrl", beta_schedule="linear"), step="3",
                  teacher_logprobs=neg, advantages=torch.ones(B))),
    ("rewards", loss(rewards=torch.tensor([NAN, 1.0]), group_ids=torch.zeros(B, dtype=torch.int64),
                     advantages=None)),
    ("advantages", loss(advantages=torch.tensor([NAN, 1.0]))),
    ("weight", lp(weight=torch.zeros(0, D))),
    ("student_weight", kl(student_weight=torch.zeros(0, D))),
    ("weight", loss(weight=torch.zeros(0, D))),
    ("kind", kl(kind=None)),
    ("return_entropy", lp(return_entropy="yes")),
    ("check_finite", kl(check_finite=1)),
    ("truncate_teacher_vocab", kl(truncate_teacher_vocab="yes")),
    ("old_logprobs", loss(old_logprobs=torch.full((B, T), NAN))),
    ("old_logprobs", loss(old_logprobs=torch.zeros(B, T, dtype=torch.int64))),
    ("teacher_logprobs", loss(dict(objective="kd"), teacher_logprobs=[[0.0] * T] * B)),
    ("alpha", lambda: O.trrd_log_ratio(x, x, x, alpha=NAN)),
    ("eps_high", lambda: O.clipped_surrogate(x, x, eps_high="0.2")),
    ("dual_clip", lambda: O.clip_mask(x, x, dual_clip=1.0)),
    ("kind", lambda: O.kl_estimator(x, x, "k4")),
    ("rewards", lambda: O.group_advantages(torch.tensor([NAN, 1.0]), torch.tensor([0, 0]))),
    ("group_ids", lambda: O.group_advantages(torch.ones(3), torch.tensor([0, 0]))),
    ("rewards", lambda: O.group_advantages([1.0, 0.0], torch.tensor([0, 0]))),
    ("mask", lambda: O.aggregation_weights(torch.full((B, T), 0.5))),
    ("max_len", lambda: O.aggregation_weights(torch.ones(B, T, dtype=torch.bool), "dr_grpo", max_len=0)),
    ("mode", lambda: O.aggregation_weights(torch.ones(B, T, dtype=torch.bool), "sum")),
    ("step", lambda: O.beta_at(-1, 0.1, "linear")),
    ("step", lambda: O.beta_at(NAN, 0.1, "linear")),
    ("beta", lambda: O.beta_at(0, NAN)),
    ("total_steps", lambda: O.beta_at(1, 1.0, "cosine", total_steps=-5)),
    ("schedule", lambda: O.beta_at(1, 1.0, "exp")),
    ("correct", lambda: O.kd_sequence_mask(torch.ones(4), mode="incorrect")),
    ("group_ids", lambda: O.kd_sequence_mask(torch.ones(4, dtype=torch.bool), torch.tensor([0, 1]),
                                             "group_all_wrong")),
    ("mode", lambda: O.kd_sequence_mask(torch.ones(4, dtype=torch.bool), mode="all")),
]

def _mutated_config():
    fn = KDRLLoss(objective="grpo")
    fn.config.eps_high = float("nan")
    b = loss_inputs()
    return fn(b["hidden"], b["weight"], b["targets"], b["mask"], advantages=torch.ones(B))


def _not_a_config():
    b = loss_inputs()
    return KDRLLoss({"objective": "grpo"})(b["hidden"], b["weight"], b["targets"], b["mask"],
                                            advantages=torch.ones(B))


VAGUE += [("eps_high", _mutated_config), ("config", _not_a_config)]

ALL = WRONG_VALUES + ACCEPTED_MISTAKES + DTYPE_POLICY + VAGUE


def raises_naming(name, call):
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert name in str(info.value), f"message does not name {name!r}: {info.value}"


def ids(cases):
    return [f"{i}-{name}" for i, (name, _) in enumerate(cases)]


@pytest.mark.parametrize("name,call", WRONG_VALUES, ids=ids(WRONG_VALUES))
def test_inputs_that_returned_wrong_values_are_refused(name, call):
    raises_naming(name, call)


@pytest.mark.parametrize("name,call", ACCEPTED_MISTAKES, ids=ids(ACCEPTED_MISTAKES))
def test_inputs_that_are_surely_a_mistake_are_refused(name, call):
    raises_naming(name, call)


@pytest.mark.parametrize("name,call", DTYPE_POLICY, ids=ids(DTYPE_POLICY))
def test_dtype_policy_refusals(name, call):
    with pytest.raises(TypeError) as info:
        call()
    assert name in str(info.value)


@pytest.mark.parametrize("name,call", VAGUE, ids=ids(VAGUE))
def test_vague_errors_now_name_the_argument(name, call):
    raises_naming(name, call)


def test_count():
    """At least 60 distinct bad inputs across the five entry points; every one gets a clear error."""
    assert len(ALL) >= 60
    failures = []
    for name, call in ALL:
        try:
            call()
        except (ValueError, TypeError) as e:
            if name not in str(e):
                failures.append((name, repr(e)))
        except Exception as e:  # noqa: BLE001 - any other exception is a vague error
            failures.append((name, repr(e)))
        else:
            failures.append((name, "returned a value"))
    assert not failures, f"{len(failures)} of {len(ALL)} bad inputs without a clear error: {failures}"


def test_mixed_dtype_message_names_both():
    h, w, t = lp_inputs()
    with pytest.raises(TypeError, match=r"hidden and weight must have the same dtype.*float32.*bfloat16"):
        fused_linear_logprobs(h, w.bfloat16(), t)


# ---- valid inputs that must keep working (the documented conversions) ----

def test_int32_targets_are_converted():
    h, w, t = lp_inputs()
    torch.testing.assert_close(fused_linear_logprobs(h, w, t.int()), fused_linear_logprobs(h, w, t))
    b = loss_inputs()
    fn = KDRLLoss(objective="grpo")
    l64, _ = fn(b["hidden"], b["weight"], b["targets"], b["mask"], advantages=torch.ones(B))
    l32, _ = fn(b["hidden"], b["weight"], b["targets"].int(), b["mask"], advantages=torch.ones(B))
    torch.testing.assert_close(l32, l64)


def test_float64_is_computed_in_float32():
    h, w, t = lp_inputs()
    out = fused_linear_logprobs(h.double(), w.double(), t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, fused_linear_logprobs(h, w, t), rtol=1e-5, atol=1e-5)


def test_integer_01_mask_is_accepted_as_bool():
    h, w, th, tw = kl_inputs()
    m = torch.tensor([1, 0, 1, 1, 0])
    torch.testing.assert_close(fused_linear_kl(h, w, th, tw, mask=m), fused_linear_kl(h, w, th, tw, mask=m.bool()))
    b = loss_inputs()
    b["mask"][1, 2] = False
    fn = KDRLLoss(objective="grpo")
    lb, _ = fn(b["hidden"], b["weight"], b["targets"], b["mask"], advantages=torch.ones(B))
    li, _ = fn(b["hidden"], b["weight"], b["targets"], b["mask"].long(), advantages=torch.ones(B))
    torch.testing.assert_close(li, lb)


def test_logprobs_allow_rounding_and_anything_off_the_mask():
    b = loss_inputs()
    b["mask"][0, 0] = False
    old = -torch.rand(B, T)
    old[0, 1] = 5e-5  # fp32 rounding of a near-certain token
    old[0, 0] = float("nan")  # padding
    teacher = -torch.rand(B, T)
    teacher[0, 0] = 3.0  # padding
    loss_val, _ = KDRLLoss(objective="kdrl")(b["hidden"], b["weight"], b["targets"], b["mask"],
                                              advantages=torch.ones(B), old_logprobs=old, teacher_logprobs=teacher)
    assert math.isfinite(float(loss_val))


def test_hidden_leading_shapes_and_one_row_vocab_still_work():
    g = torch.Generator().manual_seed(4)
    h, w = torch.randn(2, 3, D, generator=g), torch.randn(1, D, generator=g)
    out = fused_linear_logprobs(h, w, torch.zeros(2, 3, dtype=torch.int64), bias=torch.zeros(1))
    assert out.shape == (2, 3) and torch.allclose(out, torch.zeros(2, 3))
    kl_out = fused_linear_kl(h, torch.randn(7, D), torch.randn(2, 3, 4), torch.randn(7, 4),
                             mask=torch.ones(2, 3, dtype=torch.bool))
    assert kl_out.shape == (2, 3)
    assert fused_linear_logprobs(torch.zeros(0, D), torch.randn(5, D), torch.zeros(0, dtype=torch.int64)).shape == (0,)
    assert fused_linear_logprobs(h, torch.randn(5, D), torch.zeros(2, 3, dtype=torch.int64), chunk_size=None,
                                 backend=None).shape == (2, 3)
