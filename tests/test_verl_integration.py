"""verl 0.9.1 integration (kdrl/integrations/verl_plugin.py), on CPU, called through verl's own entry points.

Needs verl's environment (it cannot share ours: verl 0.9.1 pins transformers<5.11):
    bash scripts/setup_verl.sh
    .venv-verl/bin/python -m pytest tests/test_verl_integration.py
In the default environment the whole file is skipped. No test starts Ray.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _verl_env import require_verl  # noqa: E402

require_verl("test_verl_integration.py")

from tensordict import TensorDict  # noqa: E402
from verl.trainer.distillation.losses import distillation_ppo_loss  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.experimental.torch_functional import FusedLinearForPPO  # noqa: E402
from verl.workers.config import DistillationConfig, DistillationLossConfig, FSDPActorConfig  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding  # noqa: E402

import kdrl.integrations.verl_plugin as vi  # noqa: E402
from kdrl_kernels import KDRLConfig, KDRLLoss, fused_linear_logprobs  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from tolerance import assert_close_to_gt  # noqa: E402

ROOT = Path(__file__).parent.parent
# fp32 tolerances: the two implementations sum the same fp32 terms in a different order
VAL = dict(rtol=1e-5, atol=1e-6)
GRAD = dict(rtol=1e-4, atol=1e-6)


def _grads(*tensors):
    out = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out


# ----------------------------------------------------------------------------------------------------------------
# (a) the fused hidden-state backend


@pytest.mark.parametrize("shape", [(37,), (3, 29)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_backend_equals_verl_torch_backend_fp32(shape, temperature):
    """Same log-probs, entropies and gradients (through both outputs) as verl's FusedLinearForPPO."""
    g = torch.Generator().manual_seed(0)
    d, V = 48, 1000
    h = torch.randn(*shape, d, generator=g).requires_grad_()
    w = (0.2 * torch.randn(V, d, generator=g)).requires_grad_()
    ids = torch.randint(0, V, shape, generator=g)
    a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)

    lp_v, ent_v = FusedLinearForPPO(chunk_size=16)(h, w, ids, temperature)  # 16: several chunks
    ((a * lp_v).sum() + (b * ent_v).sum()).backward()
    gh_v, gw_v = _grads(h, w)
    lp, ent = vi.kdrl_backend_logprobs(h, w, ids, temperature)
    ((a * lp).sum() + (b * ent).sum()).backward()
    gh, gw = _grads(h, w)

    assert lp.dtype == torch.float32 and lp.shape == lp_v.shape and ent.shape == ent_v.shape
    assert (lp <= 0).all()
    torch.testing.assert_close(lp, lp_v, **VAL)
    torch.testing.assert_close(ent, ent_v.float(), **VAL)
    torch.testing.assert_close(gh, gh_v, **GRAD)
    torch.testing.assert_close(gw, gw_v, **GRAD)


def test_backend_bf16_no_worse_than_verl_torch_backend():
    """bf16 inputs: ours within verl's own error of a float64 reference (verl rounds its logits to bf16 first)."""
    g = torch.Generator().manual_seed(1)
    N, d, V = 64, 64, 2000
    h64 = torch.randn(N, d, generator=g, dtype=torch.float64)
    w64 = 0.2 * torch.randn(V, d, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (N,), generator=g)
    h, w = h64.bfloat16(), w64.bfloat16()
    z = (h.double() @ w.double().T) / 0.9
    lp_gt = z.log_softmax(-1).gather(1, ids[:, None]).squeeze(1)
    ent_gt = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    lp_v, ent_v = FusedLinearForPPO()(h, w, ids, 0.9)
    lp, ent = vi.kdrl_backend_logprobs(h, w, ids, 0.9)
    assert lp.dtype == torch.float32 and (lp <= 0).all()
    assert_close_to_gt(lp, lp_gt, lp_v, 1e-5, "log_probs")
    assert_close_to_gt(ent, ent_gt, ent_v, 1e-5, "entropy")


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).float()


