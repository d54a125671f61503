"""The README's library example runs as written."""
import re
from pathlib import Path


def test_readme_library_example_runs():
    text = (Path(__file__).parent.parent / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["weight"].grad is not None and scope["hidden"].grad is not None
    assert scope["metrics"]["num_tokens"] == 4 * 64
