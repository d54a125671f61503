"""Our losses inside other trainers (each imports its framework; none is imported by the rest of ``kdrl``):

- ``trl_grpo.py``: ``KDRLGRPOTrainer``, TRL's ``GRPOTrainer`` with ``kdrl_kernels.KDRLLoss``;
- ``trl_distill.py``: ``KDRLDistillationTrainer``, TRL's ``DistillationTrainer`` without ``(tokens x vocab)`` logits;
- ``trl_hooks.py``: the TRL version range both were checked against, and the check of the TRL hooks they override;
- ``verl_plugin.py``: the ``kdrl`` fused backend and the ``kdrl`` / ``kdrl_objective`` / ``kdrl_trrd`` distillation
  losses for verl; ``verl_checks.py``: which verl and KDRLConfig settings they honour or refuse, and why.
"""
