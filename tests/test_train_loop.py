"""The whole loop on tiny offline models: rollouts, grading, KDRL updates, checkpoints, and exact resume."""
import json

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
    card = json.loads((out / "final" / "kdrl_model.json").read_text())
    assert card["base_model"] == str(pair[0]) and card["steps"] == 1 and card["trained"].startswith("LoRA rank ")
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


def test_eval_at_start_and_eval_kl_recorded_once_and_resumed(pair, tmp_path, monkeypatch):
    """run.eval_at_start evaluates the initial student as step 0 with a step-0 checkpoint, so a run interrupted in
    step 1 resumes without evaluating again; run.eval_kl loads the teacher even for GRPO (which never trains
    against it) and records the exact KL on the greedy responses."""
    from kdrl.trainer.checkpoint import list_checkpoints
    out = tmp_path / "evals"
    extra = ["loss.objective=grpo", "run.eval_at_start=true", "run.eval_kl=true", "run.eval_every=2",
             "run.eval_limit=5", "run.eval_max_new_tokens=6", "run.save_every=0"]
    trainer = Trainer(load_config(None, settings(pair, out, steps=2) + extra))
    assert trainer.teacher is not None
    calls, real_generate = {"n": 0}, trainer.generator.generate

    def crash_in_step_1(*args, **kwargs):  # call 1 is the start evaluation, call 2 step 1's rollout
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(trainer.generator, "generate", crash_in_step_1)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    del trainer
    assert [p.name for p in list_checkpoints(out)] == ["step_000000"]
    resumed = Trainer(load_config(None, settings(pair, out, steps=2) + extra))
    assert resumed.step == 0
    resumed.run()
    logged = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in logged] == [0, 1, 2]
    start, _, end = logged
    assert set(start) >= {"eval_accuracy", "eval_len_mean", "eval_truncated_frac", "eval_kl"}
    assert "reward_mean" not in start and "k2" not in logged[1]  # GRPO: the teacher is not in the loss
    assert start["eval_kl"] > 0 and end["eval_kl"] > 0
    assert [p.name for p in list_checkpoints(out)] == ["step_000000", "step_000002"]
    # The measured KL is the exact one: recompute the start value from the initial student on full logits.
    fresh = Trainer(load_config(None, settings(pair, tmp_path / "check", steps=0) + extra))
    from kdrl.data import load_task
    from kdrl.generation import SamplingConfig
    problems = load_task("gsm8k", limit=5)
    texts = fresh.prompts(problems)
    outs = [o[0] for o in fresh.generator.generate(texts, SamplingConfig(max_new_tokens=6, temperature=0.0),
                                                   progress=False)]
    num = den = 0.0
    for text, o in zip(texts, outs):
        ids = torch.tensor([fresh.tokenizer(text, add_special_tokens=False)["input_ids"] + list(o.token_ids)])
        p = len(ids[0]) - len(o.token_ids)
        with torch.no_grad():
            s = fresh.model(input_ids=ids).logits[0, p - 1:-1].double().log_softmax(-1)
            t = fresh.teacher(input_ids=ids).logits[0, p - 1:-1].double().log_softmax(-1)
        num += float((s.exp() * (s - t)).sum())
        den += len(o.token_ids)
    assert start["eval_kl"] == pytest.approx(num / den, rel=2e-3)
    fresh.close()


def test_eval_kl_needs_a_torch_teacher():
    with pytest.raises(ValueError, match="run.eval_kl=true measures the KL to the teacher: set model.teacher"):
        load_config(None, ["run.eval_kl=true", "model.teacher=null"])
    with pytest.raises(ValueError, match="model.teacher_backend=hf"):
        load_config(None, ["run.eval_kl=true", "model.teacher=x", "model.teacher_backend=vllm"])


def test_heap_is_trimmed_only_when_memory_runs_short(monkeypatch):
    from kdrl.trainer import step
    monkeypatch.setattr(step, "_available_fraction", lambda: 0.5)
    assert step.release_free_memory(below=0.25) is False
    monkeypatch.setattr(step, "_available_fraction", lambda: 0.1)
    assert step.release_free_memory(below=0.25) is True  # glibc on Linux: malloc_trim ran
    monkeypatch.undo()
    assert 0 < step._available_fraction() < 1  # read from /proc/meminfo
