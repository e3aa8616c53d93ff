"""The systemd backend: generated units, driven with ``systemctl`` (system, or ``--user``).

Units, for an app named ``demo``:

- ``demo-web@.service`` -- a template; the instance is the release id, so each release's gunicorn
  is ``demo-web@<id>.service`` on ``run/web-<id>.sock`` and blue and green run side by side.
- ``demo-front.socket`` owns the public port; ``demo-front.service`` is the builtin proxy, handed
  the listening socket by socket activation (``LISTEN_FDS``): the port outlives every process.
- ``demo-<worker>.service`` per worker service, rewritten with the live release id at each switch,
  with its stop signal (``KillSignal``) and grace period (``TimeoutStopSec``, then SIGKILL).
- ``demo-job.<name>.timer`` + ``.service`` per scheduled job (timers.py), on the primary host.

Every ExecStart goes through the agent's ``exec-env`` (the release's env file, its dir as cwd).
Output goes to the journal. As root the units are system units in ``/etc/systemd/system``, run as
the deploy root's owner (:func:`app_user`) and sandboxed (:func:`hardening`);
as another user they are ``--user`` units in ``~/.config/systemd/user``, which keep running after
logout only with lingering (``loginctl enable-linger <user>``, reported by ``prepare``).
"""

from __future__ import annotations

import functools
import grp
import os
import pwd
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from . import run_tool
from .backend import (
    Killed,
    ManagerState,
    ServiceStatus,
    ShutdownResult,
    WorkersResult,
    builtin_front,
    check_worker,
    exec_form,
    front_argv,
    front_listen,
    graceful_timeout,
    mark_proxy_protocol,
    unlink_quiet,
    web_argv,
    worker_argv,
)
from .errors import AgentError
from .paths import Layout
from .protocol import Emit, ServicesSpec, WebSpec, WorkerSpec
from .runtime import read_meta

SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
# stands for the release id while a template is rendered (same length as a real id: the socket
# path length check holds), then replaced by the ``%i`` specifier
INSTANCE = "SHIPLANE_INSTANCE_0000000"
SYSTEMCTL_TIMEOUT = 600.0
# past any worker's stop_timeout (at most 3600 s, config/schema.py): systemd KILLs before
WORKER_STOP_DEADLINE = 3600.0 + 60.0
UNIT_PREFIX_RE = re.compile(r"[^A-Za-z0-9_.-]")
# home directories: ProtectHome= hides them, so a deploy root or an interpreter there needs them
# read-only instead (ReadWritePaths= makes the deploy root writable again under them)
HOMES = ("/home", "/root", "/run/user")
ROOT_APP_WARNING = (
    "the app runs as root: give the deploy root to an unprivileged user "
    "(shiplane setup) and its services run as that user"
)

PARTIAL_SANDBOX_WARNING = (
    "the services run with a partial sandbox (no ProtectSystem=, PrivateTmp=...): this host "
    "does not let an unprivileged user make a user namespace, which systemd --user units need "
    "for them (Ubuntu 24.04: kernel.apparmor_restrict_unprivileged_userns=1); see "
    "docs/hosts.md"
)


def systemd_running() -> bool:
    """True on a host whose PID 1 is systemd (what ``sd_booted()`` checks)."""
    return os.path.isdir("/run/systemd/system")


def unit_prefix(spec: ServicesSpec | None) -> str:
    """``<app>-<stage>``, made safe for a unit name: two stages of one app on one host (staging
    beside prod on a small VM) get their own units."""
    parts = (spec.get("app"), spec.get("stage")) if spec else ()
    name = "-".join(str(part) for part in parts if part) or "app"
    return UNIT_PREFIX_RE.sub("-", name) or "app"


class AppUser(NamedTuple):
    """The unprivileged user (and its primary group) system units run the app as."""

    name: str  # a user name, or the uid when it has no passwd entry (systemd takes either)
    uid: int
    gid: int
    group: str


