"""docs/hf.md and docs/models.md: every Python block not marked a fragment runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent.parent
BLOCK = re.compile(r"(<!-- fragment -->\n)?```python\n(.*?)```", re.S)


def blocks(name: str) -> list[str]:
    text = (ROOT / "docs" / name).read_text()
    return [m.group(2) for m in BLOCK.finditer(text) if not m.group(1)]


@pytest.mark.parametrize("name", ["hf.md", "models.md"])
def test_python_blocks_run_as_written(name: str, tmp_path: Path) -> None:
    found = blocks(name)
    assert found
    for i, code in enumerate(found):
        script = tmp_path / f"block{i}.py"
        script.write_text(code)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=100,
            cwd=ROOT,
            env=env,
            check=False,
        )
        assert done.returncode == 0, f"{name} block {i}:\n{code}\n{done.stderr[-2000:]}"
