"""The page at ``/`` in a real (headless) browser, against a real uvicorn server serving
``graphs/tiny_lm.py``: its elements, a streamed completion, live stats, and #stop
cancelling the request on the server.

Selenium calls block, so the browser is driven from a worker thread while the server
runs in the test's event loop. Every wait polls a condition (WebDriverWait), never a
fixed sleep. ``DATAFLOW_DASHBOARD_PNG=docs/dashboard.png`` also writes the screenshot
taken mid-generation there (the README's picture).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
import pytest

import dataflow as df
from dataflow.serve import create_app
from graphs import tiny_lm

pytestmark = pytest.mark.anyio

IDS = [
    "model",
    "prompt",
    "send",
    "stop",
    "output",
    "graph",
    "stats",
    "max_tokens",
    "temperature",
    "seed",
]
TAGS = {"model": "select", "prompt": "textarea", "graph": "svg", "stats": "table"}

# Records every change of #output's length, and the moment its stream ended.
OBSERVE = """
const out = document.getElementById('output');
window.__growth = [];
delete out.dataset.state;
new MutationObserver(() => {
  window.__growth.push([out.textContent.length, out.dataset.state || null]);
}).observe(out, {childList: true, characterData: true, subtree: true, attributes: true});
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # uvicorn runs on asyncio


def _js(driver: Any, script: str, *args: Any) -> Any:
    return driver.execute_script(script, *args)


def _length(driver: Any) -> int:
    return int(_js(driver, "return document.getElementById('output').textContent.length"))


def _counter(driver: Any, name: str) -> str:
    return str(_js(driver, f"return document.querySelector('dd[data-counter={name}]').textContent"))


def _row(driver: Any, node: str) -> str:
    return str(_js(driver, f"return document.querySelector('tr[data-node={node}]').textContent"))


def _cell(driver: Any, node: str, col: str) -> str:
    script = f"return document.querySelector('tr[data-node={node}] td[data-col={col}]').textContent"
    return str(_js(driver, script))


def _set(driver: Any, element_id: str, value: str) -> None:
    _js(driver, f"document.getElementById('{element_id}').value = arguments[0]", value)


def drive(driver: Any, url: str, shot: Path) -> dict[str, Any]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(driver, 60, poll_frequency=0.05)
    driver.get(url + "/")
    wait.until(lambda d: _js(d, "return document.body.dataset.ready") == "1")

    # -- every element of the contract
    for element_id in IDS:
        element = driver.find_element(By.ID, element_id)
        if element_id in TAGS:
            assert element.tag_name == TAGS[element_id], element_id
    assert [o.get_attribute("value") for o in Select(driver.find_element(By.ID, "model")).options]
    assert Select(driver.find_element(By.ID, "model")).first_selected_option.get_attribute(
        "value"
    ) == ("tiny_lm")
    svg_text = str(_js(driver, "return document.getElementById('graph').textContent"))
    for text in ("prompt", "tiny_lm", "encode · loop", "infer · auto→thread", "cap 16"):
        assert text in svg_text, (text, svg_text)
    assert _js(driver, "return document.querySelectorAll('#graph path.edge').length") == 3
    for node in ("prompt", "tiny_lm"):
        driver.find_element(By.CSS_SELECTOR, f'#stats tr[data-node="{node}"]')
    wait.until(lambda d: "/ 16" in _row(d, "tiny_lm"))  # the first stats arrived

    # -- a completion streams into #output, growing several times before it ends
    _set(driver, "prompt", "def main(")
    _set(driver, "max_tokens", "40")
    _set(driver, "seed", "1")
    _js(driver, OBSERVE)
    driver.find_element(By.ID, "send").click()
    wait.until(
        lambda d: str(_js(d, "return document.getElementById('output').dataset.state")).startswith(
            "finished"
        )
    )
    growth = _js(driver, "return window.__growth")
    before_end = [n for n, end in growth if end is None and n > 0]
    assert len(set(before_end)) >= 2, growth
    line = driver.find_element(By.ID, "output_stats").text
    assert "tokens/s" in line and "first token" in line and "finished: length" in line, line
    wait.until(lambda d: _counter(d, "succeeded") == "1")

    # -- a long one: the stats row moves while it runs; #stop ends it, counted cancelled
    row_before = _row(driver, "tiny_lm")
    out_before = int(_cell(driver, "tiny_lm", "items_out"))
    _set(driver, "max_tokens", "4000")
    _js(driver, OBSERVE)
    driver.find_element(By.ID, "send").click()
    # (a longer text for the README's picture)
    wait.until(lambda d: _length(d) >= (400 if os.environ.get("DATAFLOW_DASHBOARD_PNG") else 40))
    wait.until(lambda d: _row(d, "tiny_lm") != row_before)
    wait.until(lambda d: int(_cell(d, "tiny_lm", "items_out")) > out_before)
    wait.until(lambda d: _cell(d, "tiny_lm", "busy") not in ("", "0%"))  # working now
    wait.until(lambda d: _counter(d, "in_flight") == "1")
    assert _js(driver, "return document.getElementById('output').dataset.state") is None
    assert driver.find_element(By.ID, "stop").is_enabled()
    driver.save_screenshot(str(shot))
    driver.find_element(By.ID, "stop").click()
    wait.until(
        lambda d: _js(d, "return document.getElementById('output').dataset.state") == "stopped"
    )
    stopped_at = _length(driver)
    wait.until(lambda d: _counter(d, "cancelled") == "1")
    wait.until(lambda d: _counter(d, "in_flight") == "0")
    assert _length(driver) == stopped_at  # no more text after #stop
    assert stopped_at < 4000
    return {"stopped_at": stopped_at}


async def test_page_streams_shows_stats_and_stops(serve: Any, browser: Any, tmp_path: Path) -> None:
    engine = df.Engine(tiny_lm.build())
    shot = tmp_path / "dashboard.png"
    async with serve(create_app(engine)) as server:
        result = await anyio.to_thread.run_sync(drive, browser, server.url, shot)
        requests = engine.stats()["requests"]
    assert requests["succeeded"] == 1 and requests["cancelled"] == 1, requests
    assert requests["in_flight"] == 0
    assert result["stopped_at"] > 0
    png = await anyio.Path(shot).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    target = os.environ.get("DATAFLOW_DASHBOARD_PNG")
    if target:
        await anyio.Path(target).write_bytes(png)


def drive_with_key(driver: Any, url: str, secret: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, 60, poll_frequency=0.05)
    driver.get(url + "/")
    form = driver.find_element(By.ID, "auth")
    wait.until(lambda d: form.is_displayed())  # the server answered 401: the page asks
    assert secret not in driver.page_source
    for key, displayed in (("wrong", True), (secret, False)):
        driver.find_element(By.ID, "api_key").send_keys(key)
        driver.find_element(By.ID, "auth_save").click()
        if displayed:  # asked again, saying why
            wait.until(
                lambda d: (
                    form.is_displayed() and "API key" in d.find_element(By.ID, "auth_error").text
                )
            )
    wait.until(lambda d: _js(d, "return document.body.dataset.ready") == "1")
    assert not form.is_displayed()
    wait.until(lambda d: "/ 16" in _row(d, "tiny_lm"))  # live stats with the key
    assert _js(driver, "return document.getElementById('model').value") == "tiny_lm"


async def test_page_asks_for_the_api_key(serve: Any, browser: Any) -> None:
    secret = "sekret-browser-key"
    async with serve(create_app(tiny_lm.build(), api_key=secret)) as server:
        await anyio.to_thread.run_sync(drive_with_key, browser, server.url, secret)