def app_user(layout: Layout) -> AppUser | None:
    """Who the app runs as when the agent is root: the deploy root's owner, unless that is root.

    No setting: whoever owns the deploy root (``shiplane setup`` gives it to a deploy user) is
    the app's user, so the app can write what it owns (``shared/``, ``run/``) and nothing else,
    and a root-owned deploy root keeps running the app as root (reported, ROOT_APP_WARNING).
    None as well when the agent is not root: its ``--user`` units run as itself already.
    """
    if os.geteuid() != 0:
        return None
    try:
        owner = os.stat(layout.root)
    except OSError:
        return None
    if owner.st_uid == 0:
        return None
    try:
        entry = pwd.getpwuid(owner.st_uid)
        name, gid = entry.pw_name, entry.pw_gid
    except KeyError:
        name, gid = str(owner.st_uid), owner.st_gid
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    return AppUser(name, owner.st_uid, gid, group)


def give_to_app_user(path: Path, app: AppUser | None) -> None:
    """``path`` (not followed if a link) belongs to the app's user: what the agent (root)
    writes for the app to read alone (its env file) or to write in (``run/``)."""
    if app is None:
        return
    st = os.lstat(path)
    if (st.st_uid, st.st_gid) != (app.uid, app.gid):
        os.chown(path, app.uid, app.gid, follow_symlinks=False)


def give_app_dirs(layout: Layout, app: AppUser | None) -> None:
    """What the app writes belongs to its user: ``run/`` (its sockets, the front's ready file),
    ``log/``, and ``shared/`` with whatever root made in it (the install's shared dirs and
    rendered files, a hook's migration that created the database). Only root-owned entries are
    given: another user's files stay theirs. Costs one lstat per entry of ``shared/``."""
    if app is None:
        return
    for path in (layout.run, layout.log):
        if path.is_dir() and not path.is_symlink():
            give_to_app_user(path, app)
    if not layout.shared.is_dir() or layout.shared.is_symlink():
        return
    give_to_app_user(layout.shared, app)
    for top, dirs, files in os.walk(layout.shared):
        for name in dirs + files:
            entry = os.path.join(top, name)
            try:  # the running app may remove files meanwhile
                if os.lstat(entry).st_uid == 0:
                    os.chown(entry, app.uid, app.gid, follow_symlinks=False)
            except FileNotFoundError:
                continue


@functools.lru_cache(maxsize=1)
def user_namespaces() -> bool:
    """Whether this user may make a user namespace and mount in it, as systemd's user manager
    does for a ``--user`` unit's sandbox (``PrivateUsers=``). Off where the kernel says so
    (``user.max_user_namespaces=0``, Debian's old ``kernel.unprivileged_userns_clone=0``) or
    AppArmor does (Ubuntu 24.04's ``kernel.apparmor_restrict_unprivileged_userns=1``): there a
    unit asking for one fails to start. Asked once per agent, of util-linux's ``unshare``."""
    try:
        done = subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "--", "true"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _under_home(path: Path | str) -> bool:
    text = os.path.realpath(str(path))
    return any(text == home or text.startswith(home + "/") for home in HOMES)


