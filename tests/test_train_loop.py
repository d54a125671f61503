"""The whole loop on tiny offline models: rollouts, grading, KDRL updates, checkpoints, and exact resume."""
import pytest
import torch

from _train_tiny import make_tiny_pair, one_thread  # noqa: F401
from kdrl.trainer.config import load_config
from kdrl.trainer.logging import read_metrics
from kdrl.train import main
from kdrl.trainer.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_tiny_pair(tmp_path_factory.mktemp("tiny"))


def settings(pair, out, steps=3):
    return [f"model.student={pair[0]}", f"model.teacher={pair[1]}", "data.limit=16", "rollout.backend=hf",
            "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=8", "optim.lr=1e-3",
            "optim.micro_batch_size=3", f"run.steps={steps}", f"run.output_dir={out}", "run.progress=false",
            "run.threads=1", "run.plot=false",
            "loss.objective=kdrl", "loss.beta=0.5", "loss.log_exact_kl=true"]


def comparable(metrics):
    """What must repeat exactly in a resumed run: everything but timings, memory and bytes on disk."""
    return {k: v for k, v in metrics.items() if not k.startswith("time_") and k not in ("peak_rss_gb", "checkpoint_mb")}


def test_resume_after_interruption_continues_exactly(pair, tmp_path, monkeypatch):
    straight = Trainer(load_config(None, settings(pair, tmp_path / "a")))
    history = straight.run()
    assert [m["num_tokens"] > 0 for m in history] == [True] * 3
    assert all(m["k2"] > 0 and m["exact_kl"] > 0 and m["beta"] == 0.5 for m in history)

    interrupted = Trainer(load_config(None, settings(pair, tmp_path / "b")))
    calls = {"n": 0}
    real_generate = interrupted.generator.generate

    def crash_on_third(*args, **kwargs):  # dies inside step 3, after steps 1 and 2 were checkpointed
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(interrupted.generator, "generate", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        interrupted.run()
    del interrupted
    # Resume through the command line, as a user would.
    main(["--set=" + s for s in settings(pair, tmp_path / "b")])
    logged = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["step"] for r in logged] == [1, 2, 3]
    for want, got in zip(history, logged):
        assert comparable({"step": got["step"], **want}) == comparable(got)
    resumed = Trainer(load_config(None, settings(pair, tmp_path / "b")))  # loads the step-3 checkpoint
    assert resumed.step == 3
    for name, p in straight.master.params.items():
        assert torch.equal(p, resumed.master.params[name]), name


def test_lora_run_syncs_merged_weights_and_exports_a_loadable_model(pair, tmp_path):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "lora"
    trainer = Trainer(load_config(None, settings(pair, out, steps=1) + [
        "model.lora_rank=4", "optim.lr=1e-2", "model.dtype=float32",
        "run.eval_every=1", "run.eval_limit=3", "run.eval_max_new_tokens=4"]))
    (metrics,) = trainer.run()
    assert metrics["eval_accuracy"] == 0.0 and 0 < metrics["eval_len_mean"] <= 4  # a random model, 4 tokens
    weights = trainer.rollout_weights()
    assert not any("lora_" in k or "base_layer" in k for k in weights)
    gen_state = trainer.generator.model.state_dict()
    start = AutoModelForCausalLM.from_pretrained(pair[0], dtype=torch.float32).state_dict()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(gen_state[name], weights[name]) and not torch.equal(weights[name], start[name])
    frozen = trainer.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(frozen, start[name])  # merging for the generator left the frozen base untouched
    exported = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, trainer.model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_two_updates_per_rollout_clip_against_the_rollout_policy(pair, tmp_path):
    cfg = load_config(None, settings(pair, tmp_path / "ppo", steps=1) + [
        "optim.updates_per_rollout=2", "optim.micro_batch_size=4", "optim.lr=3e-2", "loss.log_exact_kl=false"])
    (metrics,) = Trainer(cfg).run()
    assert metrics["time_old_logprobs"] > 0
    assert "exact_kl" not in metrics and metrics["k2"] > 0  # teacher log-probs only, no hidden states kept
    # On-policy the first mini-batch's ratio is exactly 1; the second is scored after the first update (by the
    # KD term: a random tiny model earns no reward), so its ratio to the rollout policy moved off 1.
    assert metrics["ratio_min"] < 1.0 < metrics["ratio_max"]
