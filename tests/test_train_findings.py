"""Regression tests of the trainer findings (issue 10): the temperature contract, derived loss fields, one knob per
setting, whole-batch KD masks, the beta schedule per rollout step, and resume checks. Tiny offline models only."""
import json

import pytest
import torch

from _train_tiny import make_tiny_pair, one_thread  # noqa: F401
from kdrl.trainer.config import load_config, loss_config
from kdrl.train import main
from kdrl.trainer.loop import Trainer
from kdrl.trainer.step import backward_microbatches

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_tiny_pair(tmp_path_factory.mktemp("tiny"))


def settings(pair, out, steps=1, teacher=None):
    return [f"model.student={pair[0]}", f"model.teacher={teacher or pair[1]}", "model.dtype=float32",
            "data.limit=16", "rollout.backend=hf", "rollout.prompts_per_step=2", "rollout.group_size=4",
            "rollout.max_new_tokens=6", "optim.lr=1e-3", "optim.micro_batch_size=4", f"run.steps={steps}",
            f"run.output_dir={out}", "run.progress=false", "run.threads=1", "run.export_final=false",
            "run.plot=false", "loss.objective=kdrl", "loss.beta=0.5"]


# ---- 1. one temperature for student, teacher and old log-probs -----------------------------------------------
def test_loss_temperature_is_the_rollout_temperature():
    assert loss_config(load_config(None, ["rollout.temperature=0.7", "model.teacher=t"])).temperature == 0.7
    assert loss_config(load_config(None, ["rollout.temperature=0.7", "loss.objective=grpo",
                                                    "loss.temperature=0.7"])).temperature == 0.7
    with pytest.raises(ValueError, match="rollout.temperature"):
        load_config(None, ["rollout.temperature=1.0", "loss.objective=grpo", "loss.temperature=0.7"])


@pytest.mark.parametrize("exact, updates", [(False, 1), (True, 1), (False, 2), (True, 2)])
def test_teacher_equal_to_student_gives_zero_kl_and_ratio_one_at_temperature(pair, tmp_path, exact, updates):
    # lr 0: the weights never move, so every mini-batch is scored "before any update"; loss.temperature is set
    # too (as the finding's reproduction did) so that the old code, which ignored the rollout temperature, fails.
    cfg = load_config(None, settings(pair, tmp_path, teacher=pair[0]) + [
        "rollout.temperature=0.7", "loss.temperature=0.7", "optim.lr=0", "loss.kl_estimator=k2",
        f"loss.log_exact_kl={str(exact).lower()}", f"optim.updates_per_rollout={updates}"])
    (m,) = Trainer(cfg).run()
    assert m["num_tokens"] > 0
    for key in ("k1", "k2", "k3") + (("exact_kl",) if exact else ()):
        assert abs(m[key]) < 1e-5, (key, m[key])
    assert abs(m["ratio_min"] - 1) < 1e-5 and abs(m["ratio_max"] - 1) < 1e-5


# ---- 2. GRPO with a teacher in the config --------------------------------------------------------------------
def test_grpo_with_a_teacher_in_the_config_runs_without_loading_it(pair, tmp_path):
    cfg = load_config(None, settings(pair, tmp_path) + ["loss.objective=grpo", "loss.log_exact_kl=true"])
    trainer = Trainer(cfg)
    assert trainer.teacher is None
    (m,) = trainer.run()
    assert m["beta"] == 0.0 and "exact_kl" not in m  # 5: no KD term, no KD coefficient logged


# ---- 3. cosine beta schedule ---------------------------------------------------------------------------------
def test_cosine_schedule_takes_total_steps_from_run_steps(pair, tmp_path):
    cfg = load_config(None, settings(pair, tmp_path, steps=2) + ["loss.beta_schedule=cosine", "loss.beta_min=0.1"])
    assert loss_config(cfg).total_steps == 2
    history = Trainer(cfg).run()
    assert [round(m["beta"], 6) for m in history] == [0.5, 0.3]  # step 0: beta; step 1 of 2: the midpoint


def test_an_explicit_bad_total_steps_is_refused_not_replaced_by_run_steps():
    with pytest.raises(ValueError, match="total_steps"):
        loss_config(load_config(None, ["loss.objective=grpo", "loss.beta_schedule=cosine", "loss.total_steps=0"]))


# ---- 4. one knob for advantage scaling -----------------------------------------------------------------------
def test_loss_numbers_written_without_a_dot_are_numbers():
    lc = loss_config(load_config(None, ["loss.objective=grpo", "loss.beta=2e-3", "loss.total_steps=1e2"]))
    assert lc.beta == 0.002 and lc.total_steps == 100 and isinstance(lc.total_steps, int)


def test_loss_scale_rewards_is_refused_naming_rollout_scale_advantages():
    with pytest.raises(ValueError, match="rollout.scale_advantages"):
        load_config(None, ["loss.objective=grpo", "loss.scale_rewards=false"])


# ---- 5. beta schedule per rollout step; group_all_wrong over whole groups ------------------------------------
def test_beta_schedule_advances_once_per_rollout_step(pair, tmp_path):
    cfg = load_config(None, settings(pair, tmp_path, steps=2) + [
        "optim.updates_per_rollout=2", "loss.beta_schedule=linear", "loss.beta_decay=0.1", "loss.beta_min=0"])
    history = Trainer(cfg).run()
    # Both mini-batches of a step use the same beta (the mean would differ otherwise), one decay per step.
    assert [round(m["beta"], 6) for m in history] == [0.5, 0.4]