def hardening(
    layout: Layout, user: bool, run_as: AppUser | None, paths: tuple[Path | str, ...] = ()
) -> list[tuple[str, object]]:
    """The sandbox of every service unit (``systemd-analyze security`` rates the web unit "OK").

    As a system unit: ``User=``/``Group=`` the app's user (:func:`app_user`), no capabilities
    at all (the front's port is bound by its .socket unit, i.e. by systemd), the whole file
    system read-only but the deploy root (``ProtectSystem=strict``; what the app may write in
    it is what its user owns: ``shared/``, ``run/``, not the root-owned releases), a private
    /tmp and /dev, homes hidden (read-only when the deploy root, the agent's Python or the
    venv's interpreter, ``paths``, lie in one), the kernel and other users' processes out of
    reach, and only the system calls and socket families a Python web server uses.
    ``--user`` units get the same sandbox in a user namespace of their own (``PrivateUsers=``,
    how a user manager applies the namespace options) where the host allows one
    (:func:`user_namespaces`); elsewhere only what needs no privilege (seccomp, no new
    privileges), since the namespace options would fail the unit. A user unit's process holds
    no capabilities to bound.

    Not set: ``MemoryDenyWriteExecute`` (cffi and ctypes callbacks, gevent, numba and other JITs
    map writable code), ``ProcSubset=pid`` (metrics libraries read /proc/meminfo, /proc/stat),
    ``PrivateNetwork``/``IPAddressDeny`` (a web app talks to its database), ``RemoveIPC``
    (blue and green share a user: stopping one would remove the other's IPC objects),
    ``UMask=0027`` (nginx serves static and uploaded files as another user).
    """
    items: list[tuple[str, object]] = []
    if user and user_namespaces():
        items.append(("PrivateUsers", "yes"))
    elif run_as is not None:
        items += [("User", run_as.name), ("Group", run_as.group)]
    if not user or user_namespaces():
        homes = [layout.root, os.path.realpath(sys.executable), *paths]
        items += [
            ("ProtectSystem", "strict"),
            ("ReadWritePaths", path_word(layout.root)),
            ("ProtectHome", "read-only" if any(_under_home(p) for p in homes) else "yes"),
            ("PrivateTmp", "yes"),
            ("PrivateDevices", "yes"),
            ("ProtectKernelTunables", "yes"),
            ("ProtectKernelModules", "yes"),
            ("ProtectKernelLogs", "yes"),
            ("ProtectControlGroups", "yes"),
            ("ProtectClock", "yes"),
            ("ProtectHostname", "yes"),
            ("ProtectProc", "invisible"),
        ]
    if not user:
        items += [("CapabilityBoundingSet", ""), ("AmbientCapabilities", "")]
    items += [
        ("NoNewPrivileges", "yes"),
        ("RestrictNamespaces", "yes"),
        ("RestrictRealtime", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("LockPersonality", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("SystemCallArchitectures", "native"),
        ("SystemCallFilter", "@system-service"),
        ("SystemCallErrorNumber", "EPERM"),
    ]
    return items


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


def path_value(path: Path | str) -> str:
    text = str(path)
    if any(ch in text for ch in "\n\r\0"):
        raise AgentError(f"path not allowed in a systemd unit: {text!r}", kind="usage")
    return text.replace("%", "%%")


def path_word(path: Path) -> str:
    """A path as one word of a space-separated list of paths (``ReadWritePaths=``)."""
    text = path_value(path)
    if '"' in text or "\\" in text:
        raise AgentError(f"path not allowed in a systemd unit: {text!r}", kind="usage")
    return f'"{text}"' if re.search(r"\s", text) else text


def unit_file(sections: list[tuple[str, list[tuple[str, object]]]]) -> str:
    lines = ["# written by shiplane: changed at every deploy, do not edit"]
    for title, items in sections:
        lines += ["", f"[{title}]"] + [f"{k}={v}" for k, v in items]
    return "\n".join(lines) + "\n"


def web_unit(
    layout: Layout,
    spec: ServicesSpec | None,
    user: bool = False,
    version_of: str | None = None,
    run_as: AppUser | None = None,
) -> str:
    """``<app>-<stage>-web@.service``: one release's gunicorn, the instance being the release id
    (gunicorn's options as ``version_of``'s gunicorn takes them)."""
    web = spec.get("web") if spec else None
    if not web:
        raise AgentError("services.web has no target (wsgi/asgi app)", kind="usage")
    return _web_unit(layout, unit_prefix(spec), web, user, version_of, run_as)


def _venv_home(layout: Layout, release_id: str | None) -> tuple[str, ...]:
    """The directory of the interpreter the release's venv was made from (``pyvenv.cfg``)."""
    meta = read_meta(layout, release_id) if release_id else None
    digest = str((meta or {}).get("dependency_digest") or "")
    try:
        cfg = (layout.venv(digest) / "pyvenv.cfg").read_text(encoding="utf-8") if digest else ""
    except OSError:
        return ()
    for line in cfg.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "home" and value.strip():
            return (value.strip(),)
    return ()


def _web_unit(
    layout: Layout,
    prefix: str,
    web: WebSpec,
    user: bool,
    version_of: str | None,
    run_as: AppUser | None = None,
) -> str:
    argv = web_argv(layout, INSTANCE, web, version_of)
    return unit_file(
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
                    ("WorkingDirectory", path_value(layout.root)),
                    # TERM to gunicorn's master only (its graceful shutdown), KILL to all after the grace
                    ("KillMode", "mixed"),
                    ("KillSignal", "SIGTERM"),
                    ("TimeoutStopSec", graceful_timeout(web) + 5),
                    ("Restart", "on-failure"),
                    ("RestartSec", "1"),
                    ("StandardOutput", "journal"),
                    ("StandardError", "journal"),
                    ("SyslogIdentifier", f"{prefix}-web"),
                    *hardening(layout, user, run_as, _venv_home(layout, version_of)),
                ],
            ),
            ("Install", [("WantedBy", "default.target" if user else "multi-user.target")]),
        ]
    )


