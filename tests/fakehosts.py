"""Fake hosts for fast tests of the fleet logic: httpx's ``MockTransport``, for shiplane's agent.

``FakeHosts(["h1", "h2"])`` is a ``transports`` factory for ``Fleet`` (and so for ``run_deploy``,
``run_rollback`` and ``run_promote``). Each host's ``spawn`` returns a Popen-like object whose
pipes speak the agent protocol (docs/DESIGN.md, "Agent protocol") to a thread of this process,
so the controller's ``AgentSession`` runs unchanged: hello, then one JSON request per line, events
and one answer per request, a ``receive``'s blob bytes right after its request line, a cancel
line while a hook or a lock wait runs.

Each request is checked as the real agent checks it (``shiplane.agent.protocol.decode``: its
defaults filled in), then answered by a handler ``(op, args, payload) -> result`` that returns
the op's result or raises ``FakeError(kind, message)``. The defaults keep each host's state in memory as
the real agent keeps it on disk: stored blobs, releases (``release.json`` as dicts, with their
states), ``current``, the ledger and the deploy lock. A test changes one op on one host with
``hosts["h3"].on("switch", handler)`` (a handler may call ``host.default(op, args, payload)``
to go on as usual), or holds it at a ``Gate`` until the test opens it (``host.block(op, gate)``).

Nothing here sleeps or polls: a blocked op waits on its host's condition, woken by a gate that
opens, a lock that is released, or a cancel from the controller.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import platform
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from shiplane.agent import lock as agent_lock
from shiplane.agent import protocol
from shiplane.agent.errors import AgentError
from shiplane.agent.releases import artifact_digest

Handler = Callable[[str, dict[str, Any], bytes], Any]

_pids = itertools.count(40000)
_local = threading.local()  # the request a handler thread is answering


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class FakeError(Exception):
    """An op's failure, answered as ``{"ok": false, "error": {"kind", "message", **data}}``."""

    def __init__(self, kind: str, message: str, **data: Any) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.data = data


