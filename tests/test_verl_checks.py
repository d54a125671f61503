"""What a verl 0.9.1 launch with our losses honours and refuses (kdrl/integrations/verl_checks.py), checked on verl's
own launch config (ppo_trainer.yaml composed by Hydra, as ``main_ppo`` does) and through verl's ``validate_config``,
which the driver runs before Ray starts.

Needs verl's environment (``bash scripts/setup_verl.sh``); skipped elsewhere.
"""
import json
import os

import pytest

from _verl_env import require_verl  # noqa: E402

require_verl("test_verl_checks.py")

import verl  # noqa: E402

import torch  # noqa: E402
from tensordict import TensorDict  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402

import kdrl.integrations.verl_plugin as vi  # noqa: E402
from kdrl.integrations import verl_checks as C  # noqa: E402
from kdrl_kernels import KDRLConfig  # noqa: E402

CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
# the README's launch (b), less what only a cluster needs (data files, model paths, GPU counts)
EXAMPLE_B = ["algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.n=8",
             "actor_rollout_ref.actor.ppo_mini_batch_size=8", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
             "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2", "data.train_batch_size=8",
             "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=2",
             "trainer.n_gpus_per_node=1", "trainer.nnodes=1", "distillation.enabled=True",
             "distillation.n_gpus_per_node=1", "distillation.nnodes=1",
             "distillation.teacher_models.teacher_model.model_path=teacher",
             "distillation.teacher_models.teacher_model.inference.tensor_model_parallel_size=1",
             "distillation.distillation_loss.loss_mode=kdrl", "distillation.distillation_loss.use_task_rewards=True",
             "distillation.distillation_loss.use_policy_gradient=False",
             "distillation.distillation_loss.loss_max_clamp=null"]
EXAMPLE_B_CONFIG = {"beta": 5e-3, "beta_schedule": "linear", "beta_decay": 5e-5, "beta_min": 1e-3,
                    "kd_mask": "incorrect"}
TRRD = [o.replace("loss_mode=kdrl", "loss_mode=kdrl_trrd").replace("use_task_rewards=True", "use_task_rewards=False")
        for o in EXAMPLE_B]


def compose(overrides):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return hydra_compose(config_name="ppo_trainer", overrides=list(overrides))


