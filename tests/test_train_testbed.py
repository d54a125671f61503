"""The KD + RL testbed's chain runs and moves the student the way each objective should, from one start.

A regression test of the whole chain the trainer uses (sampling -> exact-match reward -> ``build_batch``'s
group-normalised advantages -> teacher hidden states -> ``backward_microbatches`` / ``KDRLLoss`` -> AdamW step) on
tiny models pre-trained here (no download). Deterministic: fixed seeds, one torch thread; ``quick_config`` is the
table's configuration (docs/testbed.md) with seed 0 and 40 steps instead of 120, to stay near a minute.

What it does not assert: that GRPO and KDRL raise held-out accuracy by a clear margin. In 40 steps they do not
(measured over three seeds: GRPO +1.0 to +3.0 points, KDRL +0.3 to +2.3, within the seed spread; they need the
table's 120 steps); on-policy KD does (+4.3 to +5.6 points) and is asserted instead, with KDRL's pull towards the
teacher.
"""
import torch

from kdrl import testbed as tb


def test_testbed_chain_moves_the_student(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = tb.quick_config()
        train, heldout = tb.datasets(cfg)
        teacher, student, info = tb.pretrain_pair(cfg, tmp_path, say=lambda *_: None)
        start = info["student"]["accuracy"]
        assert 0.05 <= start <= 0.35, info  # weak but not at zero
        assert 0.7 <= info["teacher"]["accuracy"] <= 0.95, info  # good but imperfect
        state = {k: v.clone() for k, v in student.state_dict().items()}
        runs = {m: tb.rl_run(m, 0, state, teacher, cfg, train, heldout, say=lambda *_: None)
                for m in ("grpo", "kdrl", "kd_k2")}
        for m, run in runs.items():
            assert run["curve"][0]["accuracy"] == start, m  # the same start for every method
            assert len(run["train"]) == cfg.steps and all(r["grad_norm"] > 0 for r in run["train"]), m
        # on-policy KD learns from the teacher: a clear gain in held-out accuracy (9+ of 300 problems)
        assert runs["kd_k2"]["final"] >= start + 0.03, runs["kd_k2"]["curve"]
        # GRPO and KDRL do not lose accuracy ...
        assert runs["grpo"]["final"] >= start and runs["kdrl"]["final"] >= start
        # ... and the KD term of KDRL keeps the student much closer to the teacher than GRPO does
        assert runs["kdrl"]["kl"]["exact_kl"] <= runs["grpo"]["kl"]["exact_kl"] - 0.15, \
            (runs["kdrl"]["kl"], runs["grpo"]["kl"])
        for run in runs.values():  # the exact KL and its sample estimates agree in size
            kl = run["kl"]
            assert kl["exact_kl"] > 0 and abs(kl["k1"] - kl["exact_kl"]) < 0.2 * kl["exact_kl"] + 0.05, kl
    finally:
        torch.set_num_threads(threads)
