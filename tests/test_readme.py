"""The README's example runs as written and prints what it promises."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _first_python_block() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"```python\n(.*?)```", text, re.S)
    assert match, "README has no python example"
    return match.group(1)


def test_readme_example_runs_as_written(tmp_path: Path) -> None:
    script = tmp_path / "readme_example.py"
    script.write_text(_first_python_block())
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # "hello": mean byte value 106.4 -> the digits as a list
    assert lines[0] == "['1', '0', '6', '.', '4', '0']"
    # "def main(" streamed char by char (mean 88.44), then map's first result ("a": 97)
    assert lines[1] == "8 8 . 4 4 ['9', '7', '.', '0', '0']"
    assert "'submitted': 5" in lines[-1] and "'succeeded': 5" in lines[-1]


def test_readme_example_heading_states_its_true_length() -> None:
    text = (ROOT / "README.md").read_text()
    heading = re.search(r"^## (\w[\w-]*) lines\n\n```python\n", text, re.M)
    assert heading, "the example's heading says how many lines it is"
    words = {"fifteen": 15, "twenty": 20, "thirty-three": 33}
    assert words[heading.group(1).lower()] == len(_first_python_block().splitlines())
