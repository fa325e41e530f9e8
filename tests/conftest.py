"""Shared fixtures: every async test runs on asyncio and on trio (anyio's plugin).

Under ``CI=true`` a test skipped because something ``make test`` installs is missing (a
Python package of an extra, a Debian package from ``.ci/apt-packages.txt``) fails
instead: skip reasons that start with ``missing:``, ``pytest.importorskip`` skips and
"not installed" skips. Skips for hardware this machine lacks (a CUDA GPU) stay skips.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest

pytest_plugins = ["dataflow.testing_plugin"]

# How the skip reasons of missing software read (importorskip: "could not import 'x'").
MISSING = ("missing:", "could not import", "not installed", "optional extra", "needs the")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing_software(report: Any) -> str | None:
    """The skip reason of ``report`` if it is a skip for missing software, else None."""
    if not report.skipped or not isinstance(report.longrepr, tuple):
        return None
    reason = str(report.longrepr[2]).removeprefix("Skipped: ")
    return reason if any(m in reason.lower() for m in MISSING) else None


def _fail_missing(report: Any) -> None:
    reason = missing_software(report)
    if reason is not None and _in_ci():
        report.outcome = "failed"
        report.longrepr = (
            f"skipped under CI=true for missing software that `make test` installs: {reason}"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome: Any = yield
    _fail_missing(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    outcome: Any = yield
    _fail_missing(outcome.get_result())


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def no_thread_leak() -> Iterator[None]:
    """Fails the test if it leaves a thread running that it did not find."""
    before = threading.active_count()
    yield
    assert threading.active_count() == before, [t.name for t in threading.enumerate()]