def _run_patched(model, backend, input_ids, attention_mask, position_ids, a, b):
    from verl.models.transformers.monkey_patch import apply_monkey_patch

    apply_monkey_patch(model, use_remove_padding=False, use_fused_kernels=True, fused_kernels_backend=backend)
    model.zero_grad()
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, return_dict=True,
                temperature=0.8)
    ((a * out.log_probs).sum() + (b * out.entropy).sum()).backward()
    return out.log_probs.detach(), out.entropy.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_impl_backend_kdrl_through_verl_monkey_patch():
    """verl's own apply_monkey_patch with impl_backend=kdrl gives the model forward of impl_backend=torch."""
    model = _tiny_llama()
    original_forward = type(model).forward
    try:
        g = torch.Generator().manual_seed(2)
        input_ids = torch.randint(0, 256, (2, 12), generator=g)
        attention_mask = torch.ones_like(input_ids)
        position_ids = torch.arange(12).expand(2, 12)
        a, b = torch.randn(2, 12, generator=g), torch.randn(2, 12, generator=g)
        lp_t, ent_t, g_t = _run_patched(model, "torch", input_ids, attention_mask, position_ids, a, b)
        lp_k, ent_k, g_k = _run_patched(model, vi.BACKEND, input_ids, attention_mask, position_ids, a, b)
        assert type(model).forward is vi.forward_with_kdrl_backend
        assert model._verl_fused_kernels_backend == vi.BACKEND
        torch.testing.assert_close(lp_k, lp_t, **VAL)
        torch.testing.assert_close(ent_k, ent_t.float(), **VAL)
        assert g_t.keys() == g_k.keys()
        for name in g_t:
            torch.testing.assert_close(g_k[name], g_t[name], **GRAD, msg=lambda m: f"{name}: {m}")
    finally:
        type(model).forward = original_forward


# ----------------------------------------------------------------------------------------------------------------
# (b) KDRL and TRRD through verl's distillation-loss registry


def _actor_config(**kw):
    return FSDPActorConfig(strategy="fsdp", ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=4,
                           rollout_n=1, loss_agg_mode="token-mean", clip_ratio=0.2, clip_ratio_low=0.2,
                           clip_ratio_high=0.28, clip_ratio_c=3.0, use_dynamic_bsz=False, **kw)


def _distillation_config(loss_mode, **kw):
    loss = DistillationLossConfig(loss_mode=loss_mode, use_policy_gradient=False, loss_max_clamp=None, **kw)
    # enabled=False only skips the teacher-pool checks of __post_init__ (no teacher server here); verl's loss entry
    # reads nothing but distillation_loss
    return DistillationConfig(enabled=False, distillation_loss=loss)


PROMPT_LENS, RESP_LENS, P, R = [5, 3, 4, 2], [6, 4, 1, 5], 5, 6


def _batch(seed=3, rollout_weights=False, step=7):
    """A batch as verl's trainer hands it to the actor: left/right padded, then verl's left_right_2_no_padding.

    Returns the TensorDict, the packed hidden states (leaf, nnz x d), the lm_head weight (leaf), and the tensors
    KDRLLoss needs on the response tokens: (B, R) index into the packed rows, targets, mask and the rest.
    """
    g = torch.Generator().manual_seed(seed)
    B, S, d, V = len(PROMPT_LENS), P + R, 24, 300
    prompts = torch.zeros(B, P, dtype=torch.long)
    responses = torch.zeros(B, R, dtype=torch.long)
    attn = torch.zeros(B, S, dtype=torch.long)
    for i, (pl, rl) in enumerate(zip(PROMPT_LENS, RESP_LENS)):
        prompts[i, P - pl:] = torch.randint(1, V, (pl,), generator=g)
        responses[i, :rl] = torch.randint(1, V, (rl,), generator=g)
        attn[i, P - pl:P + rl] = 1
    input_ids = torch.cat([prompts, responses], 1)
    position_ids = (attn.cumsum(1) - 1).clamp(min=0)
    resp_mask = attn[:, P:].clone()
    nnz = int(attn.sum())
    hidden = torch.randn(nnz, d, generator=g).requires_grad_()
    weight = (0.3 * torch.randn(V, d, generator=g)).requires_grad_()
    # packed row that predicts response token j of sequence i: offset_i + prompt_len_i + j - 1
    offsets = torch.tensor([0] + list(torch.tensor(PROMPT_LENS) + torch.tensor(RESP_LENS))).cumsum(0)
    rows = torch.zeros(B, R, dtype=torch.long)
    for i, pl in enumerate(PROMPT_LENS):
        rows[i] = offsets[i] + pl - 1 + torch.arange(R)
    rows = rows.clamp(max=nnz - 1)
    # old policy and teacher near the student, so that some tokens are clipped and some are not
    s_now = fused_linear_logprobs(hidden.detach()[rows], weight.detach(), responses)
    old = s_now + 0.2 * torch.randn(B, R, generator=g)
    t_resp = (s_now + 0.6 * torch.randn(B, R, generator=g)).clamp(max=0)
    teacher_full = torch.zeros(B, S, 1)  # position c holds the teacher's log-prob of token c+1, as verl stores it
    teacher_full[:, P - 1:P + R - 1, 0] = t_resp
    teacher_ids = torch.roll(input_ids, -1, 1)[..., None]
    adv = torch.randn(B, 1, generator=g).expand(B, R).contiguous()
    scores = torch.zeros(B, R)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    for i, rl in enumerate(RESP_LENS):
        scores[i, rl - 1] = rewards[i]
    fields = dict(prompts=prompts, responses=responses, input_ids=input_ids, attention_mask=attn,
                  position_ids=position_ids, response_mask=resp_mask, old_log_probs=old, advantages=adv,
                  teacher_logprobs=teacher_full, teacher_ids=teacher_ids, token_level_scores=scores)
    is_w = None
    if rollout_weights:
        is_w = 0.5 + torch.rand(B, R, generator=g)
        fields["rollout_is_weights"] = is_w
    td = TensorDict(fields, batch_size=[B])
    td = left_right_2_no_padding(td)
    n_tokens = int(resp_mask.sum())
    tu.assign_non_tensor(td, dp_size=1, batch_num_tokens=n_tokens, global_batch_size=B, global_steps=step)

    # verl counts steps from 1, KDRLConfig's schedules from 0
    ref = dict(rows=rows, targets=responses, mask=resp_mask.bool(), old=old, adv=adv, teacher=t_resp,
               correct=rewards > 0, is_w=is_w, step=step - 1)
    return td, hidden, weight, ref