def test_group_all_wrong_is_decided_on_whole_groups_across_micro_batches(pair):
    from kdrl.models import load_model_and_tokenizer
    from kdrl.trainer.rollout import build_batch
    from kdrl_kernels import KDRLConfig, KDRLLoss
    model, _ = load_model_and_tokenizer(pair[0], dtype=torch.float32)
    teacher, _ = load_model_and_tokenizer(pair[1], dtype=torch.float32)
    torch.manual_seed(0)
    responses = [[torch.randint(3, 200, (n,)).tolist() for n in (3, 4, 2, 5)] for _ in range(2)]
    correct = [[False, False, False, True], [False, False, False, False]]  # group 0 solved once, group 1 never
    batch = build_batch([[5, 6, 7], [8, 9]], responses, correct, [[False] * 4] * 2, pad_id=0)
    from kdrl.trainer.step import hidden_states
    with torch.no_grad():
        th = hidden_states(teacher, batch)
    loss_fn = KDRLLoss(KDRLConfig(objective="kd", kd_mask="group_all_wrong", kl_estimator="k2"))
    grads = []
    for mb in (8, 3):  # 3: micro-batches [0:3] hold only wrong answers of group 0
        model.zero_grad()
        backward_microbatches(model, loss_fn, batch, micro_batch_size=mb, teacher_hidden=th,
                              teacher_weight=teacher.get_output_embeddings().weight)
        grads.append(model.get_output_embeddings().weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0])


# ---- 6. resume: say so, compare the config -------------------------------------------------------------------
def test_resume_refuses_a_changed_config_unless_allowed(pair, tmp_path, capsys):
    base = settings(pair, tmp_path, steps=1)
    Trainer(load_config(None, base)).run()
    changed = [s.replace("run.steps=1", "run.steps=2") for s in base] + ["loss.beta=0.1", "optim.lr=1e-2"]
    with pytest.raises(ValueError, match=r"loss.beta.*optim.lr|optim.lr.*loss.beta"):
        Trainer(load_config(None, changed))
    capsys.readouterr()
    main(["--allow-config-change"] + ["--set=" + s for s in changed])
    err = capsys.readouterr().err
    assert "config changed on resume" in err
    (record,) = [json.loads(x) for x in (tmp_path / "config_changes.jsonl").read_text().splitlines()]
    assert record["step"] == 1 and record["changes"]["loss.beta"] == {"old": 0.5, "new": 0.1}
    assert set(record["changes"]) == {"loss.beta", "optim.lr"}  # run.steps may change freely


def test_extending_a_cosine_run_counts_as_a_config_change():
    from kdrl.trainer.resume import config_changes
    saved = load_config(None, ["loss.objective=grpo", "run.steps=10"]).to_dict()
    longer = load_config(None, ["loss.objective=grpo", "run.steps=20"]).to_dict()
    assert config_changes(saved, longer) == {}  # a longer run may resume
    cos = ["loss.objective=grpo", "loss.beta_schedule=cosine"]
    saved = load_config(None, cos + ["run.steps=10"]).to_dict()
    assert config_changes(saved, load_config(None, cos + ["run.steps=20"]).to_dict()) == {"loss.total_steps": (10, 20)}
    explicit = load_config(None, cos + ["run.steps=10", "loss.beta=2e-3", "loss.temperature=1.0"]).to_dict()
    assert config_changes(saved, explicit) == {}  # explicit defaults / derived values are no change


def test_kd_logs_its_coefficient(pair, tmp_path):
    (m,) = Trainer(load_config(None, settings(pair, tmp_path) + ["loss.objective=kd"])).run()
    assert m["beta"] == 1.0 and m["kd_loss"] > 0


def test_resume_prints_what_it_resumes_from(pair, tmp_path, capsys):
    base = settings(pair, tmp_path, steps=1)
    Trainer(load_config(None, base)).run()
    capsys.readouterr()
    Trainer(load_config(None, base))
    err = capsys.readouterr().err
    assert "resuming from" in err and "step_000001" in err and "(step 1)" in err


# ---- every configuration error before any model is loaded ----------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("loss.objective=kdrl", "needs model.teacher"),
    ("loss.scale_rewards=false", "rollout.scale_advantages"),
    ("loss.beta_schedule=wavy", "beta_schedule"),
    ("loss.betaa=0.1", "invalid loss section"),
    ("loss.temperature=0.5", "rollout.temperature"),
])
def test_bad_config_fails_before_any_model_is_loaded(monkeypatch, tmp_path, capsys, override, message):
    import kdrl.models

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.setattr(kdrl.models, "load_model_and_tokenizer", no_loading)
    monkeypatch.setattr(kdrl.models, "resolve_model", no_loading)
    with pytest.raises(SystemExit) as exit_:  # one line naming the field, exit 2, no traceback (issue 22)
        main(["--set", "loss.objective=grpo", "--set", override, "--set", f"run.output_dir={tmp_path}"])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("kdrl.train: error: ") and message in line
