"""Headless Debian Chromium driven by selenium through Debian's chromium-driver.

The browser never leaves loopback: its proxy is a closed loopback port (only loopback
bypasses it) and its background services are off. Selenium is given the driver's path,
so it never downloads one. Without the browser the tests skip with a reason starting
``missing:`` (under ``CI=true`` such skips are errors).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.serve.conftest import running

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--metrics-recording-only",
    "--window-size=1280,900",
    # Off the network: every non-loopback request goes to a closed loopback port.
    # (Chromium bypasses proxies for loopback implicitly; "<-loopback>" would remove
    # that bypass and send the test's own server through the dead proxy too.)
    "--proxy-server=127.0.0.1:9",
    "--proxy-bypass-list=127.0.0.1;localhost;[::1]",
]


def _missing() -> str | None:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (path.exists() and os.access(path, os.X_OK)):
            return f"missing: {path} (Debian package {package!r}; run `make system`)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "missing: the selenium package (pip install -e '.[dev]')"
    return None


@pytest.fixture
def serve() -> Any:
    """A real uvicorn server on a loopback port (tests/serve/conftest.py)."""
    return running


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """A fresh headless Chromium (its own profile directory), closed after the test."""
    missing = _missing()
    if missing is not None:
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    options.add_argument(f"--user-data-dir={profile}")
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "driver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
