"""Every verb behaves as its help says: options where people type them, refusals of options that
mean nothing to a verb. Fast: nothing is deployed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def shiplane(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shiplane", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_verbose_is_accepted_after_the_verb(tmp_path: Path) -> None:
    assert shiplane(tmp_path, "init", "app").returncode == 0
    for args in (("-v", "check"), ("check", "-v"), ("check", "--verbose", "--json")):
        done = shiplane(tmp_path / "app", *args)
        assert done.returncode == 0, (args, done.stderr)


def test_promote_refuses_options_that_mean_nothing_to_it(tmp_path: Path) -> None:
    for option in (("--skip-tests",), ("--artifact", "abc")):
        done = shiplane(tmp_path, "promote", "--from", "staging", "--to", "prod", *option)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert (
        "drop --skip-tests"
        in shiplane(tmp_path, "promote", "--from", "a", "--to", "b", "--skip-tests").stderr
    )


def test_stop_help_says_what_it_stops(tmp_path: Path) -> None:
    assert "the front, web and workers" in shiplane(tmp_path, "stop", "--help").stdout