def _verl_loss(td, hidden, weight, actor_cfg, dist_cfg):
    """The student's per-token log-probs as verl's FSDP engine returns them, then verl's actor loss entry."""
    ids = td["input_ids"]
    targets = torch.roll(ids.values(), -1)  # verl rolls the packed (1, nnz) ids
    lp = fused_linear_logprobs(hidden, weight, targets)
    model_output = {"log_probs": torch.nested.nested_tensor_from_jagged(lp, offsets=ids.offsets())}
    return distillation_ppo_loss(actor_cfg, dist_cfg, model_output=model_output, data=td)


def _ours(cfg, hidden, weight, ref, pg_weights=None):
    h = hidden[ref["rows"]]
    return KDRLLoss(cfg)(h, weight, ref["targets"], ref["mask"], advantages=ref["adv"], old_logprobs=ref["old"],
                         teacher_logprobs=ref["teacher"], correct=ref["correct"], step=ref["step"],
                         pg_weights=pg_weights)


def _compare(loss_v, loss_o, hidden, weight):
    loss_v.backward()
    gh_v, gw_v = _grads(hidden, weight)
    loss_o.backward()
    gh_o, gw_o = _grads(hidden, weight)
    torch.testing.assert_close(loss_v, loss_o, **VAL)
    torch.testing.assert_close(gh_v, gh_o, **GRAD)
    torch.testing.assert_close(gw_v, gw_o, **GRAD)
    assert gw_o.abs().max() > 0


@pytest.fixture
def kdrl_config():
    yield lambda **kw: vi.install(KDRLConfig(**kw))
    vi.set_config(KDRLConfig())


@pytest.mark.parametrize("schedule,kd_mask,coef", [("constant", "none", 1.0), ("linear", "incorrect", 0.5),
                                                   ("cosine", "incorrect", 1.0)])
def test_kdrl_joint_equals_kdrl_loss(kdrl_config, schedule, kd_mask, coef):
    """verl's policy loss + our registered KD term == KDRLLoss(objective='kdrl') on the same tensors."""
    fields = dict(objective="kdrl", kl_estimator="k2", beta=0.3, beta_schedule=schedule, beta_min=0.05,
                  beta_decay=0.02, total_steps=10 if schedule == "cosine" else None, kd_mask=kd_mask)
    kdrl_config(**fields)
    td, hidden, weight, ref = _batch()
    loss_v, metrics = _verl_loss(td, hidden, weight, _actor_config(),
                                 _distillation_config(vi.KDRL_LOSS, use_task_rewards=True,
                                                      distillation_loss_coef=coef))
    # verl's vanilla policy loss always dual-clips at clip_ratio_c
    cfg = KDRLConfig(**fields, eps_low=0.2, eps_high=0.28, dual_clip=3.0, aggregation="token_mean")
    loss_o, m_o = _ours(cfg, hidden, weight, ref)
    assert metrics["kdrl/beta"] == pytest.approx(m_o["beta"])
    _compare(loss_v, loss_o, hidden, weight)


def test_pure_kd_equals_kdrl_loss_kd(kdrl_config):
    """use_task_rewards=False: the registered loss alone is on-policy KD (KDRLLoss objective='kd'), mask kept."""
    kdrl_config(objective="kd", kl_estimator="k2", kd_mask="incorrect")
    td, hidden, weight, ref = _batch(seed=4)
    loss_v, _ = _verl_loss(td, hidden, weight, _actor_config(), _distillation_config(vi.KDRL_LOSS,
                                                                                       use_task_rewards=False))
    loss_o, _ = _ours(KDRLConfig(objective="kd", kl_estimator="k2", kd_mask="incorrect"), hidden, weight, ref)
    _compare(loss_v, loss_o, hidden, weight)


