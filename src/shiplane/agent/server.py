"""The agent session: JSON lines in, events and one result per request out (DESIGN "Agent protocol").

One session serves many requests. An op that fails answers with an error line; nothing an op
does can end the session except EOF on stdin (or a signal, which releases our deploy lock). A
deploy lock this session took is held by this process (agent/lock.py): when the session ends
without unlocking (its controller died), the next lock finds it abandoned and breaks it.
"""

from __future__ import annotations

import getpass
import importlib
import json
import os
import platform
import select
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from types import FrameType
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from . import AgentError, __version__, ledger, lock, protocol, prune, releases, store, utc_now
from .hooks import Limits, run_hook
from .interpreter import abi_tag, glibc_version
from .paths import Layout, agent_command
from .protocol import (
    Emit,
    ErrorObject,
    Event,
    FetchBlobsArgs,
    FetchResult,
    HeartbeatArgs,
    Hello,
    HistoryArgs,
    HistoryResult,
    Holder,
    HookArgs,
    HookResult,
    InstallArgs,
    InstallUvArgs,
    Inventory,
    InventoryArgs,
    LedgerEntry,
    LockArgs,
    LockRecord,
    LockTaken,
    LogsArgs,
    MarkArgs,
    PruneArgs,
    PruneResult,
    ReadReleaseFileArgs,
    ReceiveArgs,
    ReceiveResult,
    RecordArgs,
    ReleaseFile,
    ReleaseMeta,
    ReleasesArgs,
    ReleasesResult,
    ReloadArgs,
    RestartArgs,
    ServeBlobsArgs,
    ServicesUnknown,
    Serving,
    ServingStopped,
    ShutdownArgs,
    StartArgs,
    StatusArgs,
    StopArgs,
    StopServingArgs,
    SwitchArgs,
    UnlockArgs,
    UnlockResult,
    VerifyArgs,
    VerifyResult,
    WithdrawArgs,
)
from .runtime import valid_release_id
from .venvs import EarlyUv, VenvShells, find_uv, install_uv, list_venvs

if TYPE_CHECKING:  # imported by the ops that need it (it loads the backends)
    from .peers import BlobServer
    from .services import Logs, ServicesStatus, ShutDown, Stopped, Withdrawn
    from .switch import SwitchResult
    from .venvs import UvInstalled

ALIVE_EVERY = 5.0


def _services() -> Any:
    """The services module (supervisord backend), imported only when an op needs it."""
    return importlib.import_module(".services", __package__)


