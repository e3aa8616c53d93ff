"""One agent session per host for a whole command: the agent is started once (bootstrapped if the
host lacks it), then serves phase after phase over its stdin/stdout as JSON lines."""

from __future__ import annotations

import json
import queue
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from shiplane.agent.protocol import ErrorObject, Event, Hello, decode
from shiplane.agent_bundle import agent_zip, bootstrap_argv
from shiplane.errors import OperationError
from shiplane.transport.base import Transport

EventHandler = Callable[[Event], None]  # an op's events as they come (never "alive")


class HostError(OperationError):
    """A phase failed on one host; ``kind`` says how (connect, timeout, health, hook, lock, ...)."""

    def __init__(
        self, host: str, message: str, kind: str = "error", data: ErrorObject | None = None
    ) -> None:
        super().__init__(f"{host}: {message}")
        self.host = host
        self.kind = kind
        self.reason = message
        self.data: ErrorObject = data or {}


_EOF = object()
_LOOK = 0.1  # seconds between looks at ``stopping`` while an answer is awaited
# ops that end early on a cancel line (agent/hooks.py reads it while a hook runs, agent/lock.py
# while it waits for a held lock)
CANCELLABLE = frozenset({"hook", "lock"})


class AgentSession:
    """A live agent on one host. ``call`` is one round trip: a request, its events, its result."""

    def __init__(
        self,
        transport: Transport,
        root: str,
        python: str,
        *,
        connect_timeout: float = 30,
        early: subprocess.Popen[bytes] | None = None,
        stopping: threading.Event | None = None,
    ) -> None:
        """``early``: the agent the CLI started for this session before the deploy file was
        read (transport/prewarm.py), waiting for its ``go``. ``stopping``: once set (Ctrl-C),
        a session still connecting gives up at once rather than at ``connect_timeout``."""
        self.transport = transport
        self.host = transport.host
        self.root = root
        payload, sha = agent_zip()
        try:
            self._process = early or transport.spawn(bootstrap_argv(python, root, sha))
        except OSError as exc:  # the local stage runs the interpreter itself
            raise HostError(
                self.host,
                f"cannot start the agent with the host's Python `{python}`: "
                f"{exc.strerror or exc}; set `python` (app or stage) to an "
                "interpreter this host has",
                "connect",
            ) from None
        self._lines: queue.Queue[object] = queue.Queue()
        self._stderr: list[str] = []
        self._next_id = 0
        self._lock = threading.Lock()  # one call at a time
        self._write_lock = threading.RLock()  # a cancel may be written while a call waits
        self._op: str | None = None  # the op in flight, once its request line is written
        threading.Thread(target=self._read_stdout, daemon=True).start()
        self._stderr_reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_reader.start()
        try:
            if early is not None:
                try:
                    self._write(b"go\n")
                except HostError as exc:  # it died since it was started: a failed connect
                    raise HostError(self.host, exc.reason, "connect") from None
            first = self._next_line(connect_timeout, "connect", stopping)
            if first == {"need": True}:
                self._write(f"{len(payload)}\n".encode() + payload)
                first = self._next_line(connect_timeout, "connect", stopping)
            if not isinstance(first, dict) or "hello" not in first:
                raise HostError(
                    self.host, f"unexpected greeting from the agent: {str(first)[:200]}", "protocol"
                )
        except BaseException:
            # nobody will hold this session: end its process and its connection (control master) now
            self.kill()
            transport.close()
            raise
        self.hello: Hello = first["hello"]

    def _read_stdout(self) -> None:
        assert self._process.stdout is not None
        for raw in self._process.stdout:
            if raw == b"NEED\n":
                self._lines.put({"need": True})
                continue
            try:
                self._lines.put(json.loads(raw))
            except ValueError:
                self._stderr.append(raw.decode(errors="replace"))
        self._lines.put(_EOF)

    def _read_stderr(self) -> None:
        assert self._process.stderr is not None
        for raw in self._process.stderr:
            self._stderr.append(raw.decode(errors="replace"))
            del self._stderr[:-50]

    def _died(self, what: str) -> HostError:
        try:
            code = self._process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            code = None
        # its last words (ssh's "Host key verification failed.") may still be in the pipe
        self._stderr_reader.join(timeout=2)
        reason = self.transport.explain_failure(code, "".join(self._stderr))
        return HostError(self.host, reason, "connect" if what == "connect" else "lost")

    def _next_line(self, timeout: float, what: str, stopping: threading.Event | None = None) -> Any:
        deadline = time.monotonic() + timeout
        look = timeout if stopping is None else _LOOK  # one wait, unless something may stop it
        while True:
            try:
                item = self._lines.get(timeout=max(0.0, min(deadline - time.monotonic(), look)))
                break
            except queue.Empty:
                if stopping is not None and stopping.is_set():
                    self.kill()
                    raise HostError(self.host, f"interrupted during {what}", what) from None
                if time.monotonic() >= deadline:
                    self.kill()
                    raise HostError(
                        self.host, f"no answer within {timeout:.0f} s during {what}", "timeout"
                    ) from None
        if item is _EOF:
            raise self._died(what)
        return item

    def _write(self, data: bytes) -> None:
        assert self._process.stdin is not None
        try:
            with self._write_lock:
                self._process.stdin.write(data)
                self._process.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._died("write") from None

    def cancel(self) -> None:
        """Ask the op in flight to end now, when it can (a hook: its process group is killed and
        the op fails kind ``interrupted``); any other op finishes as it would have. Called from
        another thread than the one waiting in ``call``."""
        with self._write_lock:  # after the request line of the op in flight, never before it
            if self._op in CANCELLABLE:
                try:
                    self._write(b'{"cancel":true}\n')
                except HostError:
                    pass  # the agent is gone already: the call ends on its own

    def call(
        self,
        op: str,
        args: Mapping[str, object] | None = None,
        *,
        payload: Iterable[bytes] = (),
        on_event: EventHandler | None = None,
        timeout: float = 600,
    ) -> dict[str, Any]:
        """Send one request (and its binary payload), stream its events, return its result.

        ``timeout`` bounds the wait for each next line, so a host that stops answering becomes a
        HostError within it, never a hang.
        """
        decode(
            op, args or {}
        )  # the agent checks the same contract: a misspelt key is a bug, caught here
        with self._lock:
            self._next_id += 1
            request_id = self._next_id
            # the request line and the op in flight change together: an interrupt that lands just
            # after the line went out still cancels the op (no cancellable op has a payload)
            with self._write_lock:
                self._write(
                    (json.dumps({"id": request_id, "op": op, "args": args or {}}) + "\n").encode()
                )
                self._op = op
            for chunk in payload:
                self._write(chunk)
            try:
                return self._answer(op, request_id, timeout, on_event)
            finally:
                self._op = None

    def _answer(
        self, op: str, request_id: int, timeout: float, on_event: EventHandler | None
    ) -> dict[str, Any]:
        """The events, then the result, of request ``request_id``."""
        while True:
            message = self._next_line(timeout, op)
            if message.get("id") != request_id:
                continue
            if "event" in message:
                # "alive" only resets the silence timer: the host is busy, not gone
                if on_event is not None and message["event"].get("status") != "alive":
                    on_event(message["event"])
                continue
            if message.get("ok"):
                return dict(message.get("result") or {})
            error: ErrorObject = message.get("error") or ErrorObject()
            raise HostError(
                self.host,
                str(error.get("message", "failed")),
                str(error.get("kind", "error")),
                error,
            )

    def close(self) -> None:
        """End the session: EOF on the agent's stdin, then wait briefly for it to exit."""
        if self._process.poll() is None:
            try:
                assert self._process.stdin is not None
                self._process.stdin.close()
            except OSError:
                pass
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            deadline = time.monotonic() + 5
            while self._process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
