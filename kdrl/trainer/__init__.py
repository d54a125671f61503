"""The thin trainer: ``python -m kdrl.train`` (its command line) runs :class:`kdrl.trainer.loop.Trainer`.

- ``config.py``: ``TrainConfig`` (YAML sections; the ``loss`` section is a ``kdrl_kernels.KDRLConfig``);
- ``rollout.py``: padded batches of sampled responses with group-normalised advantages;
- ``step.py``: one step's primitives (hidden states, fp32 masters, micro-batched forward/backward), shared with
  the testbed;
- ``loop.py``: the run (models, generator, teacher scoring, optimizer, logging, checkpoints, export);
- ``checkpoint.py``, ``resume.py``, ``logging.py``, ``rundir.py``: what a run directory holds, how a run resumes,
  one writer per directory and no run overwritten;
- ``teacher.py``: the teacher served by a vLLM engine; ``plot.py``: ``python -m kdrl.trainer.plot``.
"""
