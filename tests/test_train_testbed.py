"""The KD + RL testbed learns: GRPO and KDRL each raise held-out accuracy from the same pre-trained student.

A regression test of the whole chain the trainer uses (sampling -> exact-match reward -> ``build_batch``'s
group-normalised advantages -> teacher hidden states -> ``backward_microbatches`` / ``KDRLLoss`` -> AdamW step) on
tiny models trained here (no download). Deterministic: fixed seeds, one torch thread.
"""
import torch

from kdrl import testbed as tb

MARGIN = 0.10  # held-out accuracy gain required; the seed-to-seed spread of a run here is a few points


def test_grpo_and_kdrl_raise_heldout_accuracy(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = tb.quick_config()
        train, heldout = tb.datasets(cfg)
        teacher, student, info = tb.pretrain_pair(cfg, tmp_path, say=lambda *_: None)
        start = info["student"]["accuracy"]
        assert 0.02 <= start <= 0.4, info
        assert info["teacher"]["accuracy"] >= start + 0.2, info
        state = {k: v.clone() for k, v in student.state_dict().items()}
        for method in ("grpo", "kdrl"):
            run = tb.rl_run(method, 0, state, teacher, cfg, train, heldout, say=lambda *_: None)
            assert run["curve"][0]["accuracy"] == start  # the same start for both
            assert run["final"] >= start + MARGIN, (method, start, run["curve"])
            kl = run["kl"]
            assert kl["exact_kl"] > 0 and kl["k2"] > 0, kl
    finally:
        torch.set_num_threads(threads)