class Gate:
    """A point where fake ops wait until the test calls ``open``; ``reached`` is set once an op
    waits there (the test's cue that the deploy got that far)."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.opened = False
        self.late = False  # set by a test whose op stopped waiting at its timeout
        self._mutex = threading.Lock()
        self._hosts: set[FakeHost] = set()

    def open(self) -> None:
        with self._mutex:
            self.opened = True
            hosts = list(self._hosts)
        for host in hosts:
            host.notify()

    def wait(self, host: FakeHost, timeout: float | None = None) -> bool:
        """Called by an op on ``host``: return once open (False after ``timeout``); FakeError
        ``interrupted`` if the controller cancels the op (or goes away) first."""
        with self._mutex:
            self._hosts.add(host)
        self.reached.set()
        return host.wait_until(lambda: self.opened, timeout)


class _Call:
    """One request being answered: the op, its id, and whether the controller cancelled it."""

    def __init__(
        self, process: FakeProcess, request_id: Any, op: str, args: dict[str, Any], payload: bytes
    ) -> None:
        self.process = process
        self.id = request_id
        self.op = op
        self.args = args
        self.payload = payload
        self.cancelled = False
        self.thread = threading.Thread(
            target=self._answer, daemon=True, name=f"fake-{process.host.name}-{op}"
        )

    def _answer(self) -> None:
        _local.call = self
        host = self.process.host
        try:
            # checked as the real agent checks it: a request it would refuse fails here too
            self.args = protocol.decode(self.op, self.args)
            result = host.handler(self.op)(self.op, self.args, self.payload)
        except AgentError as exc:
            self.process.send(
                {"id": self.id, "ok": False, "error": {"message": str(exc), "kind": exc.kind}}
            )
        except FakeError as exc:
            self.process.send(
                {
                    "id": self.id,
                    "ok": False,
                    "error": {**exc.data, "message": exc.message, "kind": exc.kind},
                }
            )
        except Exception as exc:  # noqa: BLE001 - as the agent: any failure is an answer
            self.process.send(
                {
                    "id": self.id,
                    "ok": False,
                    "error": {"message": f"{type(exc).__name__}: {exc}", "kind": "internal"},
                }
            )
        else:
            self.process.send(
                {"id": self.id, "ok": True, "result": result if result is not None else {}}
            )
        finally:
            _local.call = None


def current_call() -> _Call:
    call = getattr(_local, "call", None)
    assert call is not None, "only an op's handler (its thread) has a current call"
    return call


class FakeProcess:
    """What ``FakeTransport.spawn`` returns: Popen's face (pipes, poll, wait, kill,
    returncode) on an agent session served by a thread."""

    def __init__(self, host: FakeHost, argv: list[str]) -> None:
        self.host = host
        self.args = argv
        self.pid = next(_pids)
        self.returncode: int | None = None
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        self.stdin = open(in_w, "wb")  # noqa: SIM115 - closed by the session, as Popen's
        self.stdout = open(out_r, "rb")  # noqa: SIM115
        self.stderr = open(err_r, "rb")  # noqa: SIM115
        self._in = open(in_r, "rb")  # noqa: SIM115 - the agent's side
        self._out = open(out_w, "wb")  # noqa: SIM115
        self._err = open(err_w, "wb")  # noqa: SIM115
        self._write = threading.Lock()
        self._ended = threading.Event()
        self._end_once = threading.Lock()
        self.call: _Call | None = None
        # a switch this session made that no `record` followed yet (the agent's settle_orphans)
        self.unrecorded: dict[str, Any] | None = None
        threading.Thread(target=self._serve, daemon=True, name=f"fake-agent-{host.name}").start()

    # --- Popen's face ------------------------------------------------------------------------------

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        self._end(-9)

    def terminate(self) -> None:
        self._end(-15)

    # --- the agent's side --------------------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        try:
            with self._write:
                self._out.write((json.dumps(message, default=str) + "\n").encode())
                self._out.flush()
        except (OSError, ValueError):
            pass  # the controller is gone (or killed us): the op still ran to its end

    def _serve(self) -> None:
        if self.host.unreachable:  # as ssh does: a line on stderr, exit 255, not a word on stdout
            with self._write:
                self._err.write(
                    f"ssh: connect to host {self.host.name} port 22: Connection refused\n".encode()
                )
            self._end(255)
            return
        self.send({"hello": self.host.hello()})
        while self.returncode is None:
            line = self._in.readline()
            if not line:
                break  # EOF: the controller closed the session (or died)
            message = json.loads(line)
            if "cancel" in message and "op" not in message:
                if self.call is not None:
                    self.host.cancel(self.call)
                continue
            op, args = str(message.get("op")), dict(message.get("args") or {})
            payload = b""
            if op == "receive":  # its blobs' bytes follow the request line
                payload = self._in.read(sum(int(blob["size"]) for blob in args.get("blobs") or []))
            if self.call is not None:
                self.call.thread.join()  # the controller waits for each answer: nothing to wait for
            self.host.log(op, args)
            self.call = _Call(self, message.get("id"), op, args, payload)
            self.call.thread.start()
        self._end(0)

    def _end(self, code: int) -> None:
        """The session ends (EOF, or killed): an op in flight is cancelled and answered first
        (the real agent runs it to its end), a lock this session holds is left abandoned, a
        switch it never recorded gets a ledger entry; then the pipes close."""
        with self._end_once:
            if self.returncode is not None:
                return
            call = self.call
            if call is not None:
                self.host.cancel(call)
                if call.thread is not threading.current_thread() and call.thread.ident is not None:
                    call.thread.join(timeout=10)
            self.host.session_ended(self)
            self.returncode = code
            for pipe in (self._out, self._err):
                try:
                    with self._write:
                        pipe.close()
                except OSError:
                    pass
            self._ended.set()


class FakeTransport:
    """The ``Transport`` of one fake host: ``spawn`` starts a fake agent session."""

    def __init__(self, host: FakeHost) -> None:
        self.fake = host
        self.host = host.name

    def spawn(self, argv: list[str]) -> FakeProcess:
        process = FakeProcess(self.fake, argv)
        self.fake.sessions.append(process)
        return process

    def explain_failure(self, returncode: int | None, stderr: str) -> str:
        lines = stderr.strip().splitlines()
        if returncode == 255:
            return (
                f"cannot reach {self.host} over SSH: {lines[-1] if lines else 'connection failed'}"
            )
        return f"the agent on {self.host} exited with code {returncode}" + (
            f": {lines[-1]}" if lines else ""
        )

    def close(self) -> None:
        pass

    def drop_stale(self) -> bool:
        return False


# the fake hosts serving blobs right now (serve_blobs), by their fake address
_SERVING: dict[str, tuple[FakeHost, str, set[str]]] = {}


class FakeHost:
    """One host's state, kept in memory, and how its ops are answered."""

    def __init__(self, name: str, root: str = "/srv/app") -> None:
        self.name = name
        self.root = root
        self.blobs: set[str] = set()
        self.releases: dict[str, dict[str, Any]] = {}  # release_id -> its release.json
        self.current: str | None = None
        self.previous: str | None = None
        self.ledger: list[dict[str, Any]] = []
        self.lock: dict[str, Any] | None = None
        self.hooks: list[tuple[str, str]] = []  # (release_id, command) of every hook run
        self.ops: list[str] = []  # every op asked of this host, in order
        self.received_bytes = 0
        self.unreachable = False  # its sessions end at once, as ssh to a host that is down
        self.sessions: list[FakeProcess] = []
        self.lock_waiting = threading.Event()  # a lock op found the lock held and waits for it
        self.overrides: dict[str, Handler] = {}
        self.changed = threading.Condition()  # state changes, opened gates, cancels wake waiters

    def __repr__(self) -> str:
        return f"FakeHost({self.name!r}, current={self.current!r})"

    # --- what tests use ------------------------------------------------------------------------

    def on(self, op: str, handler: Handler) -> None:
        """Answer ``op`` on this host with ``handler`` from now on."""
        self.overrides[op] = handler

    def fail(self, op: str, kind: str, message: str) -> None:
        """``op`` fails on this host with ``kind`` and ``message``."""

        def failing(_op: str, _args: dict[str, Any], _payload: bytes) -> Any:
            raise FakeError(kind, message)

        self.on(op, failing)

    def block(
        self, op: str, gate: Gate, when: Callable[[dict[str, Any]], bool] = lambda args: True
    ) -> None:
        """``op`` (those of its calls whose args satisfy ``when``) waits at ``gate``, then goes on
        as usual; cancelled meanwhile, it fails kind ``interrupted`` as a cancelled hook does."""

        def blocked(op_: str, args: dict[str, Any], payload: bytes) -> Any:
            if when(args):
                gate.wait(self)
            return self.default(op_, args, payload)

        self.on(op, blocked)

    def hold_lock(
        self,
        user: str = "alice",
        host: str = "laptop",
        *,
        kept: bool = False,
        reason: str | None = None,
        alive: bool = True,
    ) -> None:
        """The deploy lock, held by another controller: its live session (or one gone,
        ``alive=False``), or ``kept`` (``shiplane lock``)."""
        record: dict[str, Any] = {
            "user": user,
            "host": host,
            "pid": 4242,
            "command": "shiplane deploy",
            "started_at": _now(),
            "acquired_at": _now(),
            "agent_pid": 999,
            "agent_host": self.name,
            "alive": alive,
        }
        if reason:
            record["reason"] = reason
        record.update({"kept": True} if kept else {"holder_lock": agent_lock.BOUND})
        with self.changed:
            self.lock = record
            self.changed.notify_all()

    def drop_lock(self) -> None:
        """The other controller gives its lock back (a waiting deploy then takes it)."""
        with self.changed:
            self.lock = None
            self.changed.notify_all()

    def release(self, release_id: str) -> dict[str, Any]:
        return self.releases[release_id]

    def state(self, release_id: str) -> str:
        return str(self.releases[release_id].get("state"))

    # --- the machinery -------------------------------------------------------------------------

    def handler(self, op: str) -> Handler:
        return self.overrides.get(op) or self.default

    def default(self, op: str, args: dict[str, Any], payload: bytes) -> Any:
        """What the real agent would answer (in memory)."""
        method = getattr(self, f"_op_{op}", None)
        if method is None:
            raise FakeError("usage", f"unknown op {op!r}")
        return method(args, payload)

    def hello(self) -> dict[str, Any]:
        return {
            "agent": "fake",
            "python": platform.python_version(),
            "python_version": "{}.{}".format(*sys.version_info[:2]),
            "implementation": "cpython",
            "abi": "cp{}{}".format(*sys.version_info[:2]),
            "platform": sysconfig.get_platform().replace("-", "_").replace(".", "_"),
            "glibc": platform.libc_ver()[1] or None,
            "executable": "/usr/bin/python3",
            "uv": "/usr/bin/uv",
            "systemd": False,
            "user": "deploy",
            "hostname": self.name,
            "root": self.root,
            "pid": 1,
        }

    def log(self, op: str, args: dict[str, Any]) -> None:
        with self.changed:
            self.ops.append(op)

    def notify(self) -> None:
        with self.changed:
            self.changed.notify_all()

    def cancel(self, call: _Call) -> None:
        with self.changed:
            call.cancelled = True
            self.changed.notify_all()

    def wait_until(self, ready: Callable[[], bool], timeout: float | None = None) -> bool:
        """In an op: wait until ``ready()`` (False after ``timeout``); FakeError ``interrupted``
        when the controller cancels the op or the session ends first."""
        call = current_call()
        with self.changed:
            done = self.changed.wait_for(lambda: ready() or call.cancelled, timeout)
            if call.cancelled:
                raise FakeError(
                    "interrupted",
                    f"{call.op} cancelled (the controller was interrupted or went away)",
                )
            return bool(done)

    def emit(self, event: dict[str, Any]) -> None:
        """In an op: an event line for the request being answered."""
        call = current_call()
        call.process.send({"id": call.id, "event": event})

    def session_ended(self, process: FakeProcess) -> None:
        with self.changed:
            if self.lock is not None and self.lock.get("session") is process:
                self.lock["alive"] = False  # its flock is gone with it: abandoned
            if process.unrecorded is not None:
                self.ledger.append(
                    {
                        "event": "switch",
                        "outcome": "ok",
                        **process.unrecorded,
                        "note": "made live by a command that ended before recording it",
                    }
                )
                process.unrecorded = None
            self.changed.notify_all()

    def _lock_info(self) -> dict[str, Any] | None:
        if self.lock is None:
            return None
        record = {k: v for k, v in self.lock.items() if k not in ("session", "alive")}
        return agent_lock.describe(record, alive=bool(self.lock.get("alive")))

    def _status(self) -> dict[str, Any]:
        services = (
            [
                {
                    "name": "web",
                    "program": f"web-{self.current}",
                    "state": "RUNNING",
                    "pid": 4321,
                    "uptime": 1.0,
                    "release": self.current,
                    "live": True,
                    "standby": False,
                }
            ]
            if self.current
            else []
        )
        return {
            "live_release": self.current,
            "current": self.current,
            "backend": "daemon",
            "supervisord": bool(self.current),
            "services": services,
        }

    # --- default ops: (args, payload) -> result --------------------------------------------------

    def _op_inventory(self, args: dict[str, Any], payload: bytes) -> Any:
        with self.changed:
            return {
                "missing": [sha for sha in args.get("blobs") or [] if sha not in self.blobs],
                "current": self.current,
                "previous": self.previous,
                "releases": [dict(self.releases[rid]) for rid in sorted(self.releases)],
                "venvs": sorted({str(r.get("dependency_digest")) for r in self.releases.values()}),
                "lock": self._lock_info(),
                "setup_done": any(e.get("setup") for e in self.ledger),
                "services": self._status(),
            }

    def _op_receive(self, args: dict[str, Any], payload: bytes) -> Any:
        offset = 0
        bad = []
        for blob in args.get("blobs") or []:
            data = payload[offset : offset + int(blob["size"])]
            offset += int(blob["size"])
            if hashlib.sha256(data).hexdigest() != blob["sha256"]:
                bad.append(blob["sha256"])
                continue
            with self.changed:
                self.blobs.add(blob["sha256"])
                self.received_bytes += len(data)
        if bad:
            raise FakeError(
                "integrity",
                f"received blob(s) did not match their sha256: {', '.join(bad)}",
                blobs=bad,
            )
        self.emit({"phase": "receive", "status": "progress", "bytes": offset, "total": offset})
        return {"received": len(args.get("blobs") or []), "bytes": offset}

    def _op_install(self, args: dict[str, Any], payload: bytes) -> Any:
        rid, manifest = str(args["release_id"]), dict(args["manifest"])
        artifact = str(args.get("artifact") or artifact_digest(manifest))
        needed = [
            f["sha256"]
            for key in ("app_files", "dependencies", "tools")
            for f in manifest.get(key) or []
        ]
        with self.changed:
            missing = [sha for sha in needed if sha not in self.blobs]
            if missing:
                raise FakeError(
                    "integrity",
                    f"install: {len(missing)} blob(s) of the artifact are not stored here",
                    blobs=missing,
                )
            existing = self.releases.get(rid)
            if existing is not None:
                if existing.get("artifact") != artifact:
                    raise FakeError("conflict", f"release {rid} exists with another artifact")
                return {"release_id": rid, "reused": True, "venv_reused": True}
            self.releases[rid] = {
                "release_id": rid,
                "artifact": artifact,
                "dependency_digest": manifest.get("dependency_digest"),
                "git_commit": manifest.get("git_commit"),
                "created_at": _now(),
                "stage": args.get("stage"),
                "state": "prepared",
            }
        return {"release_id": rid, "reused": False, "venv_reused": False}

    def _op_hook(self, args: dict[str, Any], payload: bytes) -> Any:
        with self.changed:
            if args.get("release_id") not in self.releases:
                raise FakeError("usage", f"hook: no release {args.get('release_id')}")
            self.hooks.append((str(args["release_id"]), str(args.get("command"))))
        return {"exit_code": 0, "output": "", "seconds": 0.0}

    def _op_switch(self, args: dict[str, Any], payload: bytes) -> Any:
        rid = str(args["release_id"])
        with self.changed:
            if rid not in self.releases:
                raise FakeError("usage", f"switch: no release {rid} on this host")
            previous = self.current
            if previous != rid:
                self.previous, self.current = previous, rid
                current_call().process.unrecorded = {"release": rid, "from": previous, "at": _now()}
            self._mark(rid, "live")
        self.emit({"phase": "switch", "status": "switched", "detail": f"{previous} -> {rid}"})
        return {"previous": previous, "current": rid, "seconds": 0.0, "unchanged": previous == rid}

    def _op_withdraw(self, args: dict[str, Any], payload: bytes) -> Any:
        rid = str(args["release_id"])
        with self.changed:
            if self.current not in (None, rid):
                raise FakeError("usage", f"withdraw: this host serves {self.current}, not {rid}")
            self.current = None
        return {"withdrawn": rid, "stopped": []}

    def _mark(self, rid: str, state: str) -> dict[str, Any]:
        if state == "live":
            for other in self.releases.values():
                if other["release_id"] != rid and other.get("state") == "previous":
                    other["state"] = "good"
            for other in self.releases.values():
                if other["release_id"] != rid and other.get("state") == "live":
                    other["state"] = "previous"
        meta = self.releases[rid]
        meta.update({"state": state, f"{state.replace('-', '_')}_at": _now()})
        return dict(meta)

    def _op_mark(self, args: dict[str, Any], payload: bytes) -> Any:
        with self.changed:
            if args.get("release_id") not in self.releases:
                raise FakeError("usage", f"mark: no release {args.get('release_id')}")
            return self._mark(str(args["release_id"]), str(args["state"]))

    def _op_record(self, args: dict[str, Any], payload: bytes) -> Any:
        with self.changed:
            self.ledger.append({**dict(args["entry"]), "at": _now()})
            current_call().process.unrecorded = None
        return {"recorded": True}

    def _op_history(self, args: dict[str, Any], payload: bytes) -> Any:
        limit = args.get("limit")
        with self.changed:
            return {"entries": list(self.ledger[-int(limit) :] if limit else self.ledger)}

    def _op_releases(self, args: dict[str, Any], payload: bytes) -> Any:
        with self.changed:
            return {
                "releases": [dict(self.releases[rid]) for rid in sorted(self.releases)],
                "current": self.current,
                "previous": self.previous,
            }

    def _op_prune(self, args: dict[str, Any], payload: bytes) -> Any:
        keep = max(1, int(args.get("keep") or 5))
        removed = []
        with self.changed:
            excess = len(self.releases) - keep
            for rid in sorted(self.releases):
                if excess <= 0:
                    break
                if rid in (self.current, self.previous):
                    continue
                del self.releases[rid]
                removed.append(rid)
                excess -= 1
        return {"removed": removed, "venvs_removed": [], "blobs_removed": 0}

    def _op_lock(self, args: dict[str, Any], payload: bytes) -> Any:
        holder, keep = dict(args["holder"]), bool(args.get("keep"))
        deadline = time.monotonic() + float(args.get("wait") or 0)
        broke = None
        with self.changed:
            while True:
                if self.lock is not None and not agent_lock.is_ours(self.lock, holder):
                    info = self._lock_info()
                    assert info is not None
                    if info["state"] == "abandoned":
                        broke = {
                            k: info.get(k)
                            for k in ("user", "host", "pid", "command", "acquired_at")
                        }
                        self.emit(
                            {
                                "phase": "lock",
                                "status": "broke",
                                "detail": agent_lock.broke_message(info),
                            }
                        )
                        self.lock = None
                        continue
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise FakeError(
                            "lock", agent_lock.held_message(info), holder=info, state=info["state"]
                        )
                    if not self.lock_waiting.is_set():
                        self.emit(
                            {
                                "phase": "lock",
                                "status": "waiting",
                                "detail": agent_lock.held_message(info),
                            }
                        )
                        self.lock_waiting.set()
                    held = self.lock
                    self.wait_until(lambda held=held: self.lock is not held, timeout=left)  # type: ignore[misc]
                    continue
                record = {
                    **holder,
                    "acquired_at": _now(),
                    "agent_pid": current_call().process.pid,
                    "agent_host": self.name,
                }
                record.update(
                    {"kept": True}
                    if keep
                    else {
                        "holder_lock": agent_lock.BOUND,
                        "session": current_call().process,
                        "alive": True,
                    }
                )
                self.lock = record
                if broke is not None:
                    self.ledger.append(
                        {
                            "event": "lock-broken",
                            "holder": broke,
                            "user": holder.get("user"),
                            "controller": holder.get("host"),
                            "at": _now(),
                        }
                    )
                result = self._lock_info() or {}
                return {**result, **({"broke": broke} if broke else {})}

    def _op_unlock(self, args: dict[str, Any], payload: bytes) -> Any:
        with self.changed:
            if self.lock is None:
                return {"released": False}
            session = self.lock.get("session")
            ours = session is current_call().process or agent_lock.is_ours(
                self.lock, args.get("holder")
            )
            if not ours and not args.get("force"):
                info = self._lock_info()
                assert info is not None
                raise FakeError(
                    "lock", agent_lock.held_message(info) + "; not ours to unlock (use force)"
                )
            self.lock = None
            self.changed.notify_all()
        return {"released": True}

    def _op_heartbeat(self, args: dict[str, Any], payload: bytes) -> Any:
        with self.changed:
            if self.lock is None or self.lock.get("session") is not current_call().process:
                raise FakeError("lock", "heartbeat: this session does not hold the deploy lock")
            return self._lock_info()

    def _op_status(self, args: dict[str, Any], payload: bytes) -> Any:
        with self.changed:
            return self._status()

    def _op_verify(self, args: dict[str, Any], payload: bytes) -> Any:
        with self.changed:
            return {"blobs": len(self.blobs), "bad": []}

    def _op_install_uv(self, args: dict[str, Any], payload: bytes) -> Any:
        return {"path": "/usr/bin/uv"}

    # blobs between fake hosts (agent/peers.py): a host serving is found by its fake address
    def _op_serve_blobs(self, args: dict[str, Any], payload: bytes) -> Any:
        with self.changed:
            served = [sha for sha in args["blobs"] if sha in self.blobs]
        _SERVING[f"fake-{self.name}"] = (self, args["token"], set(served))
        return {"address": f"fake-{self.name}", "port": 1, "blobs": len(served)}

    def _op_fetch_blobs(self, args: dict[str, Any], payload: bytes) -> Any:
        source, token, served = _SERVING.get(args["address"], (None, "", set()))
        wanted = [b["sha256"] for b in args["blobs"]]
        if source is None or token != args["token"]:
            error = f"cannot reach {args['address']}:{args['port']}: Connection refused"
            return {"received": 0, "bytes": 0, "failed": wanted, "bad": [], "error": error}
        got = [b for b in args["blobs"] if b["sha256"] in served]
        with self.changed:
            self.blobs.update(b["sha256"] for b in got)
        failed = [sha for sha in wanted if sha not in served]
        size = sum(int(b["size"]) for b in got)
        return {"received": len(got), "bytes": size, "failed": failed, "bad": [], "error": None}

    def _op_stop_serving(self, args: dict[str, Any], payload: bytes) -> Any:
        _SERVING.pop(f"fake-{self.name}", None)
        return {"served": 0, "bytes": 0, "refused": 0}

    def _op_read_release_file(self, args: dict[str, Any], payload: bytes) -> Any:
        return {"exists": False}

    def _services(self, args: dict[str, Any], payload: bytes) -> Any:
        return {"services": args.get("services")}

    _op_start = _op_stop = _op_restart = _op_reload = _services

    def _op_shutdown(self, args: dict[str, Any], payload: bytes) -> Any:
        return {"stopped": []}

    def _op_logs(self, args: dict[str, Any], payload: bytes) -> Any:
        return {"lines": []}


class FakeHosts:
    """The fake hosts of a test, by name; called with a host name, the transport of that host
    (what ``Fleet`` takes as ``transports``). A name not given up front is made on first use."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self.hosts: dict[str, FakeHost] = {name: FakeHost(name) for name in names}

    def __call__(self, name: str) -> FakeTransport:
        return FakeTransport(self[name])

    def __getitem__(self, name: str) -> FakeHost:
        if name not in self.hosts:
            self.hosts[name] = FakeHost(name)
        return self.hosts[name]

    def __iter__(self) -> Any:
        return iter(self.hosts.values())

    def serving(self) -> dict[str, str | None]:
        """What each host serves now (its ``current``), by name."""
        return {name: host.current for name, host in self.hosts.items()}