def front_socket_unit(spec: ServicesSpec | None, user: bool = False) -> str:
    """``<app>-<stage>-front.socket``: holds the public port for the front proxy."""
    return unit_file(
        [
            ("Unit", [("Description", f"{unit_prefix(spec)} public port")]),
            (
                "Socket",
                [("ListenStream", front_listen(spec)), ("Backlog", "1024"), ("ReusePort", "no")],
            ),
            ("Install", [("WantedBy", "sockets.target")]),
        ]
    )


def front_service_unit(
    layout: Layout, spec: ServicesSpec | None, user: bool = False, run_as: AppUser | None = None
) -> str:
    """``<app>-<stage>-front.service``: the builtin proxy, reading its socket from ``LISTEN_FDS``."""
    prefix = unit_prefix(spec)
    return unit_file(
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
                    ("WorkingDirectory", path_value(layout.root)),
                    ("Restart", "on-failure"),
                    ("RestartSec", "1"),
                    ("TimeoutStopSec", "15"),
                    ("StandardOutput", "journal"),
                    ("StandardError", "journal"),
                    ("SyslogIdentifier", f"{prefix}-front"),
                    *hardening(layout, user, run_as),
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
    run_as: AppUser | None = None,
) -> str:
    """``<app>-<name>.service``: a worker on ``release_id``, its stop signal and grace period."""
    stop_signal, stop_timeout = check_worker(name, worker)
    prefix = unit_prefix(spec)
    return unit_file(
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
                    ("WorkingDirectory", path_value(layout.release(release_id))),
                    # the stop signal to the worker alone when it is exec-ed (it drains its own
                    # children), else to every process; SIGKILL to all after the grace period
                    (
                        "KillMode",
                        "mixed"
                        if exec_form(worker["command"] if worker else "")
                        else "control-group",
                    ),
                    ("KillSignal", f"SIG{stop_signal}"),
                    ("TimeoutStopSec", f"{stop_timeout:g}"),
                    ("SendSIGKILL", "yes"),
                    ("Restart", "on-failure"),
                    ("RestartSec", "1"),
                    ("StandardOutput", "journal"),
                    ("StandardError", "journal"),
                    ("SyslogIdentifier", f"{prefix}-{name}"),
                    *hardening(layout, user, run_as, _venv_home(layout, release_id)),
                ],
            ),
            ("Install", [("WantedBy", "default.target" if user else "multi-user.target")]),
        ]
    )


def render_units(
    layout: Layout,
    spec: ServicesSpec | None,
    release_id: str | None,
    user: bool = False,
    run_as: AppUser | None = None,
) -> dict[str, str]:
    """Every unit file of the spec: ``{file name: text}`` (workers only with a release);
    system units run as ``run_as`` (:func:`app_user`), root when None."""
    prefix = unit_prefix(spec)
    units = {f"{prefix}-web@.service": web_unit(layout, spec, user, run_as=run_as)}
    if builtin_front(spec):
        units[f"{prefix}-front.socket"] = front_socket_unit(spec, user)
        units[f"{prefix}-front.service"] = front_service_unit(layout, spec, user, run_as)
    if release_id is not None:
        for name, worker in _workers(spec).items():
            units[f"{prefix}-{name}.service"] = worker_unit(
                layout, spec, name, worker, release_id, user, run_as
            )
    return units


