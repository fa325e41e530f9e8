"""The set-up a fresh machine runs: `make test` installs every extra the tests use, shows
its progress, and `make system` stays quiet when the Debian packages are there."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAKEFILE = (ROOT / "Makefile").read_text()


def test_make_test_installs_every_extra() -> None:
    extras = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    )
    match = re.search(r"^EXTRAS \?= (\S+)$", MAKEFILE, re.M)
    assert match, "the Makefile names the extras make test installs"
    assert extras <= set(match.group(1).split(",")), extras - set(match.group(1).split(","))


def test_installs_are_not_silent() -> None:
    installs = [line for line in MAKEFILE.splitlines() if "pip" in line and "install" in line]
    assert installs
    for line in installs:
        assert " -q" not in line and "--quiet" not in line, line


def test_make_system_is_quiet_when_everything_is_installed() -> None:
    wanted = [
        line.strip()
        for line in (ROOT / ".ci" / "apt-packages.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert "graphviz" in wanted
    if shutil.which("dpkg-query") is None:
        return  # not Debian: nothing to check here
    missing = [
        pkg
        for pkg in wanted
        if "install ok installed"
        not in subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True, check=False
        ).stdout
    ]
    if missing:
        return  # the CI=true run installs them first (make pytest depends on make system)
    done = subprocess.run(
        ["bash", ".ci/install-system"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


class _Report:
    def __init__(self, reason: str) -> None:
        self.skipped = True
        self.outcome = "skipped"
        self.longrepr: object = ("t.py", 1, f"Skipped: {reason}")


def test_skips_for_missing_software_fail_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import _fail_missing

    monkeypatch.setenv("CI", "true")
    for reason in (
        "could not import 'ray': No module named 'ray'",
        "missing: /usr/bin/chromium (Debian package 'chromium'; run `make system`)",
        "Graphviz 'dot' is not installed",
        "Ray placement needs the ray extra",
    ):
        report = _Report(reason)
        _fail_missing(report)
        assert report.outcome == "failed", reason
        assert "make test" in str(report.longrepr)
    hardware = _Report("needs a CUDA GPU")
    _fail_missing(hardware)
    assert hardware.outcome == "skipped"
    monkeypatch.setenv("CI", "")
    local = _Report("missing: graphviz")
    _fail_missing(local)
    assert local.outcome == "skipped"
