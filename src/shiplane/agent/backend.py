"""The process-management backend interface, and the commands every backend runs.

A backend runs one web server per release (``web-<release_id>`` on ``run/web-<id>.sock``), the
front (the builtin proxy on the public port, unless nginx fronts the stage) and the worker
services. The daemon backend is one supervisord per deploy root (daemon.py); the systemd backend
generates units (systemd.py). switch.py drives either through :class:`Backend`, so a deploy, a
rollback and a restart do the same thing whichever backend runs the processes.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Protocol, TypedDict

from .errors import AgentError
from .paths import Layout, agent_command
from .protocol import Emit, JobSpec, ServicesSpec, WebSpec, WorkerSpec
from .runtime import read_meta

SIGNALS = {"TERM", "HUP", "INT", "QUIT", "KILL", "USR1", "USR2"}
# JOBS_PROGRAM: the daemon backend's scheduler of jobs (scheduler.py)
JOBS_PROGRAM = "shiplane-jobs"
RESERVED = {"web", "front", "supervisord", JOBS_PROGRAM}
# sun_path is 108 bytes on Linux, NUL included
MAX_SOCKET_PATH = 107


# --- what a backend answers ------------------------------------------------------------------


class _ServiceStatus(TypedDict):
    name: str  # the service: "web", "front" or a worker's name
    program: str  # the backend's own name: a supervisord program, a systemd unit
    pid: int | None
    state: str  # supervisord's state names (systemd's are mapped to them)
    uptime: int  # seconds
    release: str | None


class ServiceStatus(_ServiceStatus, total=False):
    """One process in ``status``; ``preboot`` from the backend (a web server waiting for its
    switch), ``live`` and ``standby`` (web servers) from services.status."""

    preboot: bool
    live: bool
    standby: bool


class Killed(TypedDict):
    """A worker that outlived its grace period when it was stopped, and was killed."""

    service: str
    pid: int
    seconds: float


class WorkersResult(TypedDict):
    workers: list[str]
    killed: list[Killed]


class _ManagerState(TypedDict):
    running: bool
    pid: int | None


class ManagerState(_ManagerState, total=False):
    """The process manager: supervisord (``{running, pid}``) or systemd (``manager`` too)."""

    manager: str


class ShutdownResult(TypedDict, total=False):
    stopped: list[str]
    supervisord_pid: int | None  # the daemon backend's


class Backend(Protocol):
    """What switch.py and services.py need from a process manager."""

    name: str

    def prepare(self, spec: ServicesSpec | None, emit: Emit) -> None:
        """Make the manager ready (supervisord running, units dir and daemon-reload)."""

    def web_releases(self) -> set[str]:
        """Release ids that have a web server configured or running."""

    def web_state(self, release_id: str) -> tuple[bool, str | None]:
        """(running, why it died for good or None) for the release's web server."""

    def start_web(self, release_id: str, web: WebSpec, emit: Emit) -> None:
        """Configure and start the release's web server; does not wait for it to answer."""

    def preboot_web(self, release_id: str, web: WebSpec, emit: Emit) -> None:
        """Start the release's web server early, loading its libraries but not the app
        (``start_web`` lets it go on); a no-op where the backend cannot."""

    def keep_spare(self, release_id: str, web: WebSpec, emit: Emit) -> None:
        """After a switch to ``release_id``: keep a spare server for the next release (spare.py);
        a no-op where the backend has none."""

    def web_booted(self, release_id: str) -> bool:
        """False while the release's server is a preboot waiting for its switch."""

    def stop_web(self, release_id: str, emit: Emit, wait: bool = True) -> None:
        """Stop the release's web server gracefully (TERM, then KILL after its grace) and
        forget it; ``wait=False`` only sends the stop (a later call with ``wait`` finishes)."""

    def ensure_front(self, spec: ServicesSpec, emit: Emit, wait: bool = True) -> None:
        """The builtin front runs as the spec says (or is removed when another front is used);
        ``wait=False`` returns before a front just started listens (``wait_front`` waits)."""

    def wait_front(self, spec: ServicesSpec) -> None:
        """Return once a front started by ``ensure_front(wait=False)`` listens (AgentError)."""

    def restart_workers(
        self, spec: ServicesSpec, release_id: str, emit: Emit, only: set[str] | None = None
    ) -> WorkersResult:
        """Worker services run ``release_id``; returns ``{workers: [names], killed: [...]}``,
        ``killed`` naming each worker that outlived its grace period and was killed."""

    def ensure_jobs(self, spec: ServicesSpec, emit: Emit) -> list[str]:
        """The spec's scheduled jobs are scheduled here (the daemon's scheduler program, systemd
        timers), and jobs it no longer has are not; returns the jobs' names (jobs.py)."""

    def stop(self, service: str, emit: Emit) -> list[str]:
        """Stop a user-facing service (``front``, ``web``, a worker); returns what stopped."""

    def signal_web(self, release_id: str, signame: str) -> None:
        """Send a signal to the release's web server (``HUP``: gunicorn replaces its workers)."""

    def status(self) -> list[ServiceStatus]:
        """One entry per process: name, program, pid, state, uptime, release."""

    def running(self) -> ManagerState:
        """The manager itself: ``{running, pid}`` (supervisord) or ``{running: True}``."""

    def shutdown(self) -> ShutdownResult:
        """Stop every service of this root (and the manager, when it is ours)."""

    def log_command(self, service: str) -> list[str] | None:
        """The command that prints a service's log, when it is not a file under ``log/``."""


