"""The served teacher (``model.teacher_backend=vllm``): config refusals, the prompt_logprobs reader, the trainer's
route for teacher log-probs, and (slow, needs vLLM: ``bash scripts/setup_eval.sh``) the engine against torch.

    DIR/bin/python -m pytest --run-slow tests/test_train_teacher_vllm.py   # after `setup_eval.sh --venv DIR`
"""
from types import SimpleNamespace

import pytest
import torch

from _train_tiny import make_tiny_pair
from kdrl.trainer.config import load_config
from kdrl.generation import vllm_available
from kdrl.trainer.teacher import response_logprobs

SERVED = ["model.teacher=t", "model.teacher_backend=vllm", "loss.objective=kdrl", "loss.kl_estimator=k2",
          "loss.log_exact_kl=false"]


def test_config_accepts_the_sampled_token_estimators_and_refuses_the_rest():
    for est in ("k1", "k2", "k3"):
        load_config(None, SERVED + [f"loss.kl_estimator={est}"])
    load_config(None, SERVED[:2] + ["loss.objective=trrd"])  # TRRD needs only the sampled tokens' log-probs
    with pytest.raises(ValueError, match="kl_estimator=exact"):
        load_config(None, SERVED + ["loss.kl_estimator=exact"])
    with pytest.raises(ValueError, match="log_exact_kl"):
        load_config(None, SERVED[:-1] + ["loss.log_exact_kl=true"])
    with pytest.raises(ValueError, match="rollout.temperature=0.7"):
        load_config(None, SERVED + ["rollout.temperature=0.7"])
    with pytest.raises(ValueError, match="model.teacher_backend must be hf or vllm"):
        load_config(None, SERVED + ["model.teacher_backend=server"])
    load_config(None, ["model.teacher_backend=vllm", "loss.objective=grpo"])  # no teacher used: nothing to refuse


def test_response_logprobs_reads_the_positions_of_the_response():
    lp = lambda v: SimpleNamespace(logprob=v)  # noqa: E731  (vLLM's Logprob has .logprob)
    prompt_logprobs = [None, {7: lp(-1.0)}, {8: lp(-2.0)}, {9: lp(-0.5), 3: lp(-0.1)}]
    assert response_logprobs(prompt_logprobs, [8, 9], start=2) == [-2.0, -0.5]
    with pytest.raises(RuntimeError, match="token 4 at position 3"):
        response_logprobs(prompt_logprobs, [8, 4], start=2)


class TorchScorer:
    """Stands in for the engine: full-logits fp32 log-probs of the sampled tokens from a torch copy of the teacher."""

    def __init__(self, path):
        from transformers import AutoModelForCausalLM
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.calls = 0

    @torch.no_grad()
    def logprobs(self, batch):
        self.calls += 1
        logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids).logits[:, batch.prompt_width - 1:-1].float()
        out = torch.log_softmax(logits, -1).gather(-1, batch.targets[..., None]).squeeze(-1)
        return out.masked_fill(~batch.mask, 0.0)


def test_trainer_takes_the_served_teachers_logprobs(tmp_path, monkeypatch):
    """With the engine replaced by a torch scorer, a step with the served teacher gives the hf route's k2 and loss,
    and the torch teacher is never loaded."""
    from kdrl.trainer import teacher as served
    from kdrl.trainer.loop import Trainer
    student, teacher = make_tiny_pair(tmp_path / "pair", noise=0.5)
    common = [f"model.student={student}", f"model.teacher={teacher}", "model.dtype=float32", "data.limit=8",
              "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=6", "optim.lr=1e-3",
              "run.steps=1", "run.progress=false", "run.threads=1", "run.export_final=false", "run.plot=false",
              "loss.objective=kdrl", "loss.beta=0.5", "loss.kl_estimator=k2", "loss.log_exact_kl=false"]
    scorer = TorchScorer(teacher)
    monkeypatch.setattr(served, "serve_teacher", lambda cfg, tok, say=print: scorer)
    runs = {}
    for backend in ("hf", "vllm"):
        t = Trainer(load_config(None, common + [f"model.teacher_backend={backend}",
                                                f"run.output_dir={tmp_path / backend}"]))
        assert (t.teacher is None) == (backend == "vllm")
        runs[backend] = t.train_step()
    assert scorer.calls == 1
    for key in ("k2", "loss", "grad_norm"):
        assert runs["vllm"][key] == pytest.approx(runs["hf"][key], rel=1e-4, abs=1e-6), key
    assert runs["vllm"]["k2"] > 0


@pytest.mark.slow
@pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")
def test_vllm_teacher_matches_the_torch_teacher(tmp_path):
    """The engine's prompt log-probs of sampled tokens equal the torch teacher's fp32 log-probs (fp32 weights)."""
    from kdrl.trainer.rollout import build_batch
    from kdrl.trainer.teacher import VLLMTeacher
    _, teacher = make_tiny_pair(tmp_path / "pair", noise=0.5, hidden=128, heads=2)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (n,), generator=gen).tolist() for n in (5, 9)]
    responses = [[torch.randint(3, 200, (n,), generator=gen).tolist() for n in lens] for lens in ((4, 7), (1, 6))]
    batch = build_batch(prompts, responses, [[False, True], [True, False]], [[False, False], [False, True]],
                        pad_id=0, scale_advantages=True)
    engine = VLLMTeacher(teacher, dtype="float32", progress=False, max_model_len=64)
    got = engine.logprobs(batch)
    want = TorchScorer(teacher).logprobs(batch)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert bool((got[~batch.mask] == 0).all())
    assert float((got - want).abs().max()) < 2e-3, (got, want)


def test_teacher_timing_script_checks_its_arguments_and_says_what_it_needs():
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).parent.parent / "scripts" / "teacher_timing.py"
    bad = subprocess.run([sys.executable, str(script), "--responses", "7", "--group", "4"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and "--responses must be a multiple of --group" in bad.stderr
    if not vllm_available():
        run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and "bash scripts/setup_eval.sh" in run.stderr
