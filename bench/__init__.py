"""Benchmarks of kdrl_kernels (run `python bench/run.py`); see bench/README.md."""
