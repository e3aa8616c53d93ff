"""Helpers of the local benchmark: timed commands, bounded polling, processes we started, stats.

Nothing here knows about shiplane's internals: the bench drives the product only through its
command line (``python -m shiplane ... --json``), as a user or a CI job would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

POLL_INTERVAL = 0.01  # a tight poll, so the floor (e) is not inflated by the poller


def close_masters(folder: Path) -> None:
    """Close the ssh control masters whose sockets are in ``folder`` (``ssh -O exit``)."""
    for sock in sorted(folder.iterdir()) if folder.is_dir() else []:
        subprocess.run(
            ["ssh", "-F", "/dev/null", "-o", f"ControlPath={sock}", "-O", "exit", "x"],
            capture_output=True,
            timeout=10,
            check=False,
        )


def close_shiplane_connections() -> None:
    """Close the SSH connections shiplane keeps open for its next command (``ssh_persist``, in
    the user's dir that docs/DESIGN.md names): the next command starts without one, as the
    first command of the day does."""
    close_masters(Path(tempfile.gettempdir()) / f"shiplane-ssh-{os.getuid()}")
    stop_command_servers()


def _command_servers() -> list[int]:
    """The pids of shiplane's command servers (src/shiplane/cliserver.py) running now."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"shiplane.cliserver" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def command_servers_cpu() -> float:
    """CPU seconds of the command servers and the forks they reaped (each command they ran)."""
    ticks = 0
    for pid in _command_servers():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        ticks += sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def stop_command_servers() -> None:
    """End shiplane's command servers: the next command starts without one."""
    for pid in _command_servers():
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


class BenchError(RuntimeError):
    """A step of the bench failed: the message says which command and shows its output."""


@dataclass
class Timed:
    """A finished command: its wall-clock seconds, exit code and output."""

    seconds: float
    returncode: int
    stdout: str
    stderr: str
    started_at: float  # time.time() just before the start, to compare with event timestamps


def run(
    cmd: Sequence[str],
    cwd: Path,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 600.0,
    check: bool = True,
) -> Timed:
    """Run ``cmd`` to completion and time it (wall clock, ``perf_counter``)."""
    started_at = time.time()
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            list(cmd),
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"timed out after {timeout:g}s: {' '.join(cmd)}") from exc
    seconds = time.perf_counter() - t0
    if check and proc.returncode != 0:
        raise BenchError(
            f"exit {proc.returncode}: {' '.join(cmd)} (in {cwd})\n"
            f"--- stdout (tail)\n{proc.stdout[-3000:]}\n"
            f"--- stderr (tail)\n{proc.stderr[-3000:]}"
        )
    return Timed(seconds, proc.returncode, proc.stdout, proc.stderr, started_at)


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every JSON object line of a ``--json`` output (events, then the ``result``)."""
    out: list[dict[str, Any]] = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
    return out


def result_of(events: list[dict[str, Any]]) -> dict[str, Any]:
    """The final ``{"result": ...}`` object of a ``--json`` run."""
    for obj in reversed(events):
        result = obj.get("result")
        if isinstance(result, dict):
            return result
    raise BenchError("no result object in the --json output")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    """``(status, body)`` of a GET; connection errors raise ``OSError``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def wait_http_200(url: str, deadline: float, alive: Any = None) -> float:
    """Poll ``url`` until it answers 200 or ``deadline`` (a ``perf_counter`` value) passes.

    Returns the ``perf_counter`` time of the first 200. ``alive()`` (optional) returns False
    when the server died, which fails fast instead of waiting out the deadline.
    """
    last = "no attempt"
    while True:
        try:
            status, _ = http_get(url, timeout=1.0)
            if status == 200:
                return time.perf_counter()
            last = f"status {status}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        if alive is not None and not alive():
            raise BenchError(f"{url}: the server exited before answering 200 ({last})")
        if time.perf_counter() >= deadline:
            raise BenchError(f"{url} did not answer 200 before the deadline ({last})")
        time.sleep(POLL_INTERVAL)  # bounded poll interval, not synchronisation


@dataclass
class Started:
    """Processes this bench started itself (by pid), so they can always be stopped."""

    pids: set[int] = field(default_factory=set)

    def spawn(
        self, cmd: Sequence[str], cwd: Path, log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``cmd`` detached in its own session (its pid is its process group id)."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                list(cmd),
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pids.add(proc.pid)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
        """TERM the process (gunicorn: graceful), wait for it with a deadline, then KILL its group."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                # Our own session: its group id is the pid we started, never anyone else's.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
        self.pids.discard(proc.pid)

    def stop_all(self) -> None:
        """Last-resort cleanup: every pid still recorded gets TERM then KILL on its group."""
        for pid in list(self.pids):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(pid, sig)
                except (ProcessLookupError, PermissionError):
                    break
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and _exists(pid):
                    time.sleep(0.05)  # bounded wait for the exit
                if not _exists(pid):
                    break
            self.pids.discard(pid)


def _exists(pid: int) -> bool:
    """True while ``pid`` is a live (non-zombie) child or process of ours."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@dataclass
class Series:
    """Repeated measurements of one thing, in seconds."""

    name: str
    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    @property
    def low(self) -> float:
        return min(self.values) if self.values else float("nan")

    @property
    def high(self) -> float:
        return max(self.values) if self.values else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n": len(self.values),
            "median": self.median,
            "min": self.low,
            "max": self.high,
            "values": self.values,
        }


def clean_up(cleanups: Sequence[Any], work: Path, keep: bool, say: Any) -> None:
    """Run every cleanup (a failing one does not stop the others), then drop the temp dir."""
    for cleanup in cleanups:
        if cleanup is None:
            continue
        try:
            cleanup()
        except Exception as exc:  # noqa: BLE001 - keep cleaning up whatever else runs
            print(f"cleanup: {exc}", file=sys.stderr)
    if keep:
        say(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
