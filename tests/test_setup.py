"""The set-up a fresh machine runs: `make test` installs every extra the tests use, shows
its progress, and `make system` stays quiet when the Debian packages are there."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

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
