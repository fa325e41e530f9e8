"""examples/fastapi_app.py answers a client's mistakes with 400 and a one-line reason."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
ROOT = Path(__file__).resolve().parents[2]
if not (ROOT / "graphs" / "weights" / "tiny_lm.safetensors").exists():
    pytest.skip("the tiny LM weights are not in this checkout", allow_module_level=True)


def test_client_errors_are_400_without_traceback() -> None:
    from fastapi.testclient import TestClient

    sys.path.insert(0, str(ROOT))
    try:
        example = importlib.import_module("examples.fastapi_app")
    finally:
        sys.path.remove(str(ROOT))
    with TestClient(example.app, raise_server_exceptions=False) as http:
        for query, says in (
            ("prompt=&max_new_tokens=4", "empty"),
            ("prompt=hi&max_new_tokens=100000", "max_new_tokens"),
            ("prompt=hi&max_new_tokens=0", "max_new_tokens"),
        ):
            resp = http.get("/generate?" + query)
            assert resp.status_code == 400, (query, resp.text)
            assert says in resp.json()["detail"]
            assert "Traceback" not in resp.text
        resp = http.get("/generate?prompt=def&max_new_tokens=3")
        assert resp.status_code == 200 and resp.text