# --- the commands (the same under every backend) -----------------------------------------------


def web_argv(
    layout: Layout, release_id: str, web: WebSpec, version_of: str | None = None
) -> list[str]:
    """The release's gunicorn on ``run/web-<id>.sock``, through ``exec-env`` (its env file).

    ``version_of``: the release whose gunicorn version decides the options (a systemd template
    is rendered for a placeholder release id)."""
    return [
        *agent_command(),
        "exec-env",
        str(layout.root),
        release_id,
        "--",
        *gunicorn_argv(layout, release_id, web, version_of),
    ]


def preboot_argv(layout: Layout, release_id: str, web: WebSpec) -> list[str] | None:
    """The same gunicorn through ``preboot.py`` (libraries first, the app once ``run/web-<id>.go``
    exists), run by the release venv's Python; None when ``preboot`` is off or there is no venv."""
    if web.get("preboot") is False:
        return None
    meta = read_meta(layout, release_id) or {}
    digest = str(meta.get("dependency_digest") or "")
    python = layout.venv(digest) / "bin" / "python" if digest else None
    if python is None or not python.exists():
        return None
    return [
        str(python),
        str(Path(__file__).with_name("preboot.py")),
        str(layout.root),
        release_id,
        "--",
        *gunicorn_argv(layout, release_id, web),
    ]


def web_go(layout: Layout, release_id: str) -> Path:
    """The switch's go-ahead to a preboot server (preboot.py's ``go_path``: the same path)."""
    return layout.run / f"web-{release_id}.go"


def web_wake(layout: Layout, program: str) -> Path:
    """The FIFO a waiting preboot or spare sleeps on (preboot.py's ``wake_path``)."""
    return layout.run / f"{program}.wake"


def wake_fifos(layout: Layout) -> list[Path]:
    """Every waiting server's FIFO (``web_wake``) in the deploy root."""
    try:
        return sorted(layout.run.glob("*.wake"))
    except OSError:
        return []


def make_wake(fifo: Path) -> None:
    """The FIFO, made by the agent before the server starts (the server makes it too, if gone)."""
    try:
        os.mkfifo(fifo, 0o600)
    except FileExistsError:
        pass


