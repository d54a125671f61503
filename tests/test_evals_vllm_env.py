"""vLLM CPU engine defaults (no vLLM needed): set before the engine starts, and a user's own settings win."""
import os

from kdrl.generation import cpu_engine_defaults


def test_two_core_machines_give_the_worker_every_core(monkeypatch):
    for key in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_NUM_OF_RESERVED_CPU"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    cpu_engine_defaults()
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "2" and os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"


def test_larger_machines_and_user_settings_are_left_alone(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "6")
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    cpu_engine_defaults()
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in os.environ and os.environ["VLLM_CPU_KVCACHE_SPACE"] == "6"
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "1")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    cpu_engine_defaults()
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "1"
