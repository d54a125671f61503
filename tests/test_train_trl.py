"""KDRLGRPOTrainer (TRL GRPOTrainer subclass) runs real optimizer steps on CPU with a tiny model and teacher."""
import pytest
import torch

pytest.importorskip("trl")
from _train_tiny import make_tiny_pair, one_thread  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("objective", ["kdrl", "trrd"])
def test_trl_subclass_runs_steps_with_the_kdrl_loss(tmp_path, objective):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    from kdrl.integrations.trl_grpo import KDRLGRPOTrainer
    from kdrl_kernels import KDRLConfig

    student_dir, teacher_dir = make_tiny_pair(tmp_path / "models")
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(student_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": str(i + 1)}
                              for i in range(4)])
    # A reward that differs inside every group of 4 (not the 0/1 grader: a random tiny model is never right), so
    # advantages are never all zero; a length-based reward tied now and then and left TRRD with no gradient.
    # It also records the "truncated" flags the subclass hands to reward functions (correctness_reward uses them).
    seen = []

    def lengths(completions, **kw):
        seen.append(kw["truncated"])
        return [float(i % 2) for i in range(len(completions))]

    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=8, max_steps=2, learning_rate=1e-2, use_cpu=True, report_to=[],
                      logging_steps=1, save_strategy="no", bf16=False, seed=0)
    trainer = KDRLGRPOTrainer(model=model, reward_funcs=lengths, args=args, train_dataset=data,
                              processing_class=tok, teacher_model=teacher,
                              kdrl_config=KDRLConfig(objective=objective, beta=0.5))
    trainer.train()
    assert seen and all(len(t) == 4 and all(isinstance(x, bool) for x in t) for t in seen)
    logged = [h for h in trainer.state.log_history if "kdrl/k2" in h]
    assert len(logged) == 2 and all(h["kdrl/k2"] > 0 for h in logged)
    if objective == "trrd":  # the teacher-anchored ratio is not 1 on-policy, so clipping is measured
        assert all(0.0 <= h["kdrl/clip_frac"] <= 1.0 for h in logged)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert "lm_head.weight" in changed and len(changed) > len(before) // 2


def test_correctness_reward_gives_a_truncated_completion_no_fallback_credit():
    from kdrl.integrations.trl_grpo import correctness_reward
    texts, answers = ["so the answer is 5", "\\boxed{5}. Let me check"], ["5", "5"]
    assert correctness_reward(texts, answers, truncated=[True, True]) == [0.0, 1.0]  # only the closed box counts
    assert correctness_reward(texts, answers, truncated=[False, False]) == [1.0, 1.0]
    assert correctness_reward(texts, answers) == [1.0, 1.0]  # a plain GRPOTrainer passes no flags: finished


def test_teacher_equal_to_student_gives_zero_kl_at_a_temperature(tmp_path):
    """The temperature contract on the TRL path: TRL samples at T, the subclass scores student and teacher at T, so
    a teacher identical to the student gives k1 = k2 = k3 = exact KL = 0 (the trainer's own test is in
    test_train_findings.py)."""
    import copy

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    from kdrl.integrations.trl_grpo import KDRLGRPOTrainer
    from kdrl_kernels import KDRLConfig

    student_dir, _ = make_tiny_pair(tmp_path / "models")
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    teacher = copy.deepcopy(model).eval()
    tok = AutoTokenizer.from_pretrained(student_dir)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": str(i + 1)}
                              for i in range(4)])
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=8, max_steps=1, learning_rate=0.0, use_cpu=True, report_to=[],
                      logging_steps=1, save_strategy="no", bf16=False, seed=0, temperature=0.7)
    trainer = KDRLGRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [float(i % 2) for i in
                                                                                     range(len(completions))],
                              args=args, train_dataset=data, processing_class=tok, teacher_model=teacher,
                              kdrl_config=KDRLConfig(objective="kdrl", beta=0.5, temperature=0.7, log_exact_kl=True))
    trainer.train()
    (logged,) = [h for h in trainer.state.log_history if "kdrl/k2" in h]
    for key in ("kdrl/k1", "kdrl/k2", "kdrl/k3", "kdrl/exact_kl"):
        assert abs(logged[key]) < 1e-5, (key, logged)
    assert logged["kdrl/clip_frac"] == 0.0
