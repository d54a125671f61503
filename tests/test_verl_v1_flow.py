"""verl 0.9.1's v1 trainer data flow into our losses, checked against float64 full-logits formulas.

The actor's batch is what verl's own code assembles (tests/_verl_v1_flow.py: the agent loop's post-processing, the
trainer's ``_compute_advantage`` and ``_update_actor``, the worker's ``train_mini_batch``, the FSDP engine's packed
``use_remove_padding`` forward with ``shift_labels`` and the fused ``kdrl`` backend, the loss entry
``distillation_ppo_loss``), on a tiny random Llama. The expected loss and lm_head gradient are written here from
docs/objectives.md in float64 on the final hidden states the engine produced (not through kdrl_kernels' objective
functions or registry).

Needs verl's environment (``bash scripts/setup_verl.sh``); skipped elsewhere. No test starts Ray.
"""
import json
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from _verl_env import require_verl  # noqa: E402

require_verl("test_verl_v1_flow.py", "transfer_queue")

from transfer_queue import KVBatchMeta  # noqa: E402
from verl.trainer.distillation.losses import distillation_ppo_loss  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass  # noqa: E402

import kdrl.integrations.verl_plugin as vi  # noqa: E402
from kdrl_kernels import KDRLConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import _test_objective as TO  # noqa: E402
import _verl_v1_flow as F  # noqa: E402

V, D = 96, 32
N_PROMPTS, N = 3, 2  # GRPO groups of 2; 6 responses in one mini-batch, 3 micro-batches of 2
PROMPTS = [[3, 14, 15, 9], [26, 5], [35, 8, 9, 7, 9]]
RESPONSES = [[32, 38, 46], [26, 43, 38, 32, 7], [95, 2, 8, 8], [41, 77], [16, 9, 39, 9, 37, 51], [5, 82, 9]]
REWARDS = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]  # the third group is all wrong: advantages 0 there
STEP = 5  # verl's global_steps (counted from 1): the schedule's step 4


def _overrides(loss_mode, task_rewards, *extra):
    return ["algorithm.adv_estimator=grpo", f"actor_rollout_ref.rollout.n={N}",
            f"actor_rollout_ref.actor.ppo_mini_batch_size={N_PROMPTS}",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", "actor_rollout_ref.actor.strategy=fsdp",
            "actor_rollout_ref.actor.clip_ratio_low=0.2", "actor_rollout_ref.actor.clip_ratio_high=0.28",
            "actor_rollout_ref.actor.clip_ratio_c=3.0", "actor_rollout_ref.model.use_remove_padding=True",
            "distillation.enabled=True", "distillation.n_gpus_per_node=1", "distillation.nnodes=1",
            "distillation.teacher_models.teacher_model.model_path=unused",
            "distillation.teacher_models.teacher_model.inference.tensor_model_parallel_size=1",
            f"distillation.distillation_loss.loss_mode={loss_mode}",
            f"distillation.distillation_loss.use_task_rewards={task_rewards}",
            "distillation.distillation_loss.use_policy_gradient=False",
            "distillation.distillation_loss.loss_max_clamp=null", *extra]


def _llama(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64)).float()


