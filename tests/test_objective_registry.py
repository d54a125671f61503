"""kdrl_kernels.registry owns what an objective means: the built-in declarations match the formulas of
docs/objectives.md written out by hand, metrics reduce as declared, and a test-only objective added by its
declaration alone reaches KDRLLoss, the trainer and the testbed (TRL and verl: in their own test files)."""
import pytest
import torch

import _test_objective as T
from _train_tiny import make_tiny_pair, one_thread  # noqa: F401
from kdrl_kernels import KDRLConfig, KDRLLoss, registry as R

torch.manual_seed(0)
pytestmark = pytest.mark.usefixtures("one_thread")


def _tokens(n=37):
    s = -torch.rand(n, dtype=torch.float64) * 3
    t = -torch.rand(n, dtype=torch.float64) * 3
    old = s - 0.3 * torch.randn(n, dtype=torch.float64)
    adv = torch.randn(n, dtype=torch.float64)
    return s, t, old, adv


def _by_hand(objective, s, t, old, adv, beta, cfg):
    """Per-token loss of the built-in objectives, from docs/objectives.md (no registry involved)."""
    def clip(log_ratio, a):
        r = log_ratio.exp()
        return -torch.min(r * a, r.clamp(1 - cfg.eps_low, 1 + cfg.eps_high) * a)
    k2 = 0.5 * (t - s) ** 2
    if objective == "grpo":
        return clip(s - old, adv)
    if objective == "kd":
        return k2
    if objective == "kdrl":
        return clip(s - old, adv) + beta * k2
    if objective == "kdrl_shaping":
        return clip(s - old, adv + beta * (t - s))
    if objective == "trrd":
        mix = cfg.trrd_alpha * (s - old) + (1 - cfg.trrd_alpha) * (s - t).clamp(-cfg.trrd_clamp, cfg.trrd_clamp)
        return clip(mix, adv)
    raise AssertionError(objective)


@pytest.mark.parametrize("objective", ["grpo", "kd", "kdrl", "kdrl_shaping", "trrd"])
def test_builtin_declarations_match_the_formulas(objective):
    cfg = KDRLConfig(objective=objective)
    s, t, old, adv = _tokens()
    pg, kd = R.token_losses(s, t, old, adv, None, cfg, 0.3)
    total = (0 if pg is None else pg) + (0 if kd is None else R.applied_kd_coef(cfg, 0.3) * kd)
    torch.testing.assert_close(total, _by_hand(objective, s, t, old, adv, 0.3, cfg))
    assert R.applied_kd_coef(cfg, 0.3) == {"grpo": 0.0, "trrd": 0.0, "kd": 1.0}.get(objective, 0.3)
    assert R.teacher_input(cfg) == ("none" if objective == "grpo" else "logprobs")
    assert R.teacher_input(KDRLConfig(objective=objective, log_exact_kl=True)) == "hidden"


def test_metrics_reduce_as_declared():
    a = {"loss": 1.0, "num_tokens": 3.0, "k2": 0.1, "ratio_min": 0.9, "ratio_max": 1.1, "beta": 0.5}
    b = {"loss": 3.0, "num_tokens": 1.0, "k2": 0.5, "ratio_min": 0.8, "ratio_max": 1.0, "beta": 0.5}
    empty = {"loss": 0.0, "num_tokens": 0.0, "beta": 0.5}
    out = R.reduce_metrics([a, b, empty], [0.75, 0.25, 0.0])
    assert out["loss"] == pytest.approx(1.5) and out["beta"] == pytest.approx(0.5)
    assert out["num_tokens"] == 4.0 and out["ratio_min"] == 0.8 and out["ratio_max"] == 1.1
    assert out["k2"] == pytest.approx((3 * 0.1 + 0.5) / 4)  # a mean over all tokens
    assert R.reduce_metrics([a, b])["loss"] == pytest.approx(2.0)  # processes: equal weights (DDP's mean)
    with pytest.raises(ValueError, match="weights"):
        R.reduce_metrics([a, b], [1.0])


def test_unknown_objective_is_refused_naming_the_registered_ones():
    with pytest.raises(ValueError, match="objective must be one of"):
        KDRLConfig(objective=T.NAME)


def test_a_registered_objective_reaches_kdrl_loss():
    with T.registered():
        cfg = KDRLConfig(objective=T.NAME, beta=0.2)
        b, n, d, v = 3, 5, 8, 11
        h = torch.randn(b, n, d, dtype=torch.float64, requires_grad=True)
        w = torch.randn(v, d, dtype=torch.float64)
        th, tw = torch.randn(b, n, d, dtype=torch.float64), torch.randn(v, d, dtype=torch.float64)
        y = torch.randint(0, v, (b, n))
        mask = torch.ones(b, n, dtype=torch.bool)
        mask[0, 3:] = False
        adv = torch.randn(b, dtype=torch.float64)
        loss, metrics = KDRLLoss(cfg)(h.float(), w.float(), y, mask, advantages=adv.float(),
                                      teacher_hidden=th.float(), teacher_weight=tw.float())
        s = torch.log_softmax(h @ w.T, -1).gather(-1, y[..., None])[..., 0][mask]
        t = torch.log_softmax(th @ tw.T, -1).gather(-1, y[..., None])[..., 0][mask]
        a = adv[:, None].expand(b, n)[mask]
        want = T.expected_token_loss(s, t, s.detach(), a, 0.2).mean()
        assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5, abs=1e-6)
        assert metrics["beta"] == pytest.approx(0.6)  # the coefficient applied: 3 * beta
        assert R.describe(cfg) == f"{T.NAME} (test-only)"


def test_a_registered_objective_reaches_the_trainer(tmp_path):
    from kdrl.trainer.config import load_config
    from kdrl.trainer.loop import Trainer
    student, teacher = make_tiny_pair(tmp_path / "pair")
    with T.registered():
        cfg = load_config(None, [f"model.student={student}", f"model.teacher={teacher}", "data.limit=8",
                                 "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=6",
                                 "optim.lr=1e-3", "run.steps=1", f"run.output_dir={tmp_path / 'run'}",
                                 "run.progress=false", "run.plot=false", "run.export_final=false",
                                 f"loss.objective={T.NAME}", "loss.beta=0.1"])
        assert cfg.loss.objective == T.NAME
        (m,) = Trainer(cfg).run()
    assert m["beta"] == pytest.approx(0.3) and m["kd_term"] == pytest.approx(0.3 * m["kd_loss"])
    assert m["k2"] > 0 and m["grad_norm"] > 0


def test_a_registered_objective_reaches_the_testbed(tmp_path):
    from kdrl.testbed import experiment as tb
    cfg = tb.TestbedConfig(teacher_sft_steps=20, student_sft_steps=10, train_problems=300, heldout_problems=20,
                           steps=2, prompts_per_step=4, group_size=4, eval_every=2, seeds=(0,))
    train, heldout = tb.datasets(cfg)
    teacher, student, _ = tb.pretrain_pair(cfg, tmp_path, say=lambda *_: None)
    with T.registered():
        run = tb.rl_run(T.NAME, 0, student.state_dict(), teacher, cfg, train, heldout, say=lambda *_: None)
    assert [r["beta"] for r in run["train"]] == pytest.approx([3 * 2e-3 * tb.BETA_SCALE] * 2)
    assert all(r["k2"] > 0 for r in run["train"])
