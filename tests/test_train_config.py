"""Config loading and validation, checkpoint round trips, the metrics log on resume, the prompt sampler."""
import json

import pytest
import torch

from kdrl.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from kdrl.trainer.config import describe, load_config
from kdrl.trainer.logging import MetricsLogger, read_metrics
from kdrl.trainer.rollout import PromptSampler, build_batch, rollout_metrics


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {student: a, teacher: b}\nrollout: {group_size: 8}\nloss: {objective: kdrl, beta: 0.002}\n")
    cfg = load_config(path, ["rollout.group_size=6", "loss.beta_schedule=linear", "run.eval_every=null"])
    assert cfg.model.teacher == "b" and cfg.rollout.group_size == 6
    assert (cfg.loss.objective, cfg.loss.beta, cfg.loss.beta_schedule) == ("kdrl", 0.002, "linear")
    assert cfg.run.eval_every is None


@pytest.mark.parametrize("override, message", [
    ("rollout.group_sise=4", "unknown config key"),
    ("rollout.group_size=1", "rollout.group_size must be >= 2"),
    ("rollout.backend=tgi", "rollout.backend must be hf or vllm"),
    ("optim.updates_per_rollout=3", "must divide"),
])
def test_bad_settings_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_every_field_is_documented():
    lines = [line for line in describe().splitlines() if line.startswith("  ")]
    assert len(lines) > 30
    assert all(line.split(": ", 1)[1].strip() for line in lines)


def test_shipped_configs_load():
    from pathlib import Path
    from kdrl.trainer.config import loss_config
    from study.config import load_study
    configs = sorted(Path(__file__).parent.parent.glob("configs/*.yaml"))
    studies = [p for p in configs if p.name.startswith("study_")]
    assert len(configs) - len(studies) >= 7 and studies
    for path in studies:  # a study file: every arm's trainer config is built and validated
        assert load_study(path).arms
    for path in (p for p in configs if p not in studies):
        cfg = load_config(path)
        lc = loss_config(cfg)  # the loss section, with its derived fields, is valid for the loss library
        assert lc.temperature == cfg.rollout.temperature


def _optimizer_with_state():
    params = {"w": torch.nn.Parameter(torch.randn(3, 2)), "b": torch.nn.Parameter(torch.randn(2))}
    opt = torch.optim.AdamW(list(params.values()), lr=0.1)
    (params["w"].sum() + params["b"].square().sum()).backward()
    opt.step()
    return params, opt


def test_checkpoint_round_trip_restores_weights_optimizer_and_rng(tmp_path):
    params, opt = _optimizer_with_state()
    save_checkpoint(tmp_path, 3, params, opt, {"sampler": {"epoch": 1, "index": 5}}, keep=1)
    expected_next = torch.rand(4)
    fresh, fresh_opt = _optimizer_with_state()
    state = load_checkpoint(latest_checkpoint(tmp_path), fresh, fresh_opt)
    assert state["step"] == 3 and state["sampler"] == {"epoch": 1, "index": 5}
    assert torch.equal(torch.rand(4), expected_next)  # torch RNG restored
    for name in params:
        assert torch.equal(fresh[name], params[name])
    for a, b in zip(opt.state_dict()["state"].values(), fresh_opt.state_dict()["state"].values()):
        assert all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)


def test_checkpoints_are_pruned_and_partial_ones_ignored(tmp_path):
    params, opt = _optimizer_with_state()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, params, opt, {}, keep=2)
    (tmp_path / "checkpoints" / ".tmp-step_000004").mkdir()  # an interrupted save
    names = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert names == ["step_000002", "step_000003"]
    assert latest_checkpoint(tmp_path).name == "step_000003"
    with pytest.raises(ValueError, match="does not match the model"):
        load_checkpoint(latest_checkpoint(tmp_path), {"other": torch.zeros(1)}, opt)


def test_metrics_log_is_cut_back_to_the_checkpoint_on_resume(tmp_path):
    log = MetricsLogger(tmp_path, 3, progress=False)
    for step in (1, 2, 3):
        log.log(step, {"loss": float(step)})
    log.close()
    MetricsLogger(tmp_path, 3, start_step=2, progress=False).close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])


def test_prompt_sampler_resumes_its_order():
    a = PromptSampler(list(range(10)), seed=1)
    first = a.next(7)
    b = PromptSampler(list(range(10)), seed=1)
    b.load_state_dict(a.state_dict())
    assert a.next(6) == b.next(6)
    assert len(first) == len(set(first)) == 7
    s = PromptSampler(list(range(10)), seed=1)
    epoch0, epoch1 = s.next(10), s.next(10)
    assert sorted(epoch0) == sorted(epoch1) == list(range(10)) and epoch0 != epoch1  # reshuffled per epoch


def test_build_batch_layout_and_advantages():
    batch = build_batch([[5, 6, 7], [8]], [[[1, 2], [3]], [[4, 4, 4], [9]]], [[True, False], [False, False]],
                        [[False, True], [False, False]], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 1, 2, 0], [5, 6, 7, 3, 0, 0], [0, 0, 8, 4, 4, 4], [0, 0, 8, 9, 0, 0]]
    assert batch.position_ids[2].tolist()[2:4] == [0, 1]
    assert batch.mask.sum(-1).tolist() == [2, 1, 3, 1]
    assert batch.advantages[0] > 0 > batch.advantages[1] and batch.advantages[2:].abs().max() == 0
    m = rollout_metrics(batch)
    assert m["accuracy"] == 0.25 and m["len_correct"] == 2 and m["truncated_frac"] == 0.25
    assert m["zero_adv_group_frac"] == 0.5
    with pytest.raises(ValueError, match="same number of responses"):
        build_batch([[1], [2]], [[[1]], [[1], [2]]], [[True], [True, False]], [[False], [False, False]], 0)
