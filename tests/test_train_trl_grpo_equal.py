"""KDRLGRPOTrainer against TRL's own GRPOTrainer: same loss and gradients per loss_type (beta = 0, no teacher), TRL's
importance-sampling ratio and normaliser kept, no full-logits forward, metrics reduced across processes, and the exact
KL to the teacher equal to a full-logits reference. fp32, tiny random Llama, CPU."""
import copy
import functools

import pytest
import torch

pytest.importorskip("trl")
from _train_tiny import one_thread  # noqa: E402,F401
from _trl_grpo import (B, P, T, TOL, _assert_same, _batch, _load, _loss_and_grads, _ours, _theirs,  # noqa: E402
                       make_tiny)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory)


def test_logprob_hook_equals_trls(tiny, tmp_path):
    """TRL's per-token log-prob hook (its old-policy log-probs) from our hidden-state op: same log-probs and entropy."""
    model = _load(tiny[0])
    ours, theirs = _ours(tiny, tmp_path, model=copy.deepcopy(model)), _theirs(tiny, tmp_path, model)
    inputs = _batch(theirs)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        a = ours._get_per_token_logps_and_entropies(ours.model, ids, att, T, batch_size=3, compute_entropy=True)
        b = theirs._get_per_token_logps_and_entropies(theirs.model, ids, att, T, batch_size=3, compute_entropy=True)
    torch.testing.assert_close(a[0], b[0], **TOL)
    torch.testing.assert_close(a[1], b[1], **TOL)
    assert a[2] is None and b[2] is None


TRL_METRICS = ("entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
               "clip_ratio/low_min", "clip_ratio/high_max")


def _assert_same_trl_metrics(ours, theirs):
    """TRL's own entropy and clip metrics of the last loss call, logged alike by both trainers."""
    a, b = ({k: t._metrics["train"][k][-1] for k in TRL_METRICS} for t in (ours, theirs))
    assert a == pytest.approx(b, rel=2e-5, abs=1e-6)