def driver_check(overrides, kdrl_fields, monkeypatch):
    """verl's validate_config, as main_ppo calls it, with $KDRL_VERL_CONFIG holding ``kdrl_fields`` (None: unset)."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    monkeypatch.setattr(vi, "_config", None)
    if kdrl_fields is None:
        monkeypatch.delenv(vi.ENV_CONFIG, raising=False)
    else:
        monkeypatch.setenv(vi.ENV_CONFIG, json.dumps(kdrl_fields))
    config = compose(overrides)
    validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))


def test_readme_example_b_passes_the_driver_check(monkeypatch):
    driver_check(EXAMPLE_B, EXAMPLE_B_CONFIG, monkeypatch)
    driver_check(TRRD, {"objective": "trrd", "trrd_alpha": 0.5}, monkeypatch)


@pytest.mark.parametrize("fields,extra,match", [
    # TRRD's clip settings: verl's clip_ratio_* are used; a KDRL config that says otherwise is refused
    ({"objective": "trrd", "eps_low": 0.1}, [], "eps_low=0.1 disagrees with verl's setting \\(0.2\\)"),
    ({"objective": "trrd", "eps_high": 0.28}, [], "eps_high=0.28 disagrees"),
    ({"objective": "trrd", "dual_clip": None}, [], "dual_clip=None disagrees with verl's setting \\(3.0\\)"),
    ({"objective": "trrd", "temperature": 0.7}, [], "temperature=0.7 disagrees"),
    ({"objective": "trrd"}, ["actor_rollout_ref.rollout.temperature=0.7"], "teacher server scores at temperature 1"),
    ({"objective": "trrd", "aggregation": "seq_mean"}, [], "aggregation='seq_mean' disagrees"),
    # settings of the policy loss TRRD replaces
    ({"objective": "trrd"}, ["actor_rollout_ref.actor.entropy_coeff=0.01"], "entropy_coeff=0.01"),
    ({"objective": "trrd"}, ["actor_rollout_ref.actor.use_kl_loss=True"], "use_kl_loss=True"),
    ({"objective": "trrd"}, ["actor_rollout_ref.actor.policy_loss.loss_mode=gspo"], "loss_mode='gspo'"),
    # fields that would do nothing under verl
    ({"objective": "trrd", "adv_eps": 1e-3}, [], "adv_eps=0.001 has no effect under verl"),
    ({"objective": "trrd", "scale_rewards": False}, [], "norm_adv_by_std_in_grpo"),
    ({"objective": "trrd", "log_exact_kl": True}, [], "hidden states"),
])
def test_trrd_launch_refusals(monkeypatch, fields, extra, match):
    with pytest.raises(ValueError, match=match):
        driver_check(TRRD + extra, fields, monkeypatch)


def test_trrd_clip_settings_that_agree_are_honoured(monkeypatch):
    driver_check(TRRD + ["actor_rollout_ref.actor.clip_ratio_high=0.28"],
                 {"objective": "trrd", "eps_low": 0.2, "eps_high": 0.28, "dual_clip": 3.0}, monkeypatch)


@pytest.mark.parametrize("fields,extra,match", [
    (EXAMPLE_B_CONFIG, ["actor_rollout_ref.actor.policy_loss.loss_mode=gspo"], "GRPO's clipped surrogate"),
    (EXAMPLE_B_CONFIG, ["trainer.v1.trainer_mode=colocate_async"], "trainer_mode=sync"),
    (EXAMPLE_B_CONFIG, ["trainer.use_v1=False"], "legacy trainer"),
    ({"kd_mask": "group_all_wrong"}, [], "micro-batch"),
    ({"kl_estimator": "exact"}, [], "hidden states"),
    ({"objective": "trrd"}, [], "not GRPO \\+ a KD loss term"),
    ({"eps_high": 0.3}, [], "eps_high=0.3 disagrees"),
])
def test_kdrl_launch_refusals(monkeypatch, fields, extra, match):
    with pytest.raises(ValueError, match=match):
        driver_check(EXAMPLE_B + extra, fields, monkeypatch)


def test_kdrl_joint_honours_verl_extra_terms(monkeypatch):
    """With use_task_rewards=True verl's own policy loss stays, with its entropy bonus and KL loss: not refused."""
    driver_check(EXAMPLE_B + ["actor_rollout_ref.actor.entropy_coeff=0.01", "actor_rollout_ref.actor.use_kl_loss=True"],
                 EXAMPLE_B_CONFIG, monkeypatch)


def test_config_without_our_loss_is_refused(monkeypatch):
    plain = [o for o in EXAMPLE_B if not o.startswith("distillation.")]
    with pytest.raises(ValueError, match="no kdrl loss is in use"):
        driver_check(plain, EXAMPLE_B_CONFIG, monkeypatch)
    driver_check(plain, None, monkeypatch)  # no KDRL config, no kdrl loss: verl's own launch, untouched


def test_resolved_config_takes_verl_values():
    actor = {"clip_ratio": 0.2, "clip_ratio_low": 0.1, "clip_ratio_high": 0.3, "clip_ratio_c": 2.5,
             "loss_agg_mode": "seq-mean-token-mean", "policy_loss": {"loss_mode": "vanilla"}}
    loss_cfg = {"use_task_rewards": False, "use_policy_gradient": False, "loss_max_clamp": None}
    cfg = C.resolve(KDRLConfig(objective="trrd"), set(), loss_mode=C.OBJECTIVE_LOSS, loss_cfg=loss_cfg,
                    actor=actor, temperature=1.0)
    assert (cfg.eps_low, cfg.eps_high, cfg.dual_clip, cfg.temperature, cfg.aggregation) == \
        (0.1, 0.3, 2.5, 1.0, "seq_mean")


def _with_steps(steps):
    td = TensorDict({"x": torch.zeros(len(steps))}, batch_size=[len(steps)])
    td["global_steps"] = tu.list_of_dict_to_tensordict([{"global_steps": s} for s in steps])["global_steps"]
    return td


def test_batch_step_and_correctness():
    assert vi.batch_step(_with_steps([3, 3, 3])) == 2  # verl counts from 1
    with pytest.raises(ValueError, match="several trainer steps"):
        vi.batch_step(_with_steps([3, 4]))
    td = TensorDict({"x": torch.zeros(2)}, batch_size=[2])
    assert vi.batch_step(td) is None and vi.batch_correct(td) is None
    scores = torch.nested.as_nested_tensor([torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0, 0.0])],
                                           layout=torch.jagged)
    td = tu.get_tensordict({"rm_scores": scores})
    assert vi.batch_correct(td).tolist() == [True, False]
