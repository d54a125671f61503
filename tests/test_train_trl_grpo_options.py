"""Every KDRLConfig option under KDRLGRPOTrainer is honoured or refused at construction: the reward-guided group mask
over TRL's shuffled micro-batches, the dual clip (which TRL lacks) against a float64 formula, the options TRL decides
itself refused; a registered test-only objective reaches TRL unchanged; the TRL hooks we override are the ones we were
written for. Tiny random Llama, CPU."""
import copy
import functools

import pytest
import torch

pytest.importorskip("trl")
from _train_tiny import one_thread  # noqa: E402,F401
from _trl_grpo import P, T, _batch, _load, _loss_and_grads, _ours, _theirs, make_tiny  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory)


def _f64_logps(model, inputs, temperature=1.0):
    """``(B, T)`` float64 log-probs of the completion tokens from a float64 copy's full logits (positions counting
    attended tokens, as the subclass's forward passes them), and the copy (its gradients are the reference's)."""
    model = copy.deepcopy(model).double()
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    pos = (att.cumsum(-1) - 1).clamp_min(0)
    logits = model(input_ids=ids, attention_mask=att, position_ids=pos).logits[:, P - 1:-1] / temperature
    return logits.log_softmax(-1).gather(-1, inputs["completion_ids"][..., None])[..., 0], model


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_equal_f64(got, want_loss, want_grads):
    loss, grads = got
    torch.testing.assert_close(loss.double(), want_loss.detach(), rtol=1e-5, atol=1e-6)
    assert grads.keys() == want_grads.keys() and "lm_head.weight" in grads
    for name, g in want_grads.items():  # fp32 against float64: within 1e-4 of the tensor's largest entry
        assert (grads[name].double() - g).abs().max() <= 1e-4 * g.abs().max(), name


@pytest.mark.parametrize("field, value, match", [
    ("adv_eps", 1e-3, "adv_eps=0.001: TRL computes the advantages"),
    ("scale_rewards", False, "scale_rewards=False: TRL computes the advantages"),
    ("aggregation", "seq_mean", "TRL's loss_type decides the normaliser"),
    ("max_len", 64, "TRL's loss_type decides the normaliser"),
])
def test_options_trl_decides_are_refused(tiny, tmp_path, field, value, match):
    from kdrl_kernels import KDRLConfig
    with pytest.raises(ValueError, match=match):
        _ours(tiny, tmp_path, kdrl=KDRLConfig(objective="grpo", **{field: value}))


def test_sharded_lm_head_is_refused(tiny, tmp_path, monkeypatch):
    """ZeRO-3 (and FSDP, checked the same way) would partition the lm_head weight the loss reads outside the forward."""
    import transformers.integrations.deepspeed as ds
    monkeypatch.setattr(ds, "is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(ValueError, match="DeepSpeed ZeRO-3"):
        _ours(tiny, tmp_path)


def test_exact_kl_metric_on_a_teacherless_objective_reads_the_teacher(tiny, tmp_path):
    """grpo with log_exact_kl=True logs the exact KL to the teacher (registry.teacher_input says "hidden"): it needs a
    teacher_model, and with one the loss is GRPO's while kdrl/exact_kl is logged."""
    from kdrl_kernels import KDRLConfig
    cfg = KDRLConfig(objective="grpo", log_exact_kl=True)
    with pytest.raises(ValueError, match=r"\(log_exact_kl=True\) needs teacher_model"):
        _ours(tiny, tmp_path, kdrl=cfg)
    with pytest.raises(ValueError, match=r"\(objective='kdrl'\) needs teacher_model"):
        _ours(tiny, tmp_path, kdrl=KDRLConfig(objective="kdrl"))
    trainer = _ours(tiny, tmp_path, teacher=True, kdrl=cfg)
    plain = _ours(tiny, tmp_path, model=copy.deepcopy(trainer.model), kdrl=KDRLConfig(objective="grpo"))
    inputs = _batch(trainer)
    inputs.update(trainer._teacher_inputs(inputs))
    assert "teacher_hidden" in inputs
    loss, _ = _loss_and_grads(trainer, inputs)
    torch.testing.assert_close(loss, _loss_and_grads(plain, _batch(plain))[0])
    assert trainer._metrics["train"]["kdrl/exact_kl"][-1] > 0


def test_group_all_wrong_mask_spans_the_shuffled_generation_batch(tiny, tmp_path):
    """kd_mask="group_all_wrong": TRL generates 2 prompts x 4 completions, shuffles them and splits them into two
    micro-batches, so no micro-batch holds a whole group. Only the first completion of prompt "0 + 1" is correct; in
    every micro-batch the KD term must cover exactly the completions of prompt "5 + 1" (a group with no correct
    completion): kd_loss recomputed by hand (k2 of float64 student log-probs against the teacher's, over those
    sequences' tokens, divided by the micro-batch's tokens)."""
    from datasets import Dataset

    from kdrl_kernels import KDRLConfig

    student_dir, teacher_dir, tok, _ = tiny
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}]} for i in (0, 5)])

    def reward(prompts, completions, **kw):
        first = [i for i, p in enumerate(prompts) if "0 + 1" in p[-1]["content"]][0]
        return [float(i == first) for i in range(len(completions))]

    from kdrl.integrations.trl_grpo import KDRLGRPOTrainer
    from trl import GRPOConfig
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                      gradient_accumulation_steps=2, max_completion_length=T, max_steps=1, learning_rate=1e-2,
                      use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", bf16=False, seed=0)
    trainer = KDRLGRPOTrainer(model=_load(student_dir), reward_funcs=reward, args=args, train_dataset=data,
                              processing_class=tok, teacher_model=_load(teacher_dir),
                              kdrl_config=KDRLConfig(objective="kdrl", beta=0.5, kd_mask="group_all_wrong"))
    seen = []
    forward = trainer.kdrl_loss.forward

    def keep(hidden, weight, targets, mask, **kw):
        loss, metrics = forward(hidden, weight, targets, mask, **kw)
        seen.append((hidden.detach(), weight.detach().clone(), targets, mask, kw, metrics))  # before the update
        return loss, metrics
    trainer.kdrl_loss.forward = keep
    prompts = []
    compute = trainer._compute_loss

    def keep_prompts(model, inputs):
        prompts.append(tok.batch_decode(inputs["prompt_ids"], skip_special_tokens=True))
        return compute(model, inputs)
    trainer._compute_loss = keep_prompts
    trainer.train()
    assert len(seen) == 2
    for (hidden, weight, targets, mask, kw, metrics), texts in zip(seen, prompts):
        all_wrong = torch.tensor(["5 + 1" in t for t in texts])
        assert 0 < int(all_wrong.sum()) < 4  # each micro-batch mixes the two groups
        s = torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(-1, targets[..., None])[..., 0]
        k2 = 0.5 * (s - kw["teacher_logprobs"].double()) ** 2
        want = (k2 * (mask & all_wrong[:, None])).sum() / mask.sum()
        assert metrics["kd_loss"] == pytest.approx(float(want), rel=1e-5)