def _workers(spec: ServicesSpec | None) -> dict[str, WorkerSpec]:
    return (spec.get("workers") if spec else None) or {}


# --- systemctl -------------------------------------------------------------------------------


def unit_dir_of(user: bool) -> Path:
    """Where the units go: the system's (root), else the user's."""
    return Path.home() / ".config/systemd/user" if user else SYSTEM_UNIT_DIR


def systemctl_argv(user: bool, *args: str) -> list[str]:
    return ["systemctl", *(["--user"] if user else []), *args]


def systemctl(
    user: bool, *args: str, check: bool = True, timeout: float = SYSTEMCTL_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run ``systemctl`` (``--user`` for ``user``); AgentError when ``check`` and it fails."""
    argv = systemctl_argv(user, *args)
    done = run_tool(argv, timeout=timeout, kind="service")
    if check and done.returncode != 0:
        raise AgentError(
            f"{' '.join(argv)} exited {done.returncode}: {(done.stderr or done.stdout).strip()}",
            kind="service",
        )
    return done


def show(user: bool, unit: str, *props: str) -> dict[str, str]:
    """Properties of ``unit`` (``systemctl show``)."""
    out = systemctl(user, "show", unit, "--property=" + ",".join(props), check=False).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


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
        self.unit_dir = unit_dir_of(self.user) if unit_dir is None else unit_dir
        self.prefix = unit_prefix(self.spec)
        # system units run the app as the deploy root's owner (app_user); --user units as us
        self.run_as = None if self.user else app_user(layout)

    # systemctl ---------------------------------------------------------------------------------

    def systemctl_argv(self, *args: str) -> list[str]:
        return systemctl_argv(self.user, *args)

    def systemctl(
        self, *args: str, check: bool = True, timeout: float = SYSTEMCTL_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        return systemctl(self.user, *args, check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        return show(self.user, unit, *props)

    def web_unit_name(self, release_id: str) -> str:
        return f"{self.prefix}-web@{release_id}.service"

    def _give_release(self, release_id: str) -> None:
        """The release's env file (0600: its secrets) and what the app writes go to the app's
        user, who reads them through exec-env; root-owned, the code stays read-only to it."""
        if self.run_as is None:
            return
        give_app_dirs(self.layout, self.run_as)
        env_file = self.layout.env_file(release_id)
        if env_file.exists():
            give_to_app_user(env_file, self.run_as)

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
        if not self.user and self.run_as is None:
            emit({"phase": "services", "status": "warning", "detail": ROOT_APP_WARNING})
        give_app_dirs(self.layout, self.run_as)
        changed = False
        units = render_units(self.layout, self.spec, None, self.user, self.run_as)
        for name, text in units.items():
            if not name.endswith("-web@.service"):  # start_web writes it, for its release
                changed |= self._write(name, text)
        if changed:
            self.systemctl("daemon-reload")
        if self.user and not user_namespaces():
            emit({"phase": "services", "status": "warning", "detail": PARTIAL_SANDBOX_WARNING})
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
        mark_proxy_protocol(self.layout, release_id, web)
        unit = self.web_unit_name(release_id)
        text = _web_unit(
            self.layout, unit_prefix(self.spec), web, self.user, release_id, self.run_as
        )
        self._give_release(release_id)
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
        # waits for its TimeoutStopSec, which may be longer than systemctl's usual wait
        self.systemctl("stop", unit, timeout=WORKER_STOP_DEADLINE)
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
        units = render_units(self.layout, spec, release_id, self.user, self.run_as)
        if workers:
            self._give_release(release_id)
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

    def ensure_jobs(self, spec: ServicesSpec, emit: Emit) -> list[str]:
        from . import timers

        return timers.ensure(self, spec, emit)

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
        # the jobs' timers (timers.py): a stopped stage runs no job either
        stopped += sorted(p.name for p in self.unit_dir.glob(f"{self.prefix}-job.*.timer"))
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
