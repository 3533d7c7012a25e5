"""README.md and .ci/run agree on the test command, and the README's example runs."""

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = [line.strip() for block in _bash_blocks(readme) for line in block.splitlines() if line.strip()]
    test_command = [c for c in commands if "pytest" in c]
    assert len(test_command) == 1, commands
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command[0] in ci_lines
    assert any("verify_sharding.py" in c and "torchrun" in c for c in commands)


def test_readme_api_example_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {"torch": torch})
