"""The trainer's command line: ``python -m kdrl.train --config configs/kdrl.yaml [--set section.key=value ...]``.

The loop itself is :class:`kdrl.trainer.loop.Trainer`, its configuration :class:`kdrl.trainer.config.TrainConfig`.
"""
from __future__ import annotations

import sys
import time

_T0 = time.perf_counter()
if __name__ == "__main__" and not {"-h", "--help", "--describe"} & set(sys.argv[1:]):
    # The imports below take seconds (torch, transformers): say so before they start.
    print("[kdrl.train +0.0s] starting: importing torch and kdrl_kernels ...", flush=True)

import argparse

from kdrl.trainer.config import describe, load_config
from kdrl.trainer.loop import Trainer

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kdrl.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file with the sections of kdrl.trainer.config.TrainConfig")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one field, e.g. --set rollout.group_size=8 (repeatable)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume although the config differs from the checkpoint's (the change is logged to "
                             "<output_dir>/config_changes.jsonl)")
    parser.add_argument("--describe", action="store_true", help="print every config field with its help and exit")
    args = parser.parse_args(argv)
    if args.describe:
        print(describe())
        return
    cfg = load_config(args.config, args.set)
    trainer = Trainer(cfg, allow_config_change=args.allow_config_change, started=_T0)
    trainer.run()
    trainer.say(f"done: step {trainer.step}/{cfg.run.steps}; outputs in {trainer.output_dir}/")


if __name__ == "__main__":
    main()
