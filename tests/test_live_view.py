"""The live view of a deploy on a terminal: the controller's steps (gate, build) as rows with their
time, then a row per host with its current step, never wider than the terminal; the summary after
it folded to the terminal's width. The slow tests run `shiplane deploy` inside a real pty of 80
columns and read it through a terminal emulator (pyte), as a person would see it."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pyte
import pytest

from deployhelp import Project, scaffold
from shiplane.events import Event
from shiplane.ui import Board, fit_lines

COLUMNS, ROWS = 80, 24
# the emulator is wider than the pty: a line drawn past column 80 shows there instead of wrapping
SCREEN_COLUMNS = 160
ROW = re.compile(r"[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏✓✗·-] [\w.-]+ ")
HOST_STEP = re.compile(r"^\S local +(lock|copy|install|release|switch|done) ")


def deploy_stream(hosts: list[str], at: float = 1000.0) -> Iterator[Event]:
    """Events as a deploy emits them (see a --json deploy): gate, build, then each host's steps."""
    yield Event("gate", "start", at=at)
    yield Event("gate", "output", detail="8 passed in 2.79s", at=at + 4)
    yield Event("gate", "ok", seconds=4.5, at=at + 4.5)
    yield Event("build", "start", at=at + 4.5)
    yield Event("build", "progress", detail="wheelhouse: 12 wheels", at=at + 4.6)
    yield Event("build", "ok", detail="artifact 8c254f56b2b0", seconds=0.2, at=at + 4.7)
    for host in hosts:
        yield Event("lock", "start", host=host, at=at + 5)
        yield Event("lock", "ok", host=host, seconds=0.1, at=at + 5.1)
        yield Event("copy", "start", host=host, at=at + 5.1)
        yield Event(
            "receive", "progress", host=host, bytes=6 << 20, data={"total": 12 << 20}, at=at + 5.2
        )


def test_rows_show_the_steps_and_fit_any_width() -> None:
    board = Board()
    long_host = "a-very-long-host-name-in-a-big-datacenter.example.com"
    for event in deploy_stream(["web-1", long_host]):
        board.feed(event)
    board.feed(Event("copy", "ok", host="web-1", seconds=0.9, at=1006))
    board.feed(Event("install", "start", host="web-1", at=1006))
    board.feed(
        Event(
            "venv",
            "building",
            host="web-1",
            detail="12 wheels with uv \x1b[31m" + "x" * 200,
            at=1006.5,
        )
    )
    rows = board.rows(80, now=1007.25)
    texts = [row.plain for row in rows]
    assert re.match(r"✓ gate +4\.5s  8 passed in 2\.79s$", texts[0])
    assert re.match(r"✓ build +0\.2s  artifact 8c254f56b2b0$", texts[1])
    # a running host step: a spinner, the step, its elapsed time, its latest detail (no escape)
    assert re.match(
        r"[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏] web-1 +install +1\.2s  venv building: 12 wheels with uv x*…$", texts[3]
    )
    assert "\x1b" not in texts[3]
    assert re.search(
        r"^[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏] a-very-long-host-na… +copy +2\.\ds  █{8}░{8} 6\.0 MiB/12\.0 MiB$", texts[2]
    )
    for width in (80, 60, 40, 20):
        assert all(len(row.plain) <= width for row in board.rows(width, now=1007.25)), width
    board.close(1008)
    done = board.rows(80, now=2000)
    assert re.match(
        r"- web-1 +install +2\.0s  venv building", done[3].plain
    )  # stopped where it was


def test_many_hosts_fold_into_counts_per_step() -> None:
    board = Board()
    hosts = [f"web-{n:02d}" for n in range(12)]
    for event in deploy_stream(hosts):
        board.feed(event)
    for n, host in enumerate(hosts):
        board.feed(Event("copy", "ok", host=host, seconds=0.5, at=1006))
        board.feed(Event("install", "start", host=host, at=1006))
        if n < 8:
            board.feed(Event("install", "ok", host=host, seconds=1, at=1007))
            board.feed(Event("switch", "start", host=host, at=1007))
        elif n < 10:
            board.feed(
                Event("install", "failed", host=host, detail="uv: no wheel for x\nmore", at=1007)
            )
    rows = [row.plain for row in board.rows(80, now=1008)]
    assert len(rows) == 3
    assert re.match(r"[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏] 12 hosts +2\.0s  8 switch, 4 install \(2 failed\)$", rows[2])
    board.close(1009)
    assert re.match(
        r"✗ 12 hosts .* 10 done, 2 install \(2 failed\)$", board.rows(80, now=2000)[2].plain
    )


def test_a_failure_marks_the_step_that_was_running() -> None:
    board = Board()
    board.feed(Event("gate", "start", at=10))
    assert board.feed(
        Event("deploy", "failed", detail="test gate failed: 1 failed", at=13)
    )  # a line, no row
    assert re.match(r"✗ gate +3\.0s", board.rows(80, now=20)[0].plain)


def test_a_step_told_only_by_its_progress_ends_with_the_view() -> None:
    board = Board()  # `shiplane build` reports progress only, never a start or an end
    board.feed(Event("build", "progress", detail="wheelhouse: 12 wheels", at=10))
    board.feed(Event("build", "progress", detail="manifest: 8c254f56b2b0", at=11))
    assert re.match(
        r"[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏] build +1\.0s  manifest: 8c254f56b2b0$", board.rows(80, now=11)[0].plain
    )
    board.close(12)
    assert re.match(r"✓ build +2\.0s  manifest: 8c254f56b2b0$", board.rows(80, now=20)[0].plain)


