"""The trainer's command line: ``python -m kdrl.train --config configs/kdrl.yaml [--set section.key=value ...]``.

The loop itself is :class:`kdrl.trainer.loop.Trainer`, its configuration :class:`kdrl.trainer.config.TrainConfig`.
A bad setting, a run directory in use or holding another run, or an unusable checkpoint is reported as one line
naming the field or file, the value and what is expected, with exit status 2 (before any model is loaded, except
for a checkpoint that does not fit the model); anything else keeps its traceback.
"""
from __future__ import annotations

import sys
import time

_T0 = time.perf_counter()
if __name__ == "__main__" and not {"-h", "--help", "--describe"} & set(sys.argv[1:]):
    # The imports below take seconds (torch, transformers): say so before they start.
    print("[kdrl.train +0.0s] starting: importing torch and kdrl_kernels ...", flush=True)

import argparse
import signal

from kdrl.trainer.config import ConfigError, describe, load_config
from kdrl.trainer.loop import Trainer

__all__ = ["main"]


def _refuse(err: Exception) -> None:
    """One line on stderr and exit status 2, as argparse does for a bad argument."""
    print(f"kdrl.train: error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kdrl.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file with the sections of kdrl.trainer.config.TrainConfig")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one field, e.g. --set rollout.group_size=8 (repeatable)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume although the config differs from the checkpoint's (the change is logged to "
                             "<output_dir>/config_changes.jsonl)")
    parser.add_argument("--fresh", action="store_true",
                        help="start over at step 0: a run already in run.output_dir is first moved aside to "
                             "<output_dir>.old-<time> (nothing is deleted)")
    parser.add_argument("--describe", action="store_true", help="print every config field with its help and exit")
    args = parser.parse_args(argv)
    if args.describe:
        print(describe())
        return
    try:
        cfg = load_config(args.config, args.set)  # checks input only: its ValueError/TypeError are the user's
    except (ValueError, TypeError) as err:
        _refuse(err)
    try:
        trainer = Trainer(cfg, allow_config_change=args.allow_config_change, started=_T0, fresh=args.fresh)
    except ConfigError as err:  # a start-up check; any other error while starting is a bug: keep its traceback
        _refuse(err)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminated)
    try:
        trainer.run()
    except KeyboardInterrupt:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the message short
        print(f"kdrl.train: stopped during step {trainer.step + 1}; every finished step is on disk, and the same "
              "command resumes from the newest checkpoint", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    trainer.say(f"done: step {trainer.step}/{cfg.run.steps}; outputs in {trainer.output_dir}/")


def _terminated(signum, frame):
    """SIGTERM (a scheduler, ``kill``, study/run.py) stops the run like Ctrl-C: the step in progress is dropped,
    the lock released, the generator's engine shut down."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