def poke(fifo: Path) -> None:
    """Wake the server waiting on ``fifo``; nothing when none waits (it checks before it sleeps)."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # no FIFO, or no reader yet
        return
    try:
        os.write(fd, b"!")
    except OSError:
        pass
    finally:
        os.close(fd)


def web_gave_up(layout: Layout, release_id: str) -> Path:
    """Written by preboot.py when gunicorn gave up (exit 3 or 4; its ``gave_up_path``)."""
    return layout.run / f"web-{release_id}.gaveup"


def gunicorn_argv(
    layout: Layout, release_id: str, web: WebSpec, version_of: str | None = None
) -> list[str]:
    sock = layout.release_socket(release_id)
    if len(str(sock).encode()) > MAX_SOCKET_PATH:
        raise AgentError(
            f"the socket path {sock} is longer than {MAX_SOCKET_PATH} bytes "
            f"(a unix socket limit): use a shorter deploy_to",
            kind="usage",
        )
    argv = [
        "gunicorn",
        "--bind",
        f"unix:{sock}",
        # here, followed by "--workers": gunicorn's --proxy-protocol takes an optional value
        # (a mode, since 23), and would take the app's target for one
        *client_address_options(web),
        "--workers",
        str(int(web.get("workers") or 2)),
        "--timeout",
        str(int(web.get("timeout") or 30)),
        "--graceful-timeout",
        str(graceful_timeout(web)),
    ]
    if gunicorn_major(layout, version_of or release_id) >= 27:
        # gunicorn 27 opens a control socket in ~/.gunicorn by default; blue and green would fight
        # over that one path, so each release gets its own next to its web socket
        argv += ["--control-socket", str(layout.run / f"web-{release_id}.ctl")]
    worker_class = web.get("worker_class")
    if not worker_class and web.get("kind") == "asgi":
        worker_class = "uvicorn.workers.UvicornWorker"
    if worker_class:
        argv += ["-k", str(worker_class)]
    argv += server_options(web)
    target = web.get("target")
    if not target:
        raise AgentError("services.web has no target (wsgi/asgi app)", kind="usage")
    argv.append(str(target))
    return argv


def server_options(web: WebSpec) -> list[str]:
    """gunicorn's options from ``[services.web]``'s own keys, then its pass-through ``options``
    (checked against gunicorn's names when the deploy file was loaded)."""
    argv: list[str] = []
    for value, flag in (
        (web.get("threads"), "--threads"),
        (web.get("max_requests"), "--max-requests"),
        (web.get("max_requests_jitter"), "--max-requests-jitter"),
        (web.get("keepalive"), "--keep-alive"),
        (web.get("forwarded_allow_ips"), "--forwarded-allow-ips"),
    ):
        if value is not None:
            argv.append(f"{flag}={value}")
    if web.get("access_log"):
        argv.append("--access-logfile=-")  # to stdout: the service's log
    return argv + [str(option) for option in web.get("options") or []]


THREAD_WORKER = "gunicorn.workers.gthread.ThreadWorker"
# gunicorn's workers that parse HTTP with gunicorn's own parser (and so read a PROXY line)
PROXY_PROTOCOL_WORKERS = frozenset(
    {
        "sync",
        "gthread",
        "gevent",
        "eventlet",
        "gunicorn.workers.sync.SyncWorker",
        THREAD_WORKER,
        "gunicorn.workers.ggevent.GeventWorker",
        "gunicorn.workers.geventlet.EventletWorker",
    }
)


UVICORN_WORKERS = frozenset({"uvicorn.workers.UvicornWorker", "uvicorn_worker.UvicornWorker"})


def speaks_proxy_protocol(web: WebSpec | None) -> bool:
    """Whether the builtin front passes the client's address as a PROXY protocol line: the
    stage's front is the builtin proxy and the web server's workers read that line (gunicorn's
    own; uvicorn's do not, and would answer 400)."""
    if not web or (web.get("front") or "builtin") != "builtin":
        return False
    worker_class = web.get("worker_class")
    if not worker_class:
        return web.get("kind") != "asgi"  # sync; an ASGI app gets uvicorn's workers
    return str(worker_class) in PROXY_PROTOCOL_WORKERS


def uvicorn_reads_proxy_protocol(web: WebSpec | None) -> bool:
    """Whether the release's uvicorn workers are to be taught PROXY lines by preboot.py (its
    ``read_proxy_lines``), behind the builtin front: preboot then marks the server itself, once
    the lesson took, so a uvicorn it could not teach never gets a line (docs/proxies.md)."""
    if not web or (web.get("front") or "builtin") != "builtin" or web.get("preboot") is False:
        return False
    worker_class = web.get("worker_class")
    if not worker_class:
        return web.get("kind") == "asgi"
    return str(worker_class) in UVICORN_WORKERS


def proxy_marker(layout: Layout, release_id: str) -> Path:
    """Beside a release's socket: present when its server reads PROXY protocol lines."""
    return layout.run / f"web-{release_id}.sock.proxy"


def mark_proxy_protocol(layout: Layout, release_id: str, web: WebSpec) -> None:
    """Say, before its server takes traffic, whether it reads PROXY lines: the builtin front
    sends one only to a server so marked (agent/proxy.py), so a server started by an earlier
    shiplane, or with uvicorn's workers, never gets a line it would answer 400 to — and the
    front's own command line is the same whatever the worker kind (no front restart)."""
    marker = proxy_marker(layout, release_id)
    if speaks_proxy_protocol(web):
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    else:
        unlink_quiet(marker)


def client_address_options(web: WebSpec) -> list[str]:
    """How the client's address and scheme reach the app (docs/proxies.md): from the builtin
    front, a PROXY protocol line (``--proxy-protocol``: with none, gunicorn takes the connection
    as it is, so health checks on the socket need none); from nginx or Caddy, their
    X-Forwarded-For/-Proto, which they set themselves (a client's are dropped). gunicorn trusts
    forwarded headers from any unix-socket peer; uvicorn's workers see no address on a unix
    socket and so trust none unless told ``*``: only the front can connect to the socket."""
    if speaks_proxy_protocol(web):
        threaded = str(web.get("worker_class") or "") in ("gthread", THREAD_WORKER) or (
            not web.get("worker_class") and int(web.get("threads") or 1) > 1
        )
        if threaded and web.get("keepalive") is None:
            # gthread reads the PROXY line into the first request of a connection only (gunicorn
            # 27): a keep-alive connection's later requests would have no REMOTE_ADDR
            return ["--proxy-protocol", "--keep-alive=0"]
        return ["--proxy-protocol"]
    if uvicorn_reads_proxy_protocol(web):
        # uvicorn's workers ignore gunicorn's flag; preboot.py reads it as "teach them PROXY
        # lines", and nobody's X-Forwarded-* is believed: the address is the PROXY line's
        own = web.get("forwarded_allow_ips") is not None  # server_options passes the user's
        return ["--proxy-protocol"] if own else ["--proxy-protocol", "--forwarded-allow-ips="]
    front = web.get("front") or "builtin"
    if front != "builtin" and web.get("forwarded_allow_ips") is None:
        return ["--forwarded-allow-ips=*"]
    return []


def graceful_timeout(web: WebSpec) -> int:
    """Seconds gunicorn gives in-flight requests after TERM; the manager KILLs 5 s later."""
    return int(web.get("graceful_timeout") or 20)


def gunicorn_major(layout: Layout, release_id: str) -> int:
    """The major version of gunicorn in the release's venv (0 when unknown)."""
    meta = read_meta(layout, release_id) or {}
    if not meta:
        return 0
    venv = layout.venv(str(meta.get("dependency_digest") or "none"))
    for info in venv.glob("lib/python*/site-packages/gunicorn-*.dist-info"):
        version = info.name[len("gunicorn-") : -len(".dist-info")]
        head = version.split(".")[0]
        if head.isdigit():
            return int(head)
    return 0


def check_worker(name: str, worker: WorkerSpec | None) -> tuple[str, float]:
    """A worker's (stop signal without ``SIG``, stop timeout) after checking name and command."""
    if name in RESERVED or name.startswith("web-"):
        raise AgentError(f"service name {name!r} is reserved", kind="usage")
    if not worker or not worker.get("command"):
        raise AgentError(f"service {name!r} has no command", kind="usage")
    stop_signal = str(worker.get("stop_signal") or "TERM").upper().removeprefix("SIG")
    if stop_signal not in SIGNALS:
        raise AgentError(f"service {name!r}: unknown stop_signal {stop_signal!r}", kind="usage")
    return stop_signal, float(worker.get("stop_timeout") or 10)


# what makes a command more than one simple command, or one that must run in the shell itself
_CONTROL = re.compile(r"^[;&|()]+$")
_SHELL_ONLY = {"cd", ".", "source", "set", "export", "eval", "trap", "ulimit", "umask", "exec"}
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def exec_form(command: str) -> str | None:
    """``exec <command>`` when ``command`` is one simple command (``rq worker --url
    $REDIS_URL``), else None (a list, a pipeline, a subshell, leading assignments).

    Debian's sh does not exec the last command of ``sh -c``: the worker would be the shell's
    child, and its stop signal would reach the shell alone (or, sent to the process group, every
    process of the worker: RQ's work horse and Celery's pool children die on a TERM meant for
    their parent, killing the job they run). With ``exec`` the worker is the process its manager
    signals, and it stops its own children gracefully (docs/workers.md)."""
    if "\n" in command:
        return None
    try:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
    except ValueError:  # unbalanced quotes: the shell reports it
        return None
    if not words or words[0] in _SHELL_ONLY or _ASSIGNMENT.match(words[0]):
        return None
    if any(_CONTROL.match(word) for word in words):
        return None
    return f"exec {command}"


def worker_argv(layout: Layout, name: str, worker: WorkerSpec | None, release_id: str) -> list[str]:
    """``sh -c <command>`` in the release dir with its env (``exec``-ed when it is one simple
    command: :func:`exec_form`)."""
    check_worker(name, worker)
    command = worker["command"] if worker else ""  # check_worker refused one without a command
    command = exec_form(command) or command
    return [
        *agent_command(),
        "exec-env",
        str(layout.root),
        release_id,
        "--",
        "/bin/sh",
        "-c",
        str(command),
    ]


def scheduler_argv(layout: Layout) -> list[str]:
    """The daemon backend's scheduler of jobs (scheduler.py)."""
    return [*agent_command(), "jobs", str(layout.root)]


def run_job_argv(layout: Layout, name: str) -> list[str]:
    """One run of a job now (jobs.py); a systemd timer's service runs this."""
    return [*agent_command(), "run-job", str(layout.root), name]


def job_specs(spec: ServicesSpec | None) -> dict[str, JobSpec]:
    """The jobs this host runs (a spec of an older controller has none), each checked."""
    from .jobs import check_job

    jobs = dict((spec.get("jobs") if spec else None) or {})
    for name, job in jobs.items():
        check_job(name, job)
    return jobs


def front_listen(spec: ServicesSpec | None) -> str:
    """``HOST:PORT`` (``[v6]:PORT``) the front listens on."""
    web = spec.get("web") if spec else None
    bind = str((web and web.get("bind")) or "127.0.0.1")
    port = int((web and web.get("port")) or 8000)
    return f"[{bind}]:{port}" if ":" in bind else f"{bind}:{port}"


def front_argv(layout: Layout, spec: ServicesSpec | None) -> list[str]:
    """The builtin proxy from the public port to ``run/web.sock``."""
    return [
        *agent_command(),
        "proxy",
        "--listen",
        front_listen(spec),
        "--upstream",
        str(layout.web_socket),
        "--ready",
        str(front_ready(layout)),
        # a PROXY line to the servers that read one (mark_proxy_protocol)
        "--proxy-protocol",
    ]


def front_ready(layout: Layout) -> Path:
    """Where the builtin proxy writes its pid once it listens (the port may be someone else's)."""
    return layout.run / "front.ready"


def builtin_front(spec: ServicesSpec | None) -> bool:
    """Whether the stage's front is the builtin proxy, which the backend runs as its ``front``
    service (fronts.py has every front, by name; None: no spec, the default front)."""
    from .fronts import front_for  # fronts.py imports the fronts' modules, which import this one

    return front_for(spec).supervised


def unlink_quiet(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