def test_dual_clip_equals_a_float64_formula(tiny, tmp_path):
    """dual_clip=3 (TRL has none; KDRLLoss applies it to the policy ratio): negative-advantage tokens with a ratio
    above 3 lose the gradient and cost -3 A. Against TRL's own per-token surrogate with the dual bound added, in
    float64 (bnpo: the micro-batch token mean over 2 accumulation steps)."""
    from kdrl_kernels import KDRLConfig

    model = _load(tiny[0])
    ours = _ours(tiny, tmp_path, model=copy.deepcopy(model), loss_type="bnpo",
                 kdrl=KDRLConfig(objective="grpo", dual_clip=3.0))
    theirs = _theirs(tiny, tmp_path, copy.deepcopy(model), loss_type="bnpo")
    inputs = _batch(theirs)
    negative = (inputs["advantages"] < 0)[:, None] & inputs["completion_mask"].bool()
    inputs["old_per_token_logps"] = inputs["old_per_token_logps"] - 1.5 * negative  # ratios e^(1.5 +- 0.5)
    got = _loss_and_grads(ours, inputs)

    s, ref = _f64_logps(model, inputs)
    ratio, adv, mask = torch.exp(s - inputs["old_per_token_logps"].double()), inputs["advantages"].double()[:, None], \
        inputs["completion_mask"].double()
    surrogate = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    dual = (adv < 0) & (ratio > 3.0)
    per_token = torch.where(adv < 0, torch.minimum(surrogate, -3.0 * adv), surrogate)
    want = (per_token * mask).sum() / mask.sum() / 2
    want.backward()
    assert int((dual & mask.bool()).sum()) >= 3  # the dual bound is active
    _assert_equal_f64(got, want, _grads(ref))
    trl_loss = _loss_and_grads(theirs, inputs)[0]
    assert abs(float(trl_loss) - float(want.detach())) > 1e-2  # TRL's loss, without the bound, is another number


