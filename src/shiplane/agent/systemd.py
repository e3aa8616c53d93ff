"""The systemd backend: generated units, driven with ``systemctl`` (system, or ``--user``).

Units, for an app named ``demo``:

- ``demo-web@.service`` -- a template; the instance is the release id, so each release's gunicorn
  is ``demo-web@<id>.service`` on ``run/web-<id>.sock`` and blue and green run side by side.
- ``demo-front.socket`` owns the public port; ``demo-front.service`` is the builtin proxy, handed
  the listening socket by socket activation (``LISTEN_FDS``): the port outlives every process.
- ``demo-<worker>.service`` per worker service, rewritten with the live release id at each switch,
  with its stop signal (``KillSignal``) and grace period (``TimeoutStopSec``, then SIGKILL).

Every ExecStart goes through the agent's ``exec-env`` (the release's env file, its dir as cwd).
Output goes to the journal. As root the units are system units in ``/etc/systemd/system``;
as another user they are ``--user`` units in ``~/.config/systemd/user``, which keep running after
logout only with lingering (``loginctl enable-linger <user>``, reported by ``prepare``).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

from .backend import (
    Killed,
    ManagerState,
    ServiceStatus,
    ShutdownResult,
    WorkersResult,
    builtin_front,
    check_worker,
    front_argv,
    front_listen,
    graceful_timeout,
    unlink_quiet,
    web_argv,
    worker_argv,
)
from .errors import AgentError
from .paths import Layout
from .protocol import Emit, ServicesSpec, WebSpec, WorkerSpec

SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
# stands for the release id while a template is rendered (same length as a real id: the socket
# path length check holds), then replaced by the ``%i`` specifier
INSTANCE = "SHIPLANE_INSTANCE_0000000"
SYSTEMCTL_TIMEOUT = 600.0
UNIT_PREFIX_RE = re.compile(r"[^A-Za-z0-9_.-]")


def systemd_running() -> bool:
    """True on a host whose PID 1 is systemd (what ``sd_booted()`` checks)."""
    return os.path.isdir("/run/systemd/system")


def unit_prefix(spec: ServicesSpec | None) -> str:
    """``<app>-<stage>``, made safe for a unit name: two stages of one app on one host (staging
    beside prod on a small VM) get their own units."""
    parts = (spec.get("app"), spec.get("stage")) if spec else ()
    name = "-".join(str(part) for part in parts if part) or "app"
    return UNIT_PREFIX_RE.sub("-", name) or "app"


# --- unit text -------------------------------------------------------------------------------


def _quote(arg: str) -> str:
    """One ExecStart word: specifiers (``%``) and variables (``$``) escaped, quoted if needed."""
    if any(ch in arg for ch in "\n\r\0"):
        raise AgentError(f"value not allowed in a systemd unit: {arg!r}", kind="usage")
    text = arg.replace("%", "%%").replace("$", "$$")
    if text and not re.search(r"[\s\"'\\;]", text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def exec_line(argv: list[str]) -> str:
    """An ``ExecStart=`` value that systemd splits back into exactly ``argv``."""
    return " ".join(_quote(a) for a in argv).replace(INSTANCE, "%i")


def _path_value(path: Path | str) -> str:
    text = str(path)
    if any(ch in text for ch in "\n\r\0"):
        raise AgentError(f"path not allowed in a systemd unit: {text!r}", kind="usage")
    return text.replace("%", "%%")


def _unit(sections: list[tuple[str, list[tuple[str, object]]]]) -> str:
    lines = ["# written by shiplane: changed at every deploy, do not edit"]
    for title, items in sections:
        lines += ["", f"[{title}]"] + [f"{k}={v}" for k, v in items]
    return "\n".join(lines) + "\n"


def web_unit(
    layout: Layout, spec: ServicesSpec | None, user: bool = False, version_of: str | None = None
) -> str:
    """``<app>-<stage>-web@.service``: one release's gunicorn, the instance being the release id
    (gunicorn's options as ``version_of``'s gunicorn takes them)."""
    web = spec.get("web") if spec else None
    if not web:
        raise AgentError("services.web has no target (wsgi/asgi app)", kind="usage")
    return _web_unit(layout, unit_prefix(spec), web, user, version_of)


def _web_unit(layout: Layout, prefix: str, web: WebSpec, user: bool, version_of: str | None) -> str:
    argv = web_argv(layout, INSTANCE, web, version_of)
    return _unit(
        [
            (
                "Unit",
                [
                    ("Description", f"{prefix} web server (gunicorn), release %i"),
                    ("After", "network.target"),
                ],
            ),
            (
                "Service",
                [
                    ("Type", "simple"),
                    ("ExecStart", exec_line(argv)),
                    ("WorkingDirectory", _path_value(layout.root)),
                    # TERM to gunicorn's master only (its graceful shutdown), KILL to all after the grace
                    ("KillMode", "mixed"),
                    ("KillSignal", "SIGTERM"),
                    ("TimeoutStopSec", graceful_timeout(web) + 5),
                    ("Restart", "on-failure"),
                    ("RestartSec", "1"),
                    ("StandardOutput", "journal"),
                    ("StandardError", "journal"),
                    ("SyslogIdentifier", f"{prefix}-web"),
                ],
            ),
            ("Install", [("WantedBy", "default.target" if user else "multi-user.target")]),
        ]
    )


def front_socket_unit(spec: ServicesSpec | None, user: bool = False) -> str:
    """``<app>-<stage>-front.socket``: holds the public port for the front proxy."""
    return _unit(
        [
            ("Unit", [("Description", f"{unit_prefix(spec)} public port")]),
            (
                "Socket",
                [("ListenStream", front_listen(spec)), ("Backlog", "1024"), ("ReusePort", "no")],
            ),
            ("Install", [("WantedBy", "sockets.target")]),
        ]
    )


def front_service_unit(layout: Layout, spec: ServicesSpec | None, user: bool = False) -> str:
    """``<app>-<stage>-front.service``: the builtin proxy, reading its socket from ``LISTEN_FDS``."""
    prefix = unit_prefix(spec)
    return _unit(
        [
            (
                "Unit",
                [
                    ("Description", f"{prefix} front proxy"),
                    ("Requires", f"{prefix}-front.socket"),
                    ("After", f"{prefix}-front.socket"),
                ],
            ),
            (
                "Service",
                [
                    ("Type", "simple"),
                    ("ExecStart", exec_line(front_argv(layout, spec))),
                    ("WorkingDirectory", _path_value(layout.root)),
                    ("Restart", "on-failure"),
                    ("RestartSec", "1"),
                    ("TimeoutStopSec", "15"),
                    ("StandardOutput", "journal"),
                    ("StandardError", "journal"),
                    ("SyslogIdentifier", f"{prefix}-front"),
                ],
            ),
            ("Install", [("WantedBy", "default.target" if user else "multi-user.target")]),
        ]
    )


def worker_unit(
    layout: Layout,
    spec: ServicesSpec | None,
    name: str,
    worker: WorkerSpec | None,
    release_id: str,
    user: bool = False,
) -> str:
    """``<app>-<name>.service``: a worker on ``release_id``, its stop signal and grace period."""
    stop_signal, stop_timeout = check_worker(name, worker)
    prefix = unit_prefix(spec)
    return _unit(
        [
            (
                "Unit",
                [
                    ("Description", f"{prefix} {name} (release {release_id})"),
                    ("After", "network.target"),
                ],
            ),
            (
                "Service",
                [
                    ("Type", "simple"),
                    ("ExecStart", exec_line(worker_argv(layout, name, worker, release_id))),
                    ("WorkingDirectory", _path_value(layout.release(release_id))),
                    ("KillMode", "control-group"),
                    ("KillSignal", f"SIG{stop_signal}"),
                    ("TimeoutStopSec", f"{stop_timeout:g}"),
                    ("SendSIGKILL", "yes"),
                    ("Restart", "on-failure"),
                    ("RestartSec", "1"),
                    ("StandardOutput", "journal"),
                    ("StandardError", "journal"),
                    ("SyslogIdentifier", f"{prefix}-{name}"),
                ],
            ),
            ("Install", [("WantedBy", "default.target" if user else "multi-user.target")]),
        ]
    )


def render_units(
    layout: Layout, spec: ServicesSpec | None, release_id: str | None, user: bool = False
) -> dict[str, str]:
    """Every unit file of the spec: ``{file name: text}`` (workers only with a release)."""
    prefix = unit_prefix(spec)
    units = {f"{prefix}-web@.service": web_unit(layout, spec, user)}
    if builtin_front(spec):
        units[f"{prefix}-front.socket"] = front_socket_unit(spec, user)
        units[f"{prefix}-front.service"] = front_service_unit(layout, spec, user)
    if release_id is not None:
        for name, worker in _workers(spec).items():
            units[f"{prefix}-{name}.service"] = worker_unit(
                layout, spec, name, worker, release_id, user
            )
    return units


def _workers(spec: ServicesSpec | None) -> dict[str, WorkerSpec]:
    return (spec.get("workers") if spec else None) or {}


# --- the backend -----------------------------------------------------------------------------


class SystemdBackend:
    """Units in the system (root) or user unit dir, driven with ``systemctl``."""

    name = "systemd"

    def __init__(
        self,
        layout: Layout,
        spec: ServicesSpec | None,
        unit_dir: Path | None = None,
        user: bool | None = None,
    ) -> None:
        self.layout = layout
        self.spec: ServicesSpec | None = spec or None
        self.user = os.geteuid() != 0 if user is None else user
        if unit_dir is None:
            unit_dir = (Path.home() / ".config/systemd/user") if self.user else SYSTEM_UNIT_DIR
        self.unit_dir = unit_dir
        self.prefix = unit_prefix(self.spec)

    # systemctl ---------------------------------------------------------------------------------

    def systemctl_argv(self, *args: str) -> list[str]:
        return ["systemctl", *(["--user"] if self.user else []), *args]

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = self.systemctl_argv(*args)
        try:
            done = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=SYSTEMCTL_TIMEOUT,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise AgentError(f"{' '.join(argv)}: {exc}", kind="service") from None
        if check and done.returncode != 0:
            raise AgentError(
                f"{' '.join(argv)} exited {done.returncode}: "
                f"{(done.stderr or done.stdout).strip()}",
                kind="service",
            )
        return done

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, "--property=" + ",".join(props), check=False).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def web_unit_name(self, release_id: str) -> str:
        return f"{self.prefix}-web@{release_id}.service"

    def _write(self, name: str, text: str) -> bool:
        from .supervisor import write_if_changed

        return write_if_changed(self.unit_dir / name, text)

    # the interface -----------------------------------------------------------------------------

    def prepare(self, spec: ServicesSpec | None, emit: Emit) -> None:
        if not systemd_running():
            raise AgentError(
                'backend = "systemd" but systemd is not running on this host (no '
                '/run/systemd/system): use backend = "daemon" or "auto"',
                kind="usage",
            )
        if spec:
            self.spec = spec
        self.unit_dir.mkdir(parents=True, exist_ok=True)
        changed = False
        for name, text in render_units(self.layout, self.spec, None, self.user).items():
            if not name.endswith("-web@.service"):  # start_web writes it, for its release
                changed |= self._write(name, text)
        if changed:
            self.systemctl("daemon-reload")
        if self.user:
            linger = Path("/var/lib/systemd/linger") / os.environ.get("USER", "")
            if not linger.exists():
                emit(
                    {
                        "phase": "services",
                        "status": "warning",
                        "detail": "no lingering for this user: services stop at logout "
                        "(run `loginctl enable-linger` as root)",
                    }
                )

    def web_releases(self) -> set[str]:
        out = self.systemctl(
            "list-units",
            "--all",
            "--plain",
            "--no-legend",
            f"{self.prefix}-web@*.service",
            check=False,
        ).stdout
        head, tail = f"{self.prefix}-web@", ".service"
        found = set()
        for line in out.splitlines():
            unit = line.split()[0] if line.split() else ""
            if unit.startswith(head) and unit.endswith(tail):
                found.add(unit[len(head) : -len(tail)])
        return found

    def web_state(self, release_id: str) -> tuple[bool, str | None]:
        props = self.show(self.web_unit_name(release_id), "ActiveState", "SubState", "Result")
        state = props.get("ActiveState", "unknown")
        if state == "failed":
            return False, f"failed: {props.get('Result')}"
        return state == "active" and props.get("SubState") == "running", None

    def start_web(self, release_id: str, web: WebSpec, emit: Emit) -> None:
        unit = self.web_unit_name(release_id)
        text = _web_unit(self.layout, unit_prefix(self.spec), web, self.user, release_id)
        if self._write(f"{self.prefix}-web@.service", text):
            self.systemctl("daemon-reload")
        self.systemctl("reset-failed", unit, check=False)
        self.systemctl("enable", unit, check=False)  # comes back after a reboot
        self.systemctl("start", "--no-block", unit)

    def preboot_web(self, release_id: str, web: WebSpec, emit: Emit) -> None:
        """Not under systemd: a unit's ExecStart is one command, and its server starts at the
        switch (the daemon backend's preboot.py would need a go-ahead per instance)."""

    def web_booted(self, release_id: str) -> bool:
        return True

    def keep_spare(self, release_id: str, web: WebSpec, emit: Emit) -> None:
        """None under systemd (see preboot_web)."""

    def stop_web(self, release_id: str, emit: Emit, wait: bool = True) -> None:
        unit = self.web_unit_name(release_id)
        self.systemctl("disable", unit, check=False)
        # waits: TERM, graceful drain, KILL after TimeoutStopSec (a job already queued by a
        # --no-block stop is waited for the same way)
        self.systemctl("stop", *([] if wait else ["--no-block"]), unit)

    def wait_front(self, spec: ServicesSpec) -> None:
        """Nothing to wait for: systemd holds the front's socket from the start."""

    def ensure_front(self, spec: ServicesSpec, emit: Emit, wait: bool = True) -> None:
        sock, service = f"{self.prefix}-front.socket", f"{self.prefix}-front.service"
        if not builtin_front(spec):
            self.systemctl("disable", "--now", sock, service, check=False)
            for name in (sock, service):
                unlink_quiet(self.unit_dir / name)
            return
        self.systemctl("enable", "--now", sock)
        self.systemctl("enable", service, check=False)
        if self.show(service, "ActiveState").get("ActiveState") != "active":
            self.systemctl("start", service)

    def _stop_worker(self, unit: str, emit: Emit) -> Killed | None:
        props = self.show(unit, "ActiveState", "MainPID")
        if props.get("ActiveState") not in ("active", "activating", "reloading"):
            return None
        started = time.monotonic()
        self.systemctl("stop", unit)
        result = self.show(unit, "Result").get("Result")
        if result == "timeout":  # TimeoutStopSec ran out: systemd sent SIGKILL
            emit(
                {
                    "phase": "switch",
                    "status": "killed",
                    "detail": f"{unit} did not stop within its grace period: killed",
                }
            )
            return {
                "service": unit,
                "pid": int(props.get("MainPID") or 0),
                "seconds": round(time.monotonic() - started, 3),
            }
        return None

    def restart_workers(
        self, spec: ServicesSpec, release_id: str, emit: Emit, only: set[str] | None = None
    ) -> WorkersResult:
        workers = _workers(spec)
        killed: list[Killed] = []
        units = render_units(self.layout, spec, release_id, self.user)
        wanted = {f"{self.prefix}-{n}.service": n for n in workers}
        for path in self.unit_dir.glob(f"{self.prefix}-*.service"):
            text = path.read_text(encoding="utf-8", errors="replace")
            if (
                path.name not in units
                and "ExecStart=" in text
                and " exec-env " in text
                and "@" not in path.name
            ):
                gone = self._stop_worker(path.name, emit)
                killed += [gone] if gone else []
                self.systemctl("disable", path.name, check=False)
                unlink_quiet(path)
        changed = [u for u in wanted if self._write(u, units[u])]
        if changed:
            self.systemctl("daemon-reload")
        for unit, name in wanted.items():
            if unit in changed:
                gone = self._stop_worker(unit, emit)
                killed += [gone] if gone else []
            if only is None or name in only:
                self.systemctl("enable", unit, check=False)
                self.systemctl("start", unit)
        return {"workers": sorted(workers), "killed": killed}

    def stop(self, service: str, emit: Emit) -> list[str]:
        if service == "web":
            units = [self.web_unit_name(r) for r in sorted(self.web_releases())]
        elif service == "front":
            units = [f"{self.prefix}-front.service"]
        else:
            units = [f"{self.prefix}-{service}.service"]
        for unit in units:
            emit({"phase": "services", "status": "stop", "detail": unit})
            self.systemctl("stop", unit, check=False)
        return units

    def signal_web(self, release_id: str, signame: str) -> None:
        self.systemctl(
            "kill", "--kill-who=main", f"--signal=SIG{signame}", self.web_unit_name(release_id)
        )

    def status(self) -> list[ServiceStatus]:
        units = [self.web_unit_name(r) for r in sorted(self.web_releases())]
        units += [f"{self.prefix}-front.service"] if builtin_front(self.spec) else []
        units += [f"{self.prefix}-{n}.service" for n in sorted(_workers(self.spec))]
        entries: list[ServiceStatus] = []
        now = time.monotonic()
        for unit in units:
            props = self.show(
                unit,
                "ActiveState",
                "SubState",
                "MainPID",
                "ActiveEnterTimestampMonotonic",
                "LoadState",
            )
            if props.get("LoadState") == "not-found":
                continue
            running = props.get("SubState") == "running"
            since = int(props.get("ActiveEnterTimestampMonotonic") or 0) / 1e6
            name, release = unit[len(self.prefix) + 1 : -len(".service")], None
            if name.startswith("web@"):
                name, release = "web", name[len("web@") :]
            entries.append(
                {
                    "name": name,
                    "program": unit,
                    "pid": int(props.get("MainPID") or 0) or None,
                    "state": "RUNNING"
                    if running
                    else str(props.get("ActiveState", "unknown")).upper(),
                    "uptime": max(0, int(now - since)) if running and since else 0,
                    "release": release,
                }
            )
        return entries

    def running(self) -> ManagerState:
        return {
            "running": systemd_running(),
            "pid": 1 if not self.user else None,
            "manager": "systemd --user" if self.user else "systemd",
        }

    def shutdown(self) -> ShutdownResult:
        stopped = [e["program"] for e in self.status()]
        if builtin_front(self.spec):
            stopped.append(f"{self.prefix}-front.socket")
        for unit in stopped:
            self.systemctl("stop", unit, check=False)
        return {"stopped": stopped}

    def log_command(self, service: str) -> list[str] | None:
        unit = f"{self.prefix}-{'web@*' if service == 'web' else service}.service"
        return [
            "journalctl",
            *(["--user"] if self.user else []),
            "-u",
            unit,
            "--no-pager",
            "-o",
            "short-iso",
        ]
