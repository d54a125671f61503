"""Two optimizer steps of KDRLGRPOTrainer in one process of a 2-process CPU (gloo) run under torchrun.

Used by tests/test_train_trl_grpo_equal.py: ``torchrun --standalone --nproc_per_node 2 _trl_ddp_worker.py STUDENT
TEACHER OUT``. Each process writes ``OUT/rank<i>.json``: the KDRLLoss metrics it computed locally, the trainer's log
history, and a checksum of its lm_head after training.
"""
import json
import sys

import torch


def main(student_dir, teacher_dir, out_dir):
    torch.set_num_threads(1)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    from kdrl.integrations.trl_grpo import KDRLGRPOTrainer
    from kdrl_kernels import KDRLConfig

    load = (lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32))  # noqa: E731
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}], "answer": str(i + 1)}
                              for i in range(8)])
    reward = (lambda completions, **kw: [float(i % 2) for i in range(len(completions))])  # noqa: E731
    args = GRPOConfig(output_dir=f"{out_dir}/run", per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=8, max_steps=2, learning_rate=1e-2, use_cpu=True, report_to=[],
                      logging_steps=1, save_strategy="no", bf16=False, seed=0)
    trainer = KDRLGRPOTrainer(model=load(student_dir), reward_funcs=reward, args=args, train_dataset=data,
                              processing_class=AutoTokenizer.from_pretrained(student_dir),
                              teacher_model=load(teacher_dir), kdrl_config=KDRLConfig(objective="kdrl", beta=0.5))
    local = []
    forward = trainer.kdrl_loss.forward

    def keep(*a, **kw):
        loss, metrics = forward(*a, **kw)
        local.append(metrics)
        return loss, metrics
    trainer.kdrl_loss.forward = keep
    trainer.train()
    rank = trainer.accelerator.process_index
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump({"world": trainer.accelerator.num_processes, "local": local, "logged": trainer.state.log_history,
                   "lm_head": trainer.accelerator.unwrap_model(trainer.model).lm_head.weight.double().sum().item()},
                  f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
