"""The caddy front's Caddy as a systemd unit, where the stage's services run under systemd: it is
then started at boot like the app's units (a Caddy the agent started itself would stay down
after a reboot until the next deploy) and restarted if it crashes.

One unit per Caddy dir, ``shiplane-caddy-<digest of the dir>.service``, a system unit when the
agent is root, else a ``--user`` unit (lingering makes it start at boot). It runs ``caddy run``
on the dir's Caddyfile, as the daemon backend's detached Caddy does (same environment, pid file
and ``caddy.stderr``), so everything else in agent/caddy.py (reload, certificates, status) works
the same way on both backends (docs/https.md).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from .backend import unlink_quiet
from .errors import AgentError
from .supervisor import write_if_changed
from .systemd import exec_line, path_value, path_word, show, systemctl, unit_dir_of, unit_file


def unit_name(data: Path) -> str:
    """The unit of the Caddy whose dir is ``data`` (several stages may share one)."""
    digest = hashlib.sha256(str(data).encode()).hexdigest()[:12]
    return f"shiplane-caddy-{digest}.service"


def caddy_argv(data: Path, conf: Path) -> list[str]:
    """``caddy run`` on ``conf``, its pid in the dir (how running_pid finds it)."""
    caddy = shutil.which("caddy")
    if caddy is None:
        raise AgentError("caddy is not installed (install Debian's caddy package)", kind="front")
    conf_args = ["--config", str(conf), "--adapter", "caddyfile"]
    return [caddy, "run", *conf_args, "--pidfile", str(data / "caddy.pid")]


def caddy_environment(data: Path) -> dict[str, str]:
    """What a Caddy of dir ``data`` runs with, however started: its state and config there."""
    return {
        "HOME": str(data),
        "XDG_DATA_HOME": str(data / "data"),
        "XDG_CONFIG_HOME": str(data / "config"),
    }


def unit_text(data: Path, conf: Path, user: bool) -> str:
    """The unit: ``Type=notify`` (Caddy tells systemd once it serves), its output appended to
    ``caddy.stderr`` as the detached Caddy's is, and a sandbox where the file system is
    read-only but its dir (it proxies to the apps' sockets, which connecting to needs no write
    access; as root it keeps only the capability to bind ports below 1024). A ``--user`` unit
    gets what needs no namespace."""
    writable = path_word(data)  # refuses a dir with a quote or backslash, for every line below
    output = f"append:{path_value(data / 'caddy.stderr')}"
    service: list[tuple[str, object]] = [
        ("Type", "notify"),
        ("ExecStart", exec_line(caddy_argv(data, conf))),
        ("WorkingDirectory", path_value(data)),
        *(
            ("Environment", f'"{key}={path_value(value)}"')
            for key, value in caddy_environment(data).items()
        ),
        ("StandardOutput", output),
        ("StandardError", output),
        ("Restart", "on-failure"),
        ("RestartSec", "2"),
        ("TimeoutStopSec", "30"),
        ("NoNewPrivileges", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("LockPersonality", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6 AF_NETLINK"),
    ]
    if not user:  # the namespace options: a user manager could not apply them (systemd.py)
        service += [
            ("ProtectSystem", "strict"),
            ("ReadWritePaths", writable),
            ("ProtectHome", "read-only"),
            ("PrivateTmp", "yes"),
            ("PrivateDevices", "yes"),
            ("ProtectKernelTunables", "yes"),
            ("ProtectKernelModules", "yes"),
            ("ProtectControlGroups", "yes"),
            ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
        ]
    return unit_file(
        [
            (
                "Unit",
                [
                    ("Description", f"Caddy of shiplane's caddy front ({path_value(data)})"),
                    ("Wants", "network-online.target"),
                    ("After", "network-online.target"),
                ],
            ),
            ("Service", service),
            ("Install", [("WantedBy", "default.target" if user else "multi-user.target")]),
        ]
    )


def start(data: Path, conf: Path, user: bool) -> str:
    """Install the dir's unit (a ``--user`` one for ``user``), enabled (started at boot), and
    start it; returns its name. A failed start is the caller's to explain from
    ``caddy.stderr``."""
    name = unit_name(data)
    units = unit_dir_of(user)
    units.mkdir(parents=True, exist_ok=True)
    if write_if_changed(units / name, unit_text(data, conf, user)):
        systemctl(user, "daemon-reload")
    systemctl(user, "reset-failed", name, check=False)
    systemctl(user, "enable", "--now", name)
    return name


def installed(data: Path) -> bool | None:
    """Whether the dir's unit is a ``--user`` one (True) or a system one (False); None when
    there is no unit (a Caddy the agent started itself, or none)."""
    for user in (False, True):
        if (unit_dir_of(user) / unit_name(data)).exists():
            return user
    return None


def failed(data: Path) -> bool:
    """True when the dir's unit has given up (its start failed)."""
    user = installed(data)
    return (
        user is not None
        and show(user, unit_name(data), "ActiveState").get("ActiveState") == "failed"
    )


def stop(data: Path) -> bool:
    """Stop and remove the dir's unit (systemd sends SIGTERM: Caddy's graceful stop); False
    when there is none."""
    user = installed(data)
    if user is None:
        return False
    name = unit_name(data)
    systemctl(user, "disable", "--now", name, check=False)
    unlink_quiet(unit_dir_of(user) / name)
    systemctl(user, "daemon-reload", check=False)
    return True
