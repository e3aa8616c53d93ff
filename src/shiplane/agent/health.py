"""Health and smoke checks of a candidate web server, over its own unix socket.

The candidate is checked on ``run/web-<id>.sock`` before it takes traffic, so a failing release
is never reachable through the front. Errors carry what a human needs to fix it: the last status,
the head of the body and the last lines of the web log.
"""

from __future__ import annotations

import http.client
import re
import socket
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

from .errors import AgentError
from .protocol import Emit, SmokeSpec

BODY_HEAD = 300
LOG_TAIL_LINES = 20


class Healthy(TypedDict):
    """How a server passed its health check: the status, after how long, in how many GETs."""

    status: int
    seconds: float
    attempts: int


class SmokePassed(TypedDict):
    path: str
    status: int


class UnixHTTPConnection(http.client.HTTPConnection):
    """An ``http.client`` connection to a unix socket (``Host: localhost``)."""

    def __init__(self, sock_path: str, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.sock_path = sock_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.sock_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def http_get_unix(
    sock_path: str | Path, path: str, timeout: float, host: str = "localhost"
) -> tuple[int, dict[str, str], bytes]:
    """GET ``path`` from the HTTP server on ``sock_path``; returns (status, headers, body).

    Connection errors (missing socket, refused, timeout) propagate as ``OSError``.
    """
    conn = UnixHTTPConnection(str(sock_path), timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host, "Connection": "close"})
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body
    finally:
        conn.close()