@pytest.mark.parametrize("loss_type", ["bnpo", "dapo"])
def test_registered_test_objective_reaches_trl(tiny, tmp_path, loss_type):
    """tests/_test_objective.py's objective, added by its declaration alone: inside ``registered()`` the trainer
    computes the loss and gradients of ``expected_token_loss`` (its formula written by hand) on float64 full logits
    of student and teacher, normalised as TRL's loss_type."""
    import _test_objective as X

    from kdrl_kernels import KDRLConfig

    beta = 0.5
    model = _load(tiny[0])
    with X.registered():
        ours = _ours(tiny, tmp_path, model=copy.deepcopy(model), teacher=True, loss_type=loss_type,
                     kdrl=KDRLConfig(objective=X.NAME, beta=beta))
        inputs = _batch(ours)
        inputs.update(ours._teacher_inputs(inputs))
        assert set(ours._teacher_inputs(inputs)) == {"teacher_logprobs"}  # k2 needs the sampled tokens' only
        got = _loss_and_grads(ours, inputs)
        logged = {k: v[-1] for k, v in ours._metrics["train"].items()}
    assert logged["kdrl/beta"] == 3 * beta  # the coefficient the declaration applies

    s, ref = _f64_logps(model, inputs)
    with torch.no_grad():
        t, _ = _f64_logps(ours.teacher, inputs)
    mask = inputs["completion_mask"].double()
    adv = inputs["advantages"].double()[:, None].expand_as(s)
    per_token = X.expected_token_loss(s, t, inputs["old_per_token_logps"].double(), adv, beta)
    if loss_type == "bnpo":  # the micro-batch's token mean over 2 accumulation steps
        want = (per_token * mask).sum() / mask.sum() / 2
    else:  # dapo: the generation batch's token count (num_items_in_batch), GA / steps_per_generation = 1
        want = (per_token * mask).sum() / inputs["num_items_in_batch"]
    want.backward()
    _assert_equal_f64(got, want, _grads(ref))


def test_trl_clip_metrics_can_be_skipped(tiny, tmp_path, monkeypatch):
    """trl_clip_metrics=False: no clip_ratio/* and no extra lm_head pass; the loss and kdrl/* are unchanged."""
    import kdrl.integrations.trl_grpo as module

    model = _load(tiny[0])
    runs = {}
    for on in (True, False):
        trainer = _ours(tiny, tmp_path, model=copy.deepcopy(model), trl_clip_metrics=on)
        inputs = _batch(trainer)
        calls = []
        original = module.fused_linear_logprobs

        def counted(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)
        monkeypatch.setattr(module, "fused_linear_logprobs", counted)
        loss, _ = _loss_and_grads(trainer, inputs)
        monkeypatch.setattr(module, "fused_linear_logprobs", original)
        runs[on] = (loss, len(calls), {k: v[-1] for k, v in trainer._metrics["train"].items()})
    assert runs[True][1] == 1 and runs[False][1] == 0  # the extra pass (old log-probs are in the batch)
    assert "clip_ratio/region_mean" in runs[True][2] and not any(k.startswith("clip_ratio") for k in runs[False][2])
    assert torch.equal(runs[True][0], runs[False][0])
    assert {k: v for k, v in runs[True][2].items() if k.startswith("kdrl/")} == \
        {k: v for k, v in runs[False][2].items() if k.startswith("kdrl/")}


def test_trl_hooks_are_the_ones_we_were_written_for():
    """Fails, naming the hook, when the installed TRL changes a method KDRLGRPOTrainer or KDRLDistillationTrainer
    overrides or calls (then re-read TRL's new hook before widening setup.py's range)."""
    import trl
    from trl import DistillationTrainer, GRPOTrainer

    from kdrl.integrations import trl_distill, trl_grpo
    from kdrl.integrations.trl_hooks import TRL_CHECKED, hook_drift
    drift = hook_drift(GRPOTrainer, trl_grpo.HOOKS) + hook_drift(DistillationTrainer, trl_distill.HOOKS)
    assert not drift, (f"TRL {trl.__version__} changed hooks the subclasses were written for (TRL {TRL_CHECKED}): "
                       + "; ".join(drift))


def test_setup_pins_the_checked_trl_range():
    import re
    from pathlib import Path

    import trl
    from packaging.specifiers import SpecifierSet

    from kdrl.integrations.trl_hooks import TRL_CHECKED, TRL_RANGE
    setup = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    assert re.findall(r'"trl[<>=!~,.\d]*"', setup) == [f'"trl{TRL_RANGE}"']
    assert TRL_CHECKED in SpecifierSet(TRL_RANGE)
    assert trl.__version__ in SpecifierSet(TRL_RANGE), f"installed TRL {trl.__version__} is outside {TRL_RANGE}"


def test_a_changed_hook_is_refused_at_construction(tiny, tmp_path, monkeypatch):
    from trl import GRPOTrainer

    @functools.wraps(GRPOTrainer._compute_loss)
    def changed(self, model, inputs, extra=None):
        raise AssertionError("never called")
    del changed.__wrapped__  # the new signature is what TRL "now" has
    monkeypatch.setattr(GRPOTrainer, "_compute_loss", changed)
    with pytest.raises(RuntimeError, match=r"GRPOTrainer\._compute_loss\(self, model, inputs, extra=None\)"):
        _ours(tiny, tmp_path)
