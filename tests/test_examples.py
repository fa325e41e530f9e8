"""The examples, run as written: as scripts in a subprocess, or their app object served."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
# A small deterministic streaming graph (echoes the prompt) importable as ``echo_graph``.
ECHO_DIR = ROOT / "tests" / "serve"
HAS_TINY_LM = (ROOT / "graphs" / "tiny_lm.py").exists()


def script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ECHO_DIR)])}
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trio_app_streams_several_prompts() -> None:
    done = script("trio_app.py", "--graph", "echo_graph", "one", "two two", "three")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:3] == ["[0] 'oneone'", "[1] 'two twotwo two'", "[2] 'threethree'"]
    assert json.loads(lines[3])["succeeded"] == 3


@pytest.mark.skipif(not HAS_TINY_LM, reason="graphs/tiny_lm.py is not there yet")
def test_trio_app_with_tiny_lm() -> None:
    done = script("trio_app.py", "--max-new-tokens", "8", "def main(", "import ")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("[0] 'def main(")


def test_batch_job_writes_jsonl_and_resumes(tmp_path: Path) -> None:
    inputs, output = tmp_path / "in.txt", tmp_path / "out.jsonl"
    texts = [f"line {i}" for i in range(40)]
    inputs.write_text("\n".join(texts) + "\n")
    # An earlier run finished 10 lines and died writing the 11th.
    head = [{"line": i + 1, "input": t, "output": "earlier"} for i, t in enumerate(texts[:10])]
    output.write_text("".join(json.dumps(r) + "\n" for r in head) + '{"line": 11, "inp')
    done = script("batch_job.py", str(inputs), str(output), "--graph", "echo_graph", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "30 new lines" in done.stdout
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["line"] for r in records] == list(range(1, 41))
    assert [r["input"] for r in records] == texts
    assert records[9]["output"] == "earlier"  # not redone
    assert records[10]["output"] == list("line 10")  # the torn line, redone
    again = script("batch_job.py", str(inputs), str(output), "--graph", "echo_graph", "--quiet")
    assert "0 new lines" in again.stdout
    assert len(output.read_text().splitlines()) == 40


@pytest.mark.anyio
async def test_fastapi_app_streams_from_its_route(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("fastapi")
    import httpx

    monkeypatch.syspath_prepend(str(ECHO_DIR))
    monkeypatch.setenv("DATAFLOW_GRAPH", "echo_graph")
    example = load_example("fastapi_app")
    app = example.app
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            resp = await http.get("/generate", params={"prompt": "hello there"})
            assert resp.status_code == 200
            assert resp.text == "hello there"
            resp = await http.get("/generate", params={"prompt": "hello", "max_new_tokens": 2})
            assert resp.text == "he"
            resp = await http.get("/generate", params={"prompt": "fail: please"})
            assert resp.status_code == 500 and "echo" in resp.json()["detail"]
        stats = app.state.engine.stats()["requests"]
    assert stats["succeeded"] == 2 and stats["failed"] == 1


@pytest.mark.parametrize("name", ["train_tiny_lm", "train_lstm_lm"])
def test_training_scripts_never_overwrite_the_shipped_weights_by_default(name: str) -> None:
    args = load_example(name).parse_args([])
    for path in (args.out, args.curve):
        assert str(path).startswith(f"runs/{name.removeprefix('train_')}-"), path
        assert not path.exists()
    told = load_example(name).parse_args(["--out", "graphs/weights/x.safetensors"])
    assert str(told.out) == "graphs/weights/x.safetensors"
