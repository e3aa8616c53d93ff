"""The empty venv ``inventory`` starts making while the blobs arrive belongs to the agent session
that started it (issue 17: no module-global thread hand-off): its ``install`` waits for it, and
another session never waits for, nor sees, that job."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from shiplane.agent import venvs
from shiplane.agent.paths import Layout

DIGEST = "ab" * 32


@pytest.fixture
def slow_uv(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, list[str]]:
    """A uv whose ``venv`` blocks until the gate opens; the venvs it made are listed."""
    gate = threading.Event()
    made: list[str] = []

    def run(argv: list[str], env: dict[str, str]) -> None:
        gate.wait(5)
        Path(argv[-1]).mkdir(parents=True)
        made.append(argv[-1])

    monkeypatch.setattr(venvs, "find_uv", lambda layout=None: "/nonexistent/uv")
    monkeypatch.setattr(venvs, "_run", run)
    return gate, made


def test_a_session_waits_for_its_own_shell_only(
    tmp_path: Path, slow_uv: tuple[threading.Event, list[str]]
) -> None:
    gate, made = slow_uv
    layout = Layout(str(tmp_path))
    ours, theirs = venvs.VenvShells(), venvs.VenvShells()
    ours.start(layout, DIGEST, sys.executable)
    ours.start(layout, DIGEST, sys.executable)  # the same venv is started once

    started = time.monotonic()
    theirs.wait(DIGEST)  # another session has no job for this digest: no wait
    assert time.monotonic() - started < 2
    assert made == []

    gate.set()
    ours.wait(DIGEST)
    assert made == [str(layout.venv(DIGEST))]
    shell = layout.venv(DIGEST) / venvs.SHELL_MARK
    assert shell.read_text(encoding="utf-8").strip() == sys.executable
    ours.wait(DIGEST)  # taken: a second wait returns at once


def test_nothing_starts_for_a_bad_hint(
    tmp_path: Path, slow_uv: tuple[threading.Event, list[str]]
) -> None:
    gate, made = slow_uv
    gate.set()
    layout = Layout(str(tmp_path))
    shells = venvs.VenvShells()
    shells.start(layout, "../escape", sys.executable)
    shells.start(layout, DIGEST, None)
    shells.wait(DIGEST)
    assert made == []
