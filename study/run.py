"""Run a study: train every arm, evaluate each exported model and the starting student, write the report.

    python study/run.py configs/study_gsm8k.yaml                 # all stages, all arms; run it again to resume
    python study/run.py configs/study_gsm8k.yaml --stage train --arms kdrl,grpo

Stages (each skips what is already done, so an interrupted study continues where it stopped):
- ``train``: for each arm, ``python -m kdrl.train --config <output_dir>/configs/<arm>.yaml`` (that file is the
  arm's whole trainer config, written once and never overwritten); the trainer resumes from the arm's newest
  checkpoint. An arm is done when its ``final/`` model exists and its log reaches the last step.
- ``eval``: ``evals/run.py`` on the starting student (run ``start``) and on every finished arm's ``final/``
  (``--baseline start``: paired differences on the same problems), into ``<output_dir>/evals``; a run the harness
  already finished is skipped, a partial one resumes.
- ``report``: ``<output_dir>/report.md`` and ``study.png`` from the arms' logs and the evaluations; with
  ``report:`` in the study file, also that docs page's generated section and the PNG beside it.

Every stage runs its work in child processes with this interpreter (``sys.executable``): use the one that has
vLLM and the trainer's extras (``bash scripts/setup_eval.sh --venv DIR --train``, then
``DIR/bin/python study/run.py ...``).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the repository's packages first
    sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from study.config import Study, StudyError, load_study  # noqa: E402
from study.status import arm_done, arm_steps, eval_done, machine  # noqa: E402

STAGES = ("train", "eval", "report")


def say(message: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {message}", flush=True)


def arm_config_file(study: Study, arm: str) -> Path:
    """``<output_dir>/configs/<arm>.yaml``: written once; a different existing file is refused, never replaced
    (the arm's run was made with it)."""
    path = study.output_dir / "configs" / f"{arm}.yaml"
    text = (f"# arm {arm!r} of {study.path}: the whole trainer config (written by study/run.py)\n"
            + yaml.safe_dump(study.arms[arm], sort_keys=False))
    if path.exists():
        old = yaml.safe_load(path.read_text())
        if old != study.arms[arm]:
            raise StudyError(f"{path} holds another config for arm {arm!r} than {study.path} now gives: the arm's "
                             f"run was made with it. Restore the study file, or choose another output_dir")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def record_session(study: Study, arm: str) -> None:
    """Append to ``<output_dir>/sessions.jsonl`` which machine trains the arm from which step (the report names
    the machines: step times are only comparable on one kind)."""
    study.output_dir.mkdir(parents=True, exist_ok=True)
    with (study.output_dir / "sessions.jsonl").open("a") as f:
        f.write(json.dumps({"arm": arm, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "from_step": arm_steps(study, arm), "machine": machine()}) + "\n")


def run_child(cmd: list[str]) -> None:
    """Run one stage's child process in the foreground (its output streams through); a failure stops the study.

    Interrupted (Ctrl-C, or SIGINT / SIGTERM to this process alone), the child is asked to stop with one SIGTERM
    (which both children treat like Ctrl-C, and which a child started in the background, where Ctrl-C is ignored,
    still hears) and waited for, so the trainer keeps every finished step and the harness its samples, and its
    engine stops: nothing is left running and the next run of the same command continues."""
    say("$ " + " ".join(cmd))
    env = dict(os.environ)  # the children find this repository's packages from the user's directory too
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    child = subprocess.Popen(cmd, env=env)
    try:
        code = child.wait()
    except KeyboardInterrupt:
        _stop(child)
        raise
    if code:
        raise SystemExit(f"study/run.py: {' '.join(cmd[:4])} ... exited with {code}; fix that and run the same "
                         "command again to continue")


def _stop(child: subprocess.Popen, grace: float = 2.0, patience: float = 300.0) -> None:
    """Stop ``child`` after an interrupt: a terminal's Ctrl-C reached it too (same process group), so it gets
    ``grace`` seconds to act on that before one SIGTERM is sent; after ``patience`` more seconds, SIGKILL (the
    trainer's records and checkpoints survive even that)."""
    for sig, wait in ((None, grace), (signal.SIGTERM, patience), (signal.SIGKILL, None)):
        if sig is not None and child.poll() is None:
            child.send_signal(sig)
        try:
            child.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
        except KeyboardInterrupt:  # a second Ctrl-C: stop waiting politely
            continue


def _sigterm(signum, frame):
    raise KeyboardInterrupt  # SIGTERM ends the study like Ctrl-C: the running child is stopped, not orphaned


def train(study: Study, arms: list[str]) -> None:
    for arm in arms:
        config = arm_config_file(study, arm)  # also for a finished arm: its results were made with that file
        if arm_done(study, arm):
            say(f"arm {arm}: done ({study.arm_dir(arm) / 'final'})")
            continue
        say(f"arm {arm}: training into {study.arm_dir(arm)}/ (config {config})")
        record_session(study, arm)
        run_child([sys.executable, "-m", "kdrl.train", "--config", str(config)])


def evaluate(study: Study, arms: list[str]) -> None:
    from study.evaluate import eval_commands
    for name, cmd in eval_commands(study, arms):
        if eval_done(study, name):
            say(f"evaluation {name}: done ({study.eval_dir / name / 'results.json'})")
            continue
        run_child(cmd)


def report(study: Study, arms: list[str]) -> None:
    from study.report import write_report
    for path in write_report(study, arms):
        say(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="study/run.py", description=__doc__.split("\n")[0])
    p.add_argument("config", help="study file, e.g. configs/study_gsm8k.yaml")
    p.add_argument("--stage", default="all", choices=("all",) + STAGES)
    p.add_argument("--arms", default=None, help="comma list of arms (default: all, in the file's order)")
    args = p.parse_args(argv)
    try:
        study = load_study(args.config)
        arms = list(study.arms) if args.arms is None else [a.strip() for a in args.arms.split(",") if a.strip()]
        unknown = [a for a in arms if a not in study.arms]
        if unknown or not arms:
            raise StudyError(f"--arms {args.arms}: unknown arm(s) {unknown}; the study has {', '.join(study.arms)}")
    except StudyError as err:
        print(f"study/run.py: error: {err}", file=sys.stderr)
        return 2
    stages = STAGES if args.stage == "all" else (args.stage,)
    signal.signal(signal.SIGTERM, _sigterm)
    say(f"{study.path}: arms {', '.join(arms)}; stages {', '.join(stages)}; output {study.output_dir}/")
    try:
        for stage in stages:
            {"train": train, "eval": evaluate, "report": report}[stage](study, arms)
    except StudyError as err:
        print(f"study/run.py: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("study/run.py: interrupted; run the same command again to continue where it stopped",
              file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