@pytest.mark.parametrize("is_mode", [None, "token"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"])
def test_loss_and_gradients_equal_trls(tiny, tmp_path, loss_type, is_mode):
    """Also TRL's own entropy and clip_ratio/* metrics, which the subclass logs beside kdrl/*."""
    model = _load(tiny[0])
    ours = _ours(tiny, tmp_path, model=copy.deepcopy(model), loss_type=loss_type)
    theirs = _theirs(tiny, tmp_path, model, loss_type=loss_type)
    inputs = _batch(theirs, is_mode)
    _assert_same(_loss_and_grads(ours, inputs), _loss_and_grads(theirs, inputs))
    _assert_same_trl_metrics(ours, theirs)
    assert theirs._metrics["train"]["clip_ratio/region_mean"][-1] > 0  # the batch clips, so the metric can fail


def test_trl_metrics_on_policy_equal_trls(tiny, tmp_path):
    """Without old log-probs (TRL's on-policy case, num_iterations=1) TRL's ratio is exactly 1: no clipping, and no
    extra lm_head pass on our side."""
    model = _load(tiny[0])
    ours, theirs = _ours(tiny, tmp_path, model=copy.deepcopy(model)), _theirs(tiny, tmp_path, model)
    inputs = _batch(theirs)
    del inputs["old_per_token_logps"]
    _assert_same(_loss_and_grads(ours, inputs), _loss_and_grads(theirs, inputs))
    _assert_same_trl_metrics(ours, theirs)


def test_sequence_level_is_ratio_and_eval_normaliser_equal_trls(tiny, tmp_path):
    """TRL's sequence-level vLLM ratio ((B, 1), sequence_mask mode) and DAPO's normaliser in eval (no accumulation)."""
    model = _load(tiny[0])
    ours, theirs = _ours(tiny, tmp_path, model=copy.deepcopy(model)), _theirs(tiny, tmp_path, model)
    inputs = _batch(theirs, "sequence")
    _assert_same(_loss_and_grads(ours, inputs), _loss_and_grads(theirs, inputs))
    for trainer in (ours, theirs):
        trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours.compute_loss(ours.model, inputs), theirs.compute_loss(theirs.model, inputs),
                                   **TOL)


@pytest.mark.parametrize("setting, match", [
    (dict(loss_type="cispo"), "loss_type='cispo'"),
    (dict(beta=0.04), "beta != 0"),
    (dict(importance_sampling_level="sequence"), "sequence"),
    (dict(epsilon_high=0.28), "eps_high=0.2 but TRL's epsilon_high=0.28"),
])
def test_unimplemented_trl_settings_are_refused(tiny, tmp_path, setting, match):
    with pytest.raises(ValueError, match=match):
        _ours(tiny, tmp_path, **setting)


def test_multimodal_batches_are_refused(tiny, tmp_path):
    ours = _ours(tiny, tmp_path)
    inputs = dict(_batch(ours), pixel_values=torch.zeros(B, 3, 4, 4))
    with pytest.raises(NotImplementedError, match="pixel_values"):
        ours.compute_loss(ours.model, inputs)


def test_no_full_logits_forward_in_a_training_run(tiny, tmp_path, monkeypatch):
    """Two optimizer steps with old log-probs recomputed (num_iterations=2) and the exact KL to the teacher: every
    lm_head call of student and teacher sees one position per sequence, TRL's own log-prob path never runs, ours
    does, and the KL is logged."""
    from trl import GRPOTrainer

    from kdrl.integrations.trl_grpo import KDRLGRPOTrainer
    from kdrl_kernels import KDRLConfig

    @functools.wraps(GRPOTrainer._get_per_token_logps_and_entropies)  # keeps the signature the subclass checks
    def refuse(*args, **kwargs):
        raise AssertionError("TRL's log-prob path ran")
    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", refuse)
    hook_calls = []
    original = KDRLGRPOTrainer._get_per_token_logps_and_entropies

    def counted(self, *args, **kwargs):
        hook_calls.append(1)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(KDRLGRPOTrainer, "_get_per_token_logps_and_entropies", counted)

    trainer = _ours(tiny, tmp_path, teacher=True, num_iterations=2, gradient_accumulation_steps=1, max_steps=2,
                    kdrl=KDRLConfig(objective="kdrl", beta=0.5, kl_estimator="exact"))
    positions = []
    for model in (trainer.model, trainer.teacher):
        model.get_output_embeddings().register_forward_pre_hook(lambda mod, args: positions.append(args[0].shape[-2]))
    trainer.train()
    assert hook_calls and positions and max(positions) == 1
    logged = [h for h in trainer.state.log_history if "kdrl/exact_kl" in h]
    assert len(logged) == 2 and all(h["kdrl/exact_kl"] > 0 for h in logged)


@pytest.mark.parametrize("objective, loss_type", [("kdrl", "dapo"), ("kd", "bnpo")])
def test_exact_kl_matches_full_logits_reference(tiny, tmp_path, objective, loss_type):
    """The exact reverse KL to the teacher from both models' hidden states (fused_linear_kl inside KDRLLoss) against
    full-logits softmaxes: loss and gradients; for kdrl, TRL's own GRPO loss plus beta times that KL."""
    from kdrl_kernels import KDRLConfig

    beta = 0.5
    model = _load(tiny[0])
    ours = _ours(tiny, tmp_path, model=copy.deepcopy(model), teacher=True, loss_type=loss_type,
                 kdrl=KDRLConfig(objective=objective, beta=beta, kl_estimator="exact"))
    theirs = _theirs(tiny, tmp_path, model, loss_type=loss_type)
    inputs = _batch(theirs)
    inputs.update(ours._teacher_inputs(inputs))
    assert inputs["teacher_hidden"].shape == (B, T, ours.teacher.config.hidden_size)
    got = _loss_and_grads(ours, inputs)

    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    pos = (att.cumsum(-1) - 1).clamp_min(0)
    theirs.model.train()
    theirs.model.zero_grad(set_to_none=True)
    theirs.current_gradient_accumulation_steps = 2
    with torch.no_grad():
        t_logits = ours.teacher(input_ids=ids, attention_mask=att, position_ids=pos).logits[:, P - 1:-1]
    s_logits = theirs.model(input_ids=ids, attention_mask=att, position_ids=pos).logits[:, P - 1:-1]
    logp_s, logp_t = s_logits.log_softmax(-1), t_logits.log_softmax(-1)
    kl = (logp_s.exp() * (logp_s - logp_t)).sum(-1)  # (B, T) reverse KL(student || teacher), full vocabulary
    mask = inputs["completion_mask"].float()
    if loss_type == "dapo":  # TRL's normaliser: the generation batch's tokens (GA / steps_per_generation = 1)
        kd = (kl * mask).sum() / inputs["num_items_in_batch"]
        want = theirs.compute_loss(theirs.model, copy.copy(inputs)) + beta * kd
    else:  # bnpo: this micro-batch's token mean, over the accumulation steps; kd's coefficient is 1
        want = (kl * mask).sum() / mask.sum() / 2
    want.backward()
    _assert_same(got, (want.detach(), {n: p.grad for n, p in theirs.model.named_parameters() if p.grad is not None}))


def test_metrics_are_reduced_across_processes(tiny, tmp_path, monkeypatch):
    """One accelerator.gather per loss call carries every kdrl metric and TRL's clip counts; with a fake second
    process the per-token means are token-weighted, num_tokens summed, ratio_min/max the extremes and the losses
    averaged over processes (registry.reduce_metrics), and TRL's entropy and clip_ratio/* combine as TRL combines
    them (token-weighted means, nanmin / nanmax of per-sequence shares); this process's share is TRL's own."""
    from kdrl.integrations.trl_grpo import _CLIP_COLUMNS
    from kdrl_kernels import KDRLConfig

    model = _load(tiny[0])
    trainer = _ours(tiny, tmp_path, model=copy.deepcopy(model), teacher=True,
                    kdrl=KDRLConfig(objective="kdrl", beta=0.5, log_exact_kl=True))
    inputs = _batch(trainer)
    inputs.update(trainer._teacher_inputs(inputs))
    names = trainer._metric_names()
    other = torch.arange(1.0, len(names) + 1, dtype=torch.float64)  # the fake second process's row
    other[names.index("num_tokens")] = 3.0
    other_clip = dict(zip(_CLIP_COLUMNS, [2.0, 1.0, 3.0, 0.0, 0.5]))
    other = torch.cat([other, torch.tensor(list(other_clip.values()), dtype=torch.float64)])
    seen = []

    def gather(tensor):
        seen.append(tensor)
        return torch.cat([tensor, other[None]])
    monkeypatch.setattr(trainer.accelerator, "gather", gather)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    local = {}
    original = trainer.kdrl_loss.forward

    def keep(*args, **kwargs):
        loss, metrics = original(*args, **kwargs)
        local.update(metrics)
        return loss, metrics
    monkeypatch.setattr(trainer.kdrl_loss, "forward", keep)
    trainer.compute_loss(trainer.model, inputs)
    assert len(seen) == 1 and seen[0].shape == (1, len(names) + len(_CLIP_COLUMNS)) and set(local) == set(names)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    kd = {k[len("kdrl/"):]: v for k, v in logged.items() if k.startswith("kdrl/")}
    n, o = local["num_tokens"], dict(zip(names, other.tolist()))
    assert kd["num_tokens"] == n + 3.0
    assert kd["ratio_min"] == min(local["ratio_min"], o["ratio_min"])
    assert kd["ratio_max"] == max(local["ratio_max"], o["ratio_max"])
    for name in ("loss", "kd_loss"):
        assert kd[name] == pytest.approx((local[name] + o[name]) / 2)
    for name in ("k2", "exact_kl", "entropy", "clip_frac"):
        assert kd[name] == pytest.approx((local[name] * n + o[name] * 3.0) / (n + 3.0))
    assert logged["entropy"] == kd["entropy"]

    # This process's clip shares, from TRL's own loss on the same batch (one process: nothing to combine).
    theirs = _theirs(tiny, tmp_path, model)
    theirs.current_gradient_accumulation_steps = 1
    theirs.model.train()
    theirs.compute_loss(theirs.model, copy.copy(inputs))
    trl = {k: v[-1] for k, v in theirs._metrics["train"].items()}
    assert 0 < trl["clip_ratio/low_mean"] and 0 < trl["clip_ratio/high_mean"]  # both bounds engage in this batch
    for side, col in (("low", "clip_low_sum"), ("high", "clip_high_sum"), ("region", "clip_region_sum")):
        want = (trl[f"clip_ratio/{side}_mean"] * n + other_clip[col]) / (n + 3.0)
        assert logged[f"clip_ratio/{side}_mean"] == pytest.approx(want, rel=1e-6)
    assert logged["clip_ratio/low_min"] == pytest.approx(min(trl["clip_ratio/low_min"], 0.0))
    assert logged["clip_ratio/high_max"] == pytest.approx(max(trl["clip_ratio/high_max"], 0.5))


def test_two_process_gloo_run_logs_the_reduced_metrics(tiny, tmp_path):
    """torchrun, 2 CPU processes (gloo), two KDRL steps (20 s on a quiet 2-core machine, 50 s on a busy one): both
    processes log the same kdrl/* values, the token-weighted mean of their own KDRLLoss metrics, and end with the same
    lm_head."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(repo / "tests" / "_trl_ddp_worker.py"), str(tiny[0]), str(tiny[1]), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    assert all(r["world"] == 2 for r in ranks) and ranks[0]["lm_head"] == ranks[1]["lm_head"]
    logged = [[h for h in r["logged"] if "kdrl/k2" in h] for r in ranks]
    assert len(logged[0]) == len(logged[1]) == 2
    for step in range(2):
        a, b = (r["local"][step] for r in ranks)  # one micro-batch per step and process
        kdrl = [{k: v for k, v in h[step].items() if k.startswith("kdrl/")} for h in logged]
        assert len(kdrl[0]) > 10 and kdrl[0] == kdrl[1]
        trl = [{k: h[step][k] for k in TRL_METRICS} for h in logged]  # TRL's own, combined over processes too
        assert trl[0] == trl[1] and trl[0]["entropy"] == kdrl[0]["kdrl/entropy"]
        assert a["k2"] != b["k2"]  # the processes saw different completions
        assert logged[0][step]["kdrl/num_tokens"] == a["num_tokens"] + b["num_tokens"]
        want = (a["k2"] * a["num_tokens"] + b["k2"] * b["num_tokens"]) / (a["num_tokens"] + b["num_tokens"])
        assert logged[0][step]["kdrl/k2"] == pytest.approx(want, rel=1e-6)
