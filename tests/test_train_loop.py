"""The whole loop on tiny offline models: rollouts, grading, KDRL updates, checkpoints, and exact resume."""
import pytest
import torch

from _train_tiny import make_tiny_pair
from kdrl.config import load_config
from kdrl.logging import read_metrics
from kdrl.train import Trainer, main


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_tiny_pair(tmp_path_factory.mktemp("tiny"))


def settings(pair, out, steps=3):
    return [f"model.student={pair[0]}", f"model.teacher={pair[1]}", "data.limit=16", "rollout.backend=hf",
            "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=8", "optim.lr=1e-3",
            "optim.micro_batch_size=3", f"run.steps={steps}", f"run.output_dir={out}", "run.progress=false",
            "loss.objective=kdrl", "loss.beta=0.5", "loss.log_exact_kl=true"]


def comparable(metrics):
    return {k: v for k, v in metrics.items() if not k.startswith("time_")}


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
