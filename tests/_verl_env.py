"""The verl test files' common guard: skip the whole module unless verl 0.9.1 (and what the file needs) imports."""
import importlib

import pytest

VERSION = "0.9.1"


def require_verl(test_file: str, *modules: str) -> None:
    """Skip the calling test module (at import) unless verl ``VERSION`` and ``modules`` import, saying how to set up."""
    setup = ("verl is not installed here: create its environment with `bash scripts/setup_verl.sh`, then run "
             f"`.venv-verl/bin/python -m pytest tests/{test_file}`")
    try:
        verl = importlib.import_module("verl")
        for name in modules:
            importlib.import_module(name)
    except ImportError:
        pytest.skip(setup, allow_module_level=True)
    if verl.__version__ != VERSION:
        pytest.skip(f"checked against verl {VERSION}, found {verl.__version__}; {setup}", allow_module_level=True)
