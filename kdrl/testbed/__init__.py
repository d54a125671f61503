"""A KD + RL testbed that learns in minutes on a CPU: ``python -m kdrl.testbed`` (see ``experiment.py``).

- ``task.py``: the toy task (add four digits, writing partial sums), tiny Llama models, SFT, sampling, evaluation;
- ``experiment.py``: the pre-trained pair, one RL run per method through the trainer's step primitives, the table;
- ``report.py``: the table and plot written to ``docs/testbed.md`` / ``docs/testbed.png``.
"""