def tail_lines(path: str | Path, lines: int = LOG_TAIL_LINES, since: int = 0) -> list[str]:
    """The last ``lines`` lines of a text file (empty when it does not exist), written after
    byte ``since`` (a file shorter than that was rotated: then all of it)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            # Reading the last 64 KiB is enough for 20 log lines and bounded on a huge log.
            fh.seek(max(since if since <= size else 0, size - 65536))
            data = fh.read()
    except OSError:
        return []
    keep: deque[str] = deque(data.decode("utf-8", "replace").splitlines(), maxlen=lines)
    return list(keep)


def _body_head(body: bytes) -> str:
    return body[:BODY_HEAD].decode("utf-8", "replace")


def _with_log(message: str, log_path: str | Path | None, since: int = 0) -> str:
    if log_path is None:
        return message
    recent = tail_lines(log_path, 400, since)  # this server's lines: written since it started
    if not recent:
        return message + f"\n(no output in {log_path})"
    # the app's own error first: with several workers, their tracebacks interleave in the tail
    errors = [line for line in recent if _EXCEPTION.match(line)]
    cause = f"\nthe server's log says: {errors[-1].strip()}" if errors else ""
    return (
        message
        + cause
        + f"\nlast lines of {log_path} (each once):\n"
        + "\n".join(distinct_lines(recent))
    )


# a log line's own stamp: "[2026-12-04 10:00:00 +0000] [1234] " (gunicorn), "2026-12-04T10:00:00 "
_STAMP = re.compile(
    r"^(\[[0-9T:., +-]+\]\s*|[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9:.,]+\S*\s*)(\[\d+\]\s*)?"
)


def distinct_lines(lines: list[str], keep: int = LOG_TAIL_LINES) -> list[str]:
    """The last ``keep`` distinct lines, each once, in the order they last appeared, with
    ``(xN)`` when a line came N times: a server failing every health poll writes the same
    warning (or traceback) each time, and one copy says it all. Lines differing only in their
    time stamp and pid are the same line."""
    counts: dict[str, int] = {}
    last: dict[str, tuple[int, str]] = {}
    for index, line in enumerate(lines):
        key = _STAMP.sub("", line).rstrip()
        counts[key] = counts.get(key, 0) + 1
        last[key] = (index, line)
    newest = sorted(last.items(), key=lambda item: item[1][0])[-keep:]
    return [line + (f"  (x{counts[key]})" if counts[key] > 1 else "") for key, (_, line) in newest]


_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b.*:")


def wait_healthy(
    sock: str | Path,
    path: str | None,
    timeout: float,
    log_path: str | Path | None,
    emit: Emit,
    alive: Callable[[], str | None] | None = None,
    host: str = "localhost",
    log_since: int = 0,
) -> Healthy:
    """Poll ``GET path`` on ``sock`` until it answers 2xx; raise ``AgentError(kind="health")``.

    With ``path`` None (no health check configured) any answer below 500 counts as healthy: the
    server is up and serving. ``alive`` is asked between attempts and returns a reason when the
    server process has died for good (so a crashing release fails fast instead of waiting out
    the timeout). Returns ``{status, seconds, attempts}``.
    """
    started = time.monotonic()
    deadline = started + max(timeout, 0.1)
    check_path = path or "/"
    # A refused connect on a unix socket costs microseconds: poll often while a server boots
    # (every poll of slack is added to the switch), back off only for slow ones. The manager is
    # asked whether the server died at most every quarter second.
    delay, asked = 0.02, started
    attempts = 0
    last = "no attempt made"
    emit({"phase": "switch", "status": "health", "detail": f"GET {check_path} on {sock}"})
    while True:
        attempts += 1
        remaining = deadline - time.monotonic()
        try:
            status, _headers, body = http_get_unix(
                sock, check_path, max(0.5, min(remaining, 10.0)), host
            )
        except (OSError, http.client.HTTPException) as exc:
            last = f"cannot connect: {exc.__class__.__name__}: {exc}"
        else:
            ok = 200 <= status < 300 if path else status < 500
            if ok:
                seconds = round(time.monotonic() - started, 3)
                emit(
                    {
                        "phase": "switch",
                        "status": "healthy",
                        "detail": f"GET {check_path} -> {status} after {seconds}s",
                    }
                )
                return {"status": status, "seconds": seconds, "attempts": attempts}
            last = f"last status {status}, body: {_body_head(body)!r}"
        dead = None
        if alive is not None and time.monotonic() - asked >= 0.25:
            dead, asked = alive(), time.monotonic()
        if dead:
            # its log says why; that nothing answered on its socket is only the consequence
            answered = "" if last.startswith("cannot connect") else f"; {last}"
            raise AgentError(
                _with_log(
                    f"health check failed: the server is not running ({dead}){answered}",
                    log_path,
                    log_since,
                ),
                kind="health",
            )
        if time.monotonic() + delay >= deadline:
            raise AgentError(
                _with_log(
                    f"health check GET {check_path} did not answer 2xx within {timeout:g}s: {last}",
                    log_path,
                    log_since,
                ),
                kind="health",
            )
        time.sleep(delay)  # polling backoff between attempts, bounded by the deadline
        if time.monotonic() - started > 2:
            delay = min(delay * 1.5, 0.25)


def run_smoke(
    sock: str | Path,
    checks: list[SmokeSpec] | None,
    timeout: float = 10.0,
    log_path: str | Path | None = None,
    host: str = "localhost",
    log_since: int = 0,
) -> list[SmokePassed]:
    """Run each smoke check ``{path, expect?, status=200}`` once against ``sock``.

    The first failing check raises ``AgentError(kind="smoke")`` naming the check, the status and
    the head of the body. Returns one ``{path, status}`` per passed check.
    """
    passed: list[SmokePassed] = []
    for check in checks or []:
        path = str(check.get("path") or "/")
        want_status = int(check.get("status") or 200)
        expect = check.get("expect")
        name = (
            f"GET {path}"
            + (f" expecting {expect!r}" if expect else "")
            + f" (status {want_status})"
        )
        try:
            status, _headers, body = http_get_unix(sock, path, timeout, host)
        except (OSError, http.client.HTTPException) as exc:
            raise AgentError(
                _with_log(f"smoke check {name} failed: cannot connect: {exc}", log_path, log_since),
                kind="smoke",
            ) from None
        text = body.decode("utf-8", "replace")
        if status != want_status or (expect and str(expect) not in text):
            problem = (
                f"got status {status}"
                if status != want_status
                else f"the body does not contain {expect!r}"
            )
            raise AgentError(
                _with_log(
                    f"smoke check {name} failed: {problem}; body starts: {_body_head(body)!r}",
                    log_path,
                    log_since,
                ),
                kind="smoke",
            )
        passed.append({"path": path, "status": status})
    return passed