def hello(layout: Layout) -> Hello:
    """Facts about this host the controller plans with."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers with arbitrary uids)
        user = str(os.getuid())
    return {
        "agent": __version__,
        "python": platform.python_version(),
        "python_version": "{}.{}".format(*sys.version_info[:2]),
        "implementation": sys.implementation.name,
        "abi": abi_tag(),
        "platform": sysconfig.get_platform().replace("-", "_").replace(".", "_"),
        "glibc": glibc_version(),
        "executable": sys.executable,
        "uv": find_uv(layout),
        "systemd": os.path.isdir("/run/systemd/system"),
        "user": user,
        "hostname": socket.gethostname(),
        "root": str(layout.root),
        "pid": os.getpid(),
    }


class Session:
    """One controller connection: the request loop, plus the deploy lock it holds, if any."""

    def __init__(self, layout: Layout, stdin: BinaryIO, stdout: BinaryIO) -> None:
        self.layout = layout
        self.stdin = stdin
        self.stdout = stdout
        self.holder: Holder | None = None
        self.lock_fd: int | None = None  # holds the flock of our deploy lock (agent/lock.py)
        # a switch this session made that no ledger entry records yet (its ``record`` follows)
        self.unrecorded: LedgerEntry | None = None
        # a release this session installed with its web server started early, not yet switched
        # to or marked: its server is stopped if the session ends first (the controller is gone)
        self.prebooted: str | None = None
        # the venvs ``inventory`` started making, for this session's ``install`` to wait for
        self.venv_shells = VenvShells()
        self.early_uv: EarlyUv | None = None  # the shipped uv, unpacked as soon as it is stored
        # this deploy's blobs served to peer hosts (serve_blobs), stopped with the session at last
        self.blob_server: BlobServer | None = None
        # the last switch's after-switch (its argv) and the switch lock it will hold, started
        # when the session ends (start_after_switch)
        self.after_switch: tuple[list[str], int] | None = None
        self._write_lock = threading.Lock()
        self.reader_gone = threading.Event()  # a write to the controller failed: nobody listens
        # Serialises lock changes of this session. Reentrant: the signal handler runs on the main
        # thread, possibly inside such a section.
        self.lock_ops = threading.RLock()

    # --- wire ---------------------------------------------------------------------------------

    def send(self, obj: Mapping[str, object]) -> None:
        """One line to the controller: ``{"hello"}``, an event, a result or an error."""
        line = json.dumps(obj, separators=(",", ":"), default=str) + "\n"
        with self._write_lock:
            self.stdout.write(line.encode("utf-8"))
            self.stdout.flush()

    def serve(self) -> None:
        """Send ``hello``, then answer requests until EOF on stdin."""
        self.layout.root.mkdir(parents=True, exist_ok=True)
        self.send({"hello": hello(self.layout)})
        while True:
            line = self.stdin.readline()
            if not line:
                break
            if not line.strip():
                continue
            self.handle_line(line)

    def handle_line(self, line: bytes) -> None:
        """Parse and run one request; every outcome is a result or an error line for its id."""
        req_id: object = None
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise TypeError("a request must be a JSON object")
            req_id = req.get("id")
            if "cancel" in req and "op" not in req:
                return  # a cancel for an op that has already ended (hooks read their own)
            op = req.get("op")
            args = protocol.decode(op, req.get("args") or {})  # agent/protocol.py: the contract
        except (ValueError, TypeError) as exc:
            self.send(
                {
                    "id": req_id,
                    "ok": False,
                    "error": {"message": f"bad request line: {exc}", "kind": "protocol"},
                }
            )
            return
        except AgentError as exc:
            self.send({"id": req_id, "ok": False, "error": error_object(exc)})
            return

        def emit(event: Event) -> None:
            if self.reader_gone.is_set():
                return
            try:
                self.send({"id": req_id, "event": event})
            except OSError:
                # The controller is gone (killed, connection cut). The op still runs to its end:
                # a switch stopped half-way would leave the host serving one release with
                # `current` at another; the session then ends at EOF and frees its lock.
                self.reader_gone.set()

        handler = HANDLERS.get(str(op))
        done = threading.Event()
        threading.Thread(target=self._alive, args=(req_id, done), daemon=True).start()
        try:
            if handler is None:
                raise AgentError(f"unknown op {op!r}", kind="usage")
            # ``args`` is the op's request TypedDict (protocol.REQUESTS): decode checked its fields
            result = handler(self, args, emit)
        except Exception as exc:  # noqa: BLE001 - any failure of an op is an answer, never a crash
            done.set()
            self.send({"id": req_id, "ok": False, "error": error_object(exc)})
            return
        done.set()
        self.send({"id": req_id, "ok": True, "result": result if result is not None else {}})

    def _alive(self, req_id: object, done: threading.Event) -> None:
        """While an op runs, say so every few seconds: the controller then tells a busy host (a
        long venv build, a quiet hook) from one that stopped answering, within its timeout."""
        while not done.wait(ALIVE_EVERY):
            try:
                self.send({"id": req_id, "event": {"status": "alive"}})
            except OSError:  # the controller is gone: an op that only reports (logs) may stop
                self.reader_gone.set()
                return

    # --- lock -----------------------------------------------------------------------------------

    def controller_here(self, seconds: float) -> bool:
        """Sleep up to ``seconds`` (an op's wait); False as soon as the controller has gone (EOF
        on stdin: its death closes it) or cancels the op (a ``{"cancel": ...}`` line)."""
        try:
            fd = self.stdin.fileno()
        except (AttributeError, OSError, ValueError):  # not a real stream (tests): just sleep
            time.sleep(seconds)
            return True
        readable, _, _ = select.select([fd], [], [], seconds)
        if not readable:
            return True
        # No request comes during a call: what arrives is EOF or a cancel line (the controller
        # was interrupted: transport/session.py ``cancel``), read here as agent/hooks.py does.
        line = self.stdin.readline()
        if not line:
            return False
        try:
            message = json.loads(line)
        except ValueError:
            return True
        return not (isinstance(message, dict) and "cancel" in message)

    def drop_lock(self) -> None:
        """Forget the lock this session took (its record already gone): close its flock."""
        lock.drop(self.lock_fd)
        self.lock_fd = None
        self.holder = None

    def release_lock(self) -> None:
        """Give back the deploy lock this session took, if it still holds it (session ending)."""
        with self.lock_ops:
            if self.holder is not None:
                try:
                    lock.release(self.layout, self.holder, force=False)
                except Exception:  # noqa: BLE001, S110 - exiting anyway; a kept lock is abandoned
                    pass
                self.drop_lock()

    def release_on_signal(self, signum: int, _frame: FrameType | None) -> None:
        """SIGTERM/SIGINT: give back the deploy lock we took, then exit."""
        self.release_lock()
        raise SystemExit(128 + signum)


def error_object(exc: BaseException) -> ErrorObject:
    """The protocol error for an exception: expected ones carry ``kind``; others are ``internal``."""
    kind = getattr(exc, "kind", None)
    if isinstance(kind, str):
        extra = getattr(exc, "extra", None)
        # AgentError's extras: the keys ErrorObject lists (holder, blobs, output_tail, ...)
        out = cast(ErrorObject, dict(extra) if isinstance(extra, dict) else {})
        out["message"] = str(getattr(exc, "message", None) or exc)
        out["kind"] = kind
        return out
    return {
        "message": f"{type(exc).__name__}: {exc}",
        "kind": "internal",
        "detail": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    }


# --- handlers: (session, the op's request, emit) -> its result ------------------------------------

# Each handler takes its op's request TypedDict (protocol.REQUESTS[op]); the dispatch hands it
# the decoded args, which protocol.decode checked are exactly that.
Handler = Callable[[Session, Any, Emit], object]


def inventory(layout: Layout, shas: list[str]) -> Inventory:
    """What the controller needs to plan a deploy on this host."""
    services: ServicesStatus | ServicesUnknown
    try:
        from . import services as services_module

        services = services_module.status(layout)
    except ImportError:
        services = {}
    except Exception as exc:  # noqa: BLE001 - inventory must answer even if services are broken
        services = {"error": f"{type(exc).__name__}: {exc}"}
    return {
        "missing": store.missing(layout, shas),
        "current": releases.current_release(layout),
        "previous": releases.previous_release(layout),
        "releases": releases.list_releases(layout),
        "venvs": list_venvs(layout),
        "lock": lock.inspect(layout),
        "setup_done": ledger.setup_done(layout),
        "services": services,
    }


def _op_inventory(s: Session, args: InventoryArgs, emit: Emit) -> Inventory:
    """What the host has; with ``venv`` ({digest, python, uv_cache}: a deploy's hint, never
    plan's), the venv it will need starts being made while the blobs are sent."""
    hint = args.get("venv")
    if isinstance(hint, dict):
        s.venv_shells.start(
            s.layout,
            hint.get("digest"),
            hint.get("python") or sys.executable,
            user_cache=hint.get("uv_cache") == "user",
        )
    uv = args.get("uv")
    if isinstance(uv, dict):
        s.early_uv = EarlyUv(s.layout, str(uv.get("sha256")), uv.get("binary_sha256"))
    result = inventory(s.layout, list(args.get("blobs") or []))
    port = args.get("port")
    if isinstance(port, dict):
        result["port_taken"] = port_taken(
            str(port.get("bind")), int(port.get("port") or 0), result["services"]
        )
    return result


def port_taken(bind: str, port: int, services: object) -> str | None:
    """Why the stage's public port cannot be ours (another program listens on it), or None: it is
    free, or this stage's own front holds it. Asked before anything is sent, so a deploy that
    would fail at its switch fails at its start."""
    running = services.get("services", []) if isinstance(services, dict) else []
    if any(
        svc.get("name") == "front" and svc.get("state") in ("RUNNING", "STARTING")
        for svc in running
    ):
        return None
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the front binds
        try:
            probe.bind((bind, port))
        except OSError as exc:
            return f"{bind}:{port}: {exc.strerror or exc}"
    return None


def _stored(s: Session) -> Callable[[str], None]:
    """What to do as each blob is in the store: start unpacking the shipped uv."""
    early = s.early_uv
    return early.stored if early is not None else (lambda sha: None)


def _op_receive(s: Session, args: ReceiveArgs, emit: Emit) -> ReceiveResult:
    return store.receive(s.layout, args["blobs"], s.stdin, emit, _stored(s))


def _op_hook(s: Session, args: HookArgs, emit: Emit) -> HookResult:
    rid = valid_release_id(args["release_id"])
    command = args["command"]
    if not command.strip():
        raise AgentError("hook: command missing", kind="usage")
    limits = Limits(
        float(args["timeout"] or 600), float(args["silence_timeout"] or 0), watch=s.stdin
    )
    return run_hook(s.layout, rid, command, limits, emit)


def _names(names: list[str] | None) -> list[str] | None:
    return list(names) if isinstance(names, list) else None


# start ... logs: the services module (agent/services.py), imported when an op needs it


def _op_start(s: Session, args: StartArgs, emit: Emit) -> ServicesStatus:
    from . import services

    return services.start(s.layout, _names(args["services"]), args["spec"], emit)


def _op_stop(s: Session, args: StopArgs, emit: Emit) -> Stopped:
    from . import services

    return services.stop(s.layout, _names(args["services"]), emit)


def _op_restart(s: Session, args: RestartArgs, emit: Emit) -> ServicesStatus:
    from . import services

    return services.restart(s.layout, _names(args["services"]), args["spec"], emit)


def _op_reload(s: Session, args: ReloadArgs, emit: Emit) -> ServicesStatus:
    from . import services

    return services.reload(s.layout, _names(args["services"]), emit)


def _op_status(s: Session, args: StatusArgs, emit: Emit) -> ServicesStatus:
    from . import services

    return services.status(s.layout)


def _op_shutdown(s: Session, args: ShutdownArgs, emit: Emit) -> ShutDown:
    from . import services

    return services.shutdown(s.layout, emit)


def _op_withdraw(s: Session, args: WithdrawArgs, emit: Emit) -> Withdrawn:
    from . import services

    start_after_switch(s)  # it takes the switch lock this session holds after a switch
    return services.withdraw(s.layout, valid_release_id(args["release_id"]), emit)


def _op_logs(s: Session, args: LogsArgs, emit: Emit) -> Logs:
    from . import services

    return services.logs(
        s.layout,
        args["service"],
        int(args["lines"] or 100),
        bool(args["follow"]),
        emit,
        gone=s.reader_gone.is_set,
    )


def _op_verify(s: Session, args: VerifyArgs, emit: Emit) -> VerifyResult:
    return store.check_store(s.layout, emit)


def _op_install_uv(s: Session, args: InstallUvArgs, emit: Emit) -> UvInstalled:
    early = s.early_uv
    if early is not None and early.matches(args["sha256"], args["binary_sha256"]):
        done = early.result()  # unpacked while the other blobs arrived (inventory's uv hint)
        if done is not None:
            return done
    return install_uv(s.layout, args["sha256"], args["binary_sha256"])


def _op_serve_blobs(s: Session, args: ServeBlobsArgs, emit: Emit) -> Serving:
    from . import peers

    _op_stop_serving(s, {}, emit)  # one server per session: a second call replaces the first
    s.blob_server, serving = peers.serve(
        s.layout, args["blobs"], args["token"], args["address"], args["port"], args["ttl"]
    )
    return serving


def _op_fetch_blobs(s: Session, args: FetchBlobsArgs, emit: Emit) -> FetchResult:
    from . import peers

    return peers.fetch(
        s.layout,
        args["address"],
        args["port"],
        args["token"],
        args["blobs"],
        args["connect_timeout"],
        emit,
        _stored(s),
    )


def _op_stop_serving(s: Session, args: StopServingArgs, emit: Emit) -> ServingStopped:
    server, s.blob_server = s.blob_server, None
    return server.stop() if server is not None else {"served": 0, "bytes": 0, "refused": 0}


def _op_prune(s: Session, args: PruneArgs, emit: Emit) -> PruneResult:
    return prune.prune(s.layout, int(args["keep"] or 5), emit)


def _op_install(s: Session, args: InstallArgs, emit: Emit) -> releases.InstallResult:
    """Install a release; on a host whose services run under the daemon backend, supervisord is
    started in the background as soon as its tool is in place, so a first deploy's switch does
    not wait for it (the switch then finds it answering, or waits for the same start). With
    ``preboot_web`` (the web service's spec), the release's web server starts as soon as the
    release dir and its venv are in place, loading its libraries while the rest installs and the
    release hook runs (preboot.py); a failed install stops it again."""
    backend = args.get("backend")
    web = args.get("preboot_web")
    rid = valid_release_id(args.get("release_id"))
    background: list[threading.Thread] = []
    if isinstance(web, dict):
        s.prebooted = rid

    def start_manager() -> None:
        services = _services()
        try:
            if services.choose_backend({"backend": backend}) == "daemon":
                services.sv.ensure_running(s.layout)
        except Exception:  # noqa: BLE001, S110 - the switch starts it again and reports why not
            pass

    def preboot() -> None:
        try:
            _services().preboot(s.layout, rid, web, backend, emit)
        except Exception:  # noqa: BLE001, S110 - an optimisation: the switch starts it anyway
            pass

    def start(target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        background.append(thread)

    def on_tools() -> None:
        if backend:
            start(start_manager, "start-supervisord")

    def on_placed() -> None:
        if backend and isinstance(web, dict) and web.get("preboot") is not False:
            for thread in background:  # supervisord first
                thread.join()
            start(preboot, "preboot-web")

    try:
        result = releases.install(s.layout, args, emit, on_tools, on_placed, s.venv_shells)
    except BaseException:
        for thread in background:
            thread.join()
        if isinstance(web, dict):
            _discard(s, rid, emit)
        raise
    for thread in background:
        thread.join()
    return result


def _discard(s: Session, rid: str, emit: Emit) -> None:
    """Stop a release's web server if it is not live (the preboot of a failed deploy)."""
    from . import services

    try:
        services.discard(s.layout, rid, emit)
    except Exception:  # noqa: BLE001, S110 - the next switch stops leftovers
        pass


def _op_mark(s: Session, args: MarkArgs, emit: Emit) -> ReleaseMeta:
    rid = valid_release_id(args["release_id"])
    result = releases.mark(s.layout, rid, str(args["state"]))
    s.prebooted = None if s.prebooted == rid else s.prebooted
    if args["state"] == "bad":  # a failed deploy: its early-started server must not linger
        _discard(s, rid, emit)
    return result


def _op_switch(s: Session, args: SwitchArgs, emit: Emit) -> SwitchResult:
    from . import services

    rid = valid_release_id(args["release_id"])
    spec = args["services"]
    if not isinstance(spec, dict):
        raise AgentError("switch: services spec missing", kind="usage")
    # Waits while the previous switch's after-switch still runs: a switch right after another
    # (a second rollback) may target the server that one is stopping.
    start_after_switch(s)
    held = services.hold_switch_lock(s.layout)
    try:
        result = services.switch(s.layout, rid, spec, emit, forget_later=True)
        releases.mark(s.layout, rid, "live")  # the one that was live becomes "previous"
    except BaseException:
        os.close(held)
        raise
    if not result.get("unchanged"):
        s.unrecorded = {"release": rid, "from": result.get("previous"), "at": utc_now()}
    s.prebooted = None if s.prebooted == rid else s.prebooted
    argv = [*agent_command(), "after-switch", str(s.layout.root), rid, *result.get("stopping", [])]
    s.after_switch = (argv, held)
    return result


def start_after_switch(s: Session) -> None:
    """Start the housekeeping of this session's last switch (``after-switch``: the old server's
    exit, a spare for the next release), holding the switch lock the session held since. Run
    when the session ends (or switches again): started at the switch, its processes competed
    for the host's CPU with the rest of the deploy (the prune, the unlock, another host's
    switch on a shared machine), which waited for none of them. A process of its own,
    detached, so no command waits for it either; it inherits the lock and holds it until it is
    done."""
    if s.after_switch is None:
        return
    argv, held = s.after_switch
    s.after_switch = None
    try:
        subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            pass_fds=(held,),
        )
    except OSError:  # best effort: the next switch stops what this one left running
        pass
    finally:
        os.close(held)


def _op_lock(s: Session, args: LockArgs, emit: Emit) -> LockTaken | LockRecord:
    holder = args["holder"]
    keep = bool(args["keep"])  # `shiplane lock`: held until unlock, by no process
    held = lock.acquire(
        s.layout, holder, float(args["wait"] or 0), emit, keep=keep, pause=s.controller_here
    )
    with s.lock_ops:
        if held.fd is not None or keep:
            lock.drop(s.lock_fd)  # a lock we held before is gone: its old flock means nothing
            s.lock_fd = held.fd
        s.holder = holder
    if held.broke is None:
        return held.record.copy()
    result: LockTaken = {**held.record, "broke": held.broke}
    # the ledger keeps it: the abandoned deploy left no entry of its own
    ledger.append(
        s.layout,
        {
            "event": "lock-broken",
            "holder": held.broke,
            "user": holder.get("user"),
            "controller": holder.get("host"),
        },
    )
    return result


def _op_heartbeat(s: Session, args: HeartbeatArgs, emit: Emit) -> LockRecord:
    holder = args["holder"] if isinstance(args["holder"], dict) else s.holder
    with s.lock_ops:
        return lock.heartbeat(s.layout, holder)


def _op_unlock(s: Session, args: UnlockArgs, emit: Emit) -> UnlockResult:
    holder = args["holder"] if isinstance(args["holder"], dict) else s.holder
    with s.lock_ops:
        result = lock.release(s.layout, holder, force=bool(args["force"]))
        if s.holder is not None and not lock.is_ours(lock.read(s.layout) or {}, s.holder):
            s.drop_lock()
    return result


def _op_releases(s: Session, args: ReleasesArgs, emit: Emit) -> ReleasesResult:
    return {
        "releases": releases.list_releases(s.layout),
        "current": releases.current_release(s.layout),
        "previous": releases.previous_release(s.layout),
    }


def _op_record(s: Session, args: RecordArgs, emit: Emit) -> LedgerEntry:
    entry = args["entry"]
    if not isinstance(entry, dict):
        raise AgentError("record: entry must be an object", kind="usage")
    s.unrecorded = None
    return ledger.append(s.layout, entry)


def settle_orphans(s: Session) -> None:
    """At the session's end, what its command left half-told (the controller was killed or cut
    off): a release it made live but never recorded gets a ledger entry of its own, so every
    release that went live is in the host's history; a release it installed with an early web
    server, but never switched to, has that server stopped (it would idle, shown as drift)."""
    if s.blob_server is not None:  # the deploy's peers fetch nothing more from a session gone
        s.blob_server.stop()
    if s.unrecorded is not None:
        ledger.append(
            s.layout,
            {
                "event": "switch",
                "outcome": "ok",
                **s.unrecorded,
                "note": "made live by a command that ended before recording it",
            },
        )
        s.unrecorded = None
    if s.prebooted is not None:
        _discard(s, s.prebooted, lambda event: None)
        s.prebooted = None
    start_after_switch(s)


def _op_history(s: Session, args: HistoryArgs, emit: Emit) -> HistoryResult:
    limit = args["limit"]
    return {"entries": ledger.read(s.layout, int(limit) if limit is not None else None)}


MAX_READ = 1 << 20


def _op_read_release_file(s: Session, args: ReadReleaseFileArgs, emit: Emit) -> ReleaseFile:
    """Read-only: one text file of a release (``shiplane plan`` diffs rendered config with it).

    The path is relative to the release dir; links (shared files) are followed but must stay
    under the deploy root. Missing file -> ``exists: false``."""
    rid = valid_release_id(args["release_id"])
    rel = store.safe_relpath(args["path"], "read_release_file")
    path = s.layout.release(rid) / rel
    real = os.path.realpath(path)
    if not real.startswith(os.path.realpath(s.layout.root) + os.sep):
        raise AgentError(f"read_release_file: {rel} leaves the deploy root", kind="usage")
    if not os.path.isfile(real):
        return {"exists": False}
    with open(real, "rb") as handle:
        data = handle.read(MAX_READ + 1)
    if len(data) > MAX_READ:
        raise AgentError(f"read_release_file: {rel} is larger than {MAX_READ} bytes", kind="usage")
    return {"exists": True, "content": data.decode("utf-8", "replace")}


HANDLERS: dict[str, Handler] = {
    "inventory": _op_inventory,
    "receive": _op_receive,
    "install": _op_install,
    "hook": _op_hook,
    "switch": _op_switch,
    "start": _op_start,
    "stop": _op_stop,
    "restart": _op_restart,
    "reload": _op_reload,
    "status": _op_status,
    "shutdown": _op_shutdown,
    "withdraw": _op_withdraw,
    "verify": _op_verify,
    "logs": _op_logs,
    "releases": _op_releases,
    "history": _op_history,
    "read_release_file": _op_read_release_file,
    "install_uv": _op_install_uv,
    "serve_blobs": _op_serve_blobs,
    "fetch_blobs": _op_fetch_blobs,
    "stop_serving": _op_stop_serving,
    "record": _op_record,
    "mark": _op_mark,
    "prune": _op_prune,
    "lock": _op_lock,
    "heartbeat": _op_heartbeat,
    "unlock": _op_unlock,
}


def serve(root: str, stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> int:
    """Run a session on stdin/stdout for the deploy root ``root``; returns the exit code."""
    session = Session(Layout(root), stdin or sys.stdin.buffer, stdout or sys.stdout.buffer)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, session.release_on_signal)
    try:
        session.serve()
    except BrokenPipeError:
        # The controller went away mid-op. As after EOF, a lock we hold is left abandoned (its
        # flock ends with this process): the next lock breaks it and says whose it was.
        return 0
    finally:
        settle_orphans(session)
    return 0