@pytest.mark.parametrize("rollout_weights", [False, True])
def test_trrd_equals_kdrl_loss_trrd(kdrl_config, rollout_weights):
    """loss_mode=kdrl_trrd == KDRLLoss(objective='trrd') with verl's clip range, dual clip and rollout weights."""
    kdrl_config(objective="trrd", trrd_alpha=0.6, trrd_clamp=0.5)
    td, hidden, weight, ref = _batch(seed=5, rollout_weights=rollout_weights)
    loss_v, metrics = _verl_loss(td, hidden, weight, _actor_config(),
                                 _distillation_config(vi.TRRD_LOSS, use_task_rewards=False))
    cfg = KDRLConfig(objective="trrd", trrd_alpha=0.6, trrd_clamp=0.5, eps_low=0.2, eps_high=0.28, dual_clip=3.0)
    loss_o, _ = _ours(cfg, hidden, weight, ref, pg_weights=ref["is_w"])
    assert 0.05 < metrics["kdrl/clip_frac"] < 0.95  # both branches of the clip are exercised
    _compare(loss_v, loss_o, hidden, weight)


def test_refusals(kdrl_config):
    td, hidden, weight, _ = _batch()
    actor = _actor_config()
    kdrl_config(kd_mask="group_all_wrong")
    with pytest.raises(ValueError, match="micro-batch"):
        _verl_loss(td, hidden, weight, actor, _distillation_config(vi.KDRL_LOSS))
    kdrl_config(objective="trrd")
    with pytest.raises(ValueError, match="use_task_rewards=False"):
        _verl_loss(td, hidden, weight, actor, _distillation_config(vi.TRRD_LOSS, use_task_rewards=True))
    with pytest.raises(ValueError, match="not GRPO \\+ a KD loss term"):  # kdrl's joint form needs GRPO's pg term
        _verl_loss(td, hidden, weight, actor, _distillation_config(vi.KDRL_LOSS, use_task_rewards=True))
    vi.set_config(objective="trrd", eps_low=0.1)  # the actor's clip_ratio_low is 0.2: refused, not ignored
    with pytest.raises(ValueError, match="eps_low=0.1 disagrees"):
        _verl_loss(td, hidden, weight, actor, _distillation_config(vi.TRRD_LOSS, use_task_rewards=False))
    kdrl_config()
    with pytest.raises(ValueError, match="objective='trrd'"):
        _verl_loss(td, hidden, weight, actor, _distillation_config(vi.TRRD_LOSS, use_task_rewards=False))
    loss = DistillationLossConfig(loss_mode=vi.KDRL_LOSS, use_policy_gradient=True, loss_max_clamp=None)
    with pytest.raises(ValueError, match="use_policy_gradient=False"):
        _verl_loss(td, hidden, weight, actor, DistillationConfig(enabled=False, distillation_loss=loss))
    loss = DistillationLossConfig(loss_mode=vi.KDRL_LOSS, use_policy_gradient=False)  # verl's default clamp 10
    with pytest.raises(ValueError, match="loss_max_clamp=null"):
        _verl_loss(td, hidden, weight, actor, DistillationConfig(enabled=False, distillation_loss=loss))


def test_config_from_environment(monkeypatch):
    monkeypatch.setattr(vi, "_config", None)
    monkeypatch.setenv(vi.ENV_CONFIG, json.dumps({"beta": 0.01, "kd_mask": "incorrect"}))
    cfg = vi.get_config()
    assert cfg.beta == 0.01 and cfg.kd_mask == "incorrect"
    monkeypatch.setenv(vi.ENV_CONFIG, json.dumps({"betta": 1}))
    with pytest.raises(ValueError, match="unknown .*KDRLConfig field"):
        vi.get_config()


def test_external_module_hook_registers_before_config_validation():
    """`VERL_USE_EXTERNAL_MODULES=kdrl.integrations.verl_plugin` (how a launch loads us): `import verl` alone registers
    the losses and the backend, so the driver's DistillationLossConfig(loss_mode='kdrl') validates."""
    code = ("import verl\n"
            "from verl.workers.config import DistillationLossConfig\n"
            "import verl.models.transformers.monkey_patch as mp\n"
            "DistillationLossConfig(loss_mode='kdrl', use_policy_gradient=False, loss_max_clamp=None)\n"
            "DistillationLossConfig(loss_mode='kdrl_trrd', use_policy_gradient=False, use_task_rewards=False)\n"
            "assert hasattr(mp.patch_forward_with_backends, '_kdrl_original')\n"
            "import verl.utils.config as vc\n"
            "assert hasattr(vc.validate_config, '_kdrl_original')\n"
            "import kdrl.integrations.verl_plugin as vi\n"
            "assert vi.get_config().beta == 0.004\n"
            "print('ok')\n")
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="kdrl.integrations.verl_plugin", KDRL_VERL_CONFIG='{"beta": 0.004}',
               PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
