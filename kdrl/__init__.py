"""kdrl: everything around the loss library ``kdrl_kernels``, in layers (a layer imports only those above it here):

1. the application layer, the modules of this folder, shared by the evaluation harness (``evals/``) and the
   trainer: ``models`` (resolver, loading), ``data`` (benchmarks and training sets), ``prompts``, ``grading``
   (+ ``verify_pool``), ``generation`` (transformers / vLLM backends), ``proc`` (child processes);
2. ``kdrl.trainer``: the thin trainer (``python -m kdrl.train`` is its command line, ``train.py`` here);
3. ``kdrl.integrations``: our losses inside TRL and verl; ``kdrl.testbed``: the toy KD + RL experiment.
See docs/DESIGN.md.
"""