def _sequence_logprobs(model, ids):
    """log-probs of ``ids[1:]`` under ``model`` run on one sequence (float64 softmax of its fp32 logits)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    return logits.log_softmax(-1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def run_flow(fields, loss_mode, task_rewards, backend="kdrl", extra=(), old_shift=None, monkeypatch=None):
    """One actor update of verl's v1 flow with our loss; returns what the test needs to check it. With
    ``monkeypatch`` the KDRL config reaches the loss as on Ray workers, as JSON in $KDRL_VERL_CONFIG."""
    if monkeypatch is not None:
        monkeypatch.setattr(vi, "_config", None)
        monkeypatch.setenv(vi.ENV_CONFIG, json.dumps(fields))
    else:
        vi.set_config(**fields)
    with F.fake_tq() as fake:
        return _run_flow(fake, loss_mode, task_rewards, backend, extra, old_shift)


def _run_flow(fake, loss_mode, task_rewards, backend, extra, old_shift):
    config = F.launch_config(_overrides(loss_mode, task_rewards, *extra))
    prompts = [PROMPTS[i // N] for i in range(N_PROMPTS * N)]
    teacher = _llama(seed=1)
    t_full = []
    for p, r in zip(prompts, RESPONSES):
        lp = _sequence_logprobs(teacher, p + r).float()
        t_full.append(torch.cat([lp, torch.zeros(1)]))  # the teacher server's layout: a 0 after the last token
    keys = F.rollout_fields(fake, prompts, RESPONSES, REWARDS, t_full, step=STEP, n=N)
    meta = KVBatchMeta(keys=keys, tags=[{} for _ in keys], partition_id="train")
    meta = F.compute_advantage(config, fake, meta)

    student = _llama(seed=0)
    # old policy = the current one shifted token by token, so that ratios land on every side of the clip range
    # (above 1 + eps_high, below 1 - eps_low, and beyond the dual clip 3 on negative advantages)
    g = torch.Generator().manual_seed(7)
    old = []
    for p, r in zip(prompts, RESPONSES):
        s_now = _sequence_logprobs(student, p + r)[len(p) - 1:].float()
        shift = old_shift if old_shift is not None else torch.tensor([1.6, -1.6, 0.5, -0.1, 0.05, 0.3])
        old.append(s_now - shift[torch.randperm(len(shift), generator=g)[:len(r)] % len(shift)])
    from verl.models.transformers.monkey_patch import apply_monkey_patch
    original_forward = type(student).forward
    fake.kv_batch_put(keys, "train", tu.list_of_dict_to_tensordict([{"old_log_probs": o} for o in old]))
    try:
        apply_monkey_patch(student, use_remove_padding=True, use_fused_kernels=True, fused_kernels_backend=backend)
        hidden = []
        hook = student.model.register_forward_hook(lambda m, a, out: hidden.append(out[0].detach()))
        actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
        dist = omega_conf_to_dataclass(config.distillation)
        loss_fn = partial(distillation_ppo_loss, config=actor, distillation_config=dist)  # as the worker builds it
        metrics, seen, grads = F.update_actor(config, fake, meta, student, loss_fn, micro_batch_size=2)
        hook.remove()
    finally:
        type(student).forward = original_forward
        vi.set_config(KDRLConfig())
    assert len(grads) == 1 and len(seen) == len(hidden) == 3  # one optimizer step, three micro-batches
    return dict(metrics=metrics, seen=seen, hidden=hidden, grad_w=grads[0][id(student.lm_head.weight)],
                weight=student.lm_head.weight.detach(), t_full=t_full, prompts=prompts)


def _dense(x, pad=0.0):
    return x.to_padded_tensor(pad) if x.is_nested else x


def reference(run, per_token, temperature=1.0):
    """The update's loss and lm_head gradient in float64: ``sum over micro-batches of sum(per_token * mask) / n``
    (verl's token-mean over the mini-batch's response tokens), with the student's log-probs recomputed from the
    engine's packed final hidden states and ``per_token(s, t, old, adv, correct)`` a formula from the docs."""
    W = run["weight"].double().requires_grad_()
    n_tokens = sum(int(_dense(b["response_mask"]).sum()) for b in run["seen"])
    total = 0.0
    for data, h in zip(run["seen"], run["hidden"]):
        ids = data["input_ids"].values()
        logp = ((h[0].double() @ W.T) / temperature).log_softmax(-1)
        labels = torch.roll(ids, -1)  # position c predicts token c + 1 of the packed sequence
        s_packed = logp.gather(1, labels[:, None])[:, 0]
        p_len = data["prompts"].offsets().diff()
        r_len = data["responses"].offsets().diff()
        starts = torch.cat([torch.zeros(1, dtype=torch.long), (p_len + r_len).cumsum(0)[:-1]])
        teacher = data["teacher_logprobs"].unbind()
        old, adv = _dense(data["old_log_probs"]).double(), _dense(data["advantages"]).double()
        correct = _dense(data["rm_scores"]).sum(-1) > 0
        for b in range(len(p_len)):
            rows = starts[b] + p_len[b] - 1 + torch.arange(int(r_len[b]))
            s = s_packed[rows]
            t = teacher[b][p_len[b] - 1:p_len[b] - 1 + r_len[b], 0].double()
            total = total + per_token(s, t, old[b, :r_len[b]], adv[b, :r_len[b]], bool(correct[b])).sum()
    loss = total / n_tokens
    loss.backward()
    return float(loss), W.grad.float()


def surrogate(log_ratio, adv, eps_low, eps_high, c=None):
    """docs/objectives.md: ``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)``, dual-clipped at ``-c A`` for A < 0."""
    r = log_ratio.exp()
    loss = torch.maximum(-r * adv, -r.clamp(1 - eps_low, 1 + eps_high) * adv)
    if c is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -c * adv), loss)
    return loss