def test_summary_lines_fold_to_the_terminal_width() -> None:
    line = (
        "  local                    ok         release 20261204T183516227Z-8c254f56  sent 12.5 MiB  "
        "[connect 0.21s, lock 0.01s, copy 0.08s, install 0.61s, release 0.82s, switch 0.39s]"
    )
    folded = fit_lines(["short", line, "a\nb"], 80)
    assert folded[0] == "short" and folded[-2:] == ["a", "b"]
    assert all(len(part) <= 80 for part in folded)
    assert " ".join(" ".join(folded[1:-2]).split()) == " ".join(line.split())  # nothing lost
    assert folded[2].startswith("      ")  # the rest indented below its start


# -- in a real terminal --------------------------------------------------------------------------


@dataclass
class Terminal:
    """What the terminal showed: ``snapshots`` after each read, ``final`` at the end."""

    code: int
    snapshots: list[list[str]]
    final: list[str]


def run_in_terminal(project: Project, *args: str, deadline: float = 240) -> Terminal:
    """``shiplane *args`` with stdin, stdout and stderr on a pty of 80x24, read until it exits."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
    unset = ("NO_COLOR", "FORCE_COLOR", "COLUMNS", "LINES", "TTY_COMPATIBLE", "TTY_INTERACTIVE")
    env = {k: v for k, v in os.environ.items() if k not in unset} | {"TERM": "xterm-256color"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "shiplane", *args],
        cwd=project.root,
        env=env,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    screen = pyte.Screen(SCREEN_COLUMNS, ROWS)
    stream = pyte.ByteStream(screen)
    snapshots: list[list[str]] = []
    end = time.monotonic() + deadline
    try:
        while time.monotonic() < end:
            ready, _, _ = select.select([master], [], [], 1)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its side of the pty
                break
            if not data:
                break
            stream.feed(data)
            snapshots.append([line.rstrip() for line in screen.display])
        else:
            raise AssertionError(
                f"shiplane {' '.join(args)} still running after {deadline}s:\n"
                + "\n".join(screen.display)
            )
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return Terminal(code, snapshots, [line.rstrip() for line in screen.display])


def first(snapshots: list[list[str]], pattern: re.Pattern[str]) -> int:
    """The index of the first snapshot with a line matching ``pattern``."""
    return next(i for i, shot in enumerate(snapshots) if any(pattern.search(line) for line in shot))


def controller_rows_before_hosts(term: Terminal, *steps: str) -> list[str]:
    """The screen when the first host step showed: each of ``steps`` is above it, done, with its
    time (the gate with its test count, the build with its artifact)."""
    shown = term.snapshots[first(term.snapshots, HOST_STEP)]
    text = {"gate": r"\d+ passed", "build": r"artifact [0-9a-f]{12}"}
    rows = [
        next(
            (
                i
                for i, line in enumerate(shown)
                if re.match(rf"✓ {step} +\d+\.\ds  {text[step]}", line)
            ),
            None,
        )
        for step in steps
    ]
    host = next(i for i, line in enumerate(shown) if HOST_STEP.search(line))
    assert None not in rows and rows == sorted(rows) and rows[-1] < host, "\n".join(shown)  # type: ignore[operator]
    return shown


def assert_fits(term: Terminal) -> None:
    """No line past the terminal's width, and no row of the view wrapped onto a second line:
    above the summary, every line is a row (an icon, then the step or host)."""
    wide = [line for shot in [*term.snapshots, term.final] for line in shot if len(line) > COLUMNS]
    assert not wide, f"lines wider than {COLUMNS} columns:\n" + "\n".join(wide[:5])
    for shot in term.snapshots:
        view = [line for line in shot if line][
            : next((i for i, line in enumerate(shot) if line.startswith("deployed ")), None)
        ]
        assert all(ROW.match(line) for line in view), "\n".join(shot)


def assert_summary(term: Terminal, project: Project) -> None:
    screen = "\n".join(term.final)
    assert term.code == 0, screen
    assert re.search(
        r"^deployed demo release \d{8}T\d{9}Z-[0-9a-f]{8} \(artifact", screen, re.MULTILINE
    ), screen
    assert f"serving at http://127.0.0.1:{project.port}/" in screen
    # the list of steps stays above the summary: the host's outcome and its steps
    assert re.search(
        r"^✓ local +done +\d+\.\ds  connect, lock, copy, install, release, switch$",
        screen,
        re.MULTILINE,
    ), screen


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    project = scaffold(tmp_path_factory.mktemp("live"))
    try:
        yield project
    finally:
        project.stop()


@pytest.mark.slow
def test_deploy_on_a_terminal_shows_build_then_host_steps(app: Project) -> None:
    term = run_in_terminal(app, "deploy", "--stage", "local", "--skip-tests")
    assert_fits(term)
    assert_summary(term, app)
    shown = controller_rows_before_hosts(term, "build")
    assert not any(" gate " in line for line in shown)  # the gate was skipped


@pytest.mark.slow
def test_deploy_on_a_terminal_shows_the_gate_running(app: Project) -> None:
    term = run_in_terminal(app, "deploy", "--stage", "local")
    assert_fits(term)
    assert_summary(term, app)
    before_hosts = term.snapshots[: first(term.snapshots, HOST_STEP)]
    # the gate runs with a spinner and a clock that moves, before any host step
    running = {
        m.group(1)
        for shot in before_hosts
        for line in shot
        if (m := re.match(r"[⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏] gate +(\d+\.\d)s", line))
    }
    assert len(running) >= 2, running
    controller_rows_before_hosts(term, "gate", "build")
