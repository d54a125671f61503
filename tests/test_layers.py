"""The floors of docs/DESIGN.md, read from the import statements of every module (no import is executed).

kdrl_kernels imports none of ours; kdrl's application layer (kdrl/*.py) none of kdrl's trainer, integrations or
testbed; the trainer neither integrations nor testbed; evals only kdrl's application layer; bench only
kdrl_kernels; study (on top) the trainer and evals; and no private name (leading underscore) is imported across a
package boundary.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("kdrl_kernels", "kdrl", "evals", "bench", "study")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """(imported module, imported names) for every import of one of our packages in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ()
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, tuple(a.name for a in node.names)


def _package(module: str) -> str:
    """The unit a floor rule talks about: kdrl's subpackages separately, kdrl/*.py as "kdrl" (the app layer)."""
    parts = module.split(".")
    if parts[0] == "kdrl" and len(parts) > 1 and parts[1] in ("trainer", "integrations", "testbed"):
        return f"kdrl.{parts[1]}"
    if parts[0] == "kdrl" and len(parts) > 1 and parts[1] == "train":
        return "kdrl.trainer"  # the trainer's command line
    return parts[0]


ALLOWED = {
    "kdrl_kernels": {"kdrl_kernels"},
    "kdrl": {"kdrl_kernels", "kdrl"},
    "kdrl.trainer": {"kdrl_kernels", "kdrl", "kdrl.trainer"},
    "kdrl.integrations": {"kdrl_kernels", "kdrl", "kdrl.integrations"},
    "kdrl.testbed": {"kdrl_kernels", "kdrl", "kdrl.trainer", "kdrl.testbed"},
    "evals": {"kdrl", "evals"},
    "bench": {"kdrl_kernels", "bench"},
    "study": {"kdrl_kernels", "kdrl", "kdrl.trainer", "evals", "study"},
}


def _modules():
    for top in OURS:
        for path in sorted((ROOT / top).rglob("*.py")):
            yield path, _module_name(path)


@pytest.mark.parametrize("path,module", list(_modules()), ids=lambda x: str(x) if isinstance(x, str) else "")
def test_floors_and_public_names(path, module):
    here = _package(module)
    for target, names in _imports(path):
        if target.split(".")[0] not in OURS:
            continue
        there = _package(target)
        assert there in ALLOWED[here], f"{module} imports {target}: {here} may import only {sorted(ALLOWED[here])}"
        if there != here:
            private = [n for n in names if n.startswith("_")]
            assert not private, f"{module} imports private {private} from {target} (another package)"


def test_every_package_is_classified():
    for _, module in _modules():
        assert _package(module) in ALLOWED, module