def check(run, ref_loss, ref_grad):
    loss = float(run["metrics"]["actor/loss"])
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss) + 1e-6, (loss, ref_loss)
    torch.testing.assert_close(run["grad_w"], ref_grad, rtol=1e-4, atol=1e-6)
    assert run["grad_w"].abs().max() > 1e-3


def test_readme_example_b_kdrl_linear_beta_incorrect_mask(monkeypatch):
    """README launch (b): loss_mode=kdrl, use_task_rewards=True, linear beta, kd_mask=incorrect, the config as JSON in
    $KDRL_VERL_CONFIG. The step comes from the per-sample global_steps the v1 trainer stores, correctness from
    rm_scores. (beta and its decay are larger than the README's so that the KD term shows in the loss.)"""
    fields = {"beta": 5e-2, "beta_schedule": "linear", "beta_decay": 5e-3, "beta_min": 1e-3, "kd_mask": "incorrect"}
    run = run_flow(fields, "kdrl", True, monkeypatch=monkeypatch)
    beta = max(5e-2 - 5e-3 * (STEP - 1), 1e-3)  # KDRL's annealing at schedule step 4 (verl's step 5)
    assert run["metrics"]["actor/kdrl/beta"] == pytest.approx(beta)

    def per_token(s, t, old, adv, correct):
        kd = 0.0 if correct else 0.5 * (t - s) ** 2
        return surrogate(s - old, adv, 0.2, 0.28, 3.0) + beta * kd

    ref_loss, ref_grad = reference(run, per_token)
    check(run, ref_loss, ref_grad)
    # the mask and the schedule matter here: without them the loss is another number
    unmasked, _ = reference(run, lambda s, t, o, a, c: surrogate(s - o, a, 0.2, 0.28, 3.0) + 5e-2 * 0.5 * (t - s) ** 2)
    assert abs(unmasked - ref_loss) > 50 * (1e-5 * abs(ref_loss) + 1e-6)


def test_trrd_dual_clip_on_packed_input():
    """loss_mode=kdrl_objective with objective=trrd: TRRD's ratio to pi_old^a * pi_T^(1-a), verl's clip range and
    dual clip, with ratios beyond 3 on negative advantages."""
    fields = {"objective": "trrd", "trrd_alpha": 0.5, "trrd_clamp": 1.0}
    run = run_flow(fields, "kdrl_objective", False, old_shift=torch.tensor([3.0, -1.0, 0.2, -0.1, 2.4, -0.6]))

    def log_ratio(s, t, old):
        return 0.5 * (s - old) + 0.5 * (s - t).clamp(-1.0, 1.0)

    beyond = []

    def per_token(s, t, old, adv, correct):
        beyond.append(int(((adv < 0) & (log_ratio(s, t, old).exp() > 3.0)).sum()))
        return surrogate(log_ratio(s, t, old), adv, 0.2, 0.28, 3.0)

    ref_loss, ref_grad = reference(run, per_token)
    check(run, ref_loss, ref_grad)
    assert sum(beyond) >= 2, f"{sum(beyond)} tokens with ratio > 3 and A < 0: the dual clip is not exercised"
    no_dual, _ = reference(run, lambda s, t, o, a, c: surrogate(log_ratio(s, t, o), a, 0.2, 0.28, None))
    assert abs(no_dual - ref_loss) > 50 * (1e-5 * abs(ref_loss) + 1e-6)


def test_test_only_objective_reaches_verl():
    """An objective registered by its declaration alone runs in verl (loss_mode=kdrl_objective)."""
    with TO.registered():
        run = run_flow({"objective": TO.NAME, "beta": 0.1}, "kdrl_objective", False)

    def per_token(s, t, old, adv, correct):  # written from _test_objective's docstring: pg + 3 beta k2
        return surrogate(s - old, adv - 0.1 * (s - t).detach(), 0.2, 0.28, 3.0) + 3 * 0.1 * 0.5 * (t - s) ** 2

    ref_loss, ref_grad = reference(run, per_token)
    check(run, ref_loss, ref_grad)


def test_fused_backend_packed_equals_verl_torch_backend():
    """The same packed update with impl_backend=kdrl and verl's own impl_backend=torch: same loss, same gradient."""
    fields = {"objective": "kdrl", "beta": 0.2}
    ours = run_flow(fields, "kdrl", True, backend="kdrl")
    theirs = run_flow(fields, "kdrl", True, backend="torch")
    assert float(ours["metrics"]["actor/loss"]) == pytest.approx(float(theirs["metrics"]["actor/loss"]), rel=1e-5)
    torch.testing.assert_close(ours["grad_w"], theirs["grad_w"], rtol=1e-4, atol=1e-6)
