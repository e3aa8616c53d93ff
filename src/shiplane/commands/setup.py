"""``shiplane setup`` and ``shiplane doctor``: a fresh server made ready for deploys, and a
read-only check that it is (issue 20).

``setup`` logs in to each host as the stage's ``setup_user`` (root, or a user with passwordless
sudo) with plain ``ssh`` (the stage's SSH settings, the same argv as every session's) and runs one
idempotent shell script there: the packages shiplane needs when missing, the unprivileged deploy
user, the controller's public key in its ``authorized_keys``, the deploy root owned by it, lingering
for its systemd ``--user`` units. Every later verb logs in as that user and runs nothing as root,
so no sudo rule is written: the narrowest rule is none.

``doctor`` logs in as the deploy user, as a deploy would, and only reads: each missing item comes
with the command that fixes it. Neither needs the agent (it lives in the deploy root, which may not
exist yet): both scripts are POSIX sh, every value in them validated and ``shlex.quote``d.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, TypeVar

from shiplane.commands.common import silent
from shiplane.config import Project, load_project, stage_of
from shiplane.config.loader import with_overrides
from shiplane.config.schema import LOGIN, Stage
from shiplane.errors import ConfigError, UsageError
from shiplane.fleet import Fleet
from shiplane.secret import Masker
from shiplane.transport import ConnectSettings, cleanup
from shiplane.transport.ssh import HOST, SSHTransport

T = TypeVar("T")
_LOGIN = re.compile(LOGIN)
# a public key line as authorized_keys takes it: type, base64 body (the comment is ours)
_PUBKEY = re.compile(
    r"^((?:ssh-[a-z0-9-]+|ecdsa-sha2-[a-z0-9-]+|sk-[a-z0-9@.-]+) [A-Za-z0-9+/]+={0,3})(?:\s.*)?$"
)
SETUP_TIMEOUT = 900.0  # seconds: package installs may download
DOCTOR_TIMEOUT = 60.0
MIN_FREE_MIB = 512  # free space under the deploy root below which doctor says so
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Step(TypedDict):
    step: str
    status: str  # ok | changed | failed
    detail: str


class HostSetup(TypedDict):
    ok: bool
    changed: bool
    user: str  # who logged in
    deploy_user: str
    steps: list[Step]


class SetupResult(TypedDict):
    """``setup``'s result; the CLI draws its lines (``ui.setup_lines``) and adds them for --json."""

    ok: bool
    stage: str
    local: bool  # the local stage: nothing to set up
    changed: bool
    key: str  # where the authorised public key came from
    hosts: dict[str, HostSetup]


class Check(TypedDict, total=False):
    check: str
    status: str  # ok | missing | skipped | info
    detail: str
    fix: str


class HostDoctor(TypedDict):
    ok: bool
    user: str  # who the host was reached as ("" when ssh chose and it could not log in)
    checks: list[Check]


class DoctorResult(TypedDict):
    """``doctor``'s result; the CLI draws its lines (``ui.doctor_lines``) and adds them for --json."""

    ok: bool
    stage: str
    missing: int
    hosts: dict[str, HostDoctor]


# -- the scripts ----------------------------------------------------------------------------------

# A Caddy dir several apps share (caddy.data_dir outside the deploy root): the deploy user's, 0700
# (docs/https.md, "Several apps on one host"). A dir holding another user's files is not taken.
_FRONT_DIR_SETUP = r"""
if [ -n "$FRONT_DIR" ]; then
  if [ -d "$FRONT_DIR" ]; then
    OWNER=$(stat -c %U "$FRONT_DIR")
    if [ "$OWNER" = "$DEPLOY_USER" ]; then
      say frontdir ok "$FRONT_DIR (caddy.data_dir) owned by $DEPLOY_USER"
    elif [ -z "$(ls -A "$FRONT_DIR" 2>/dev/null)" ]; then
      chown "$DEPLOY_USER:$GROUP" "$FRONT_DIR" && chmod 0700 "$FRONT_DIR" &&
        say frontdir changed "gave the empty $FRONT_DIR (caddy.data_dir) to $DEPLOY_USER"
    else
      say frontdir failed "$FRONT_DIR (caddy.data_dir) holds $OWNER's files: the apps sharing it deploy as one user (stop them with shiplane stop --all, then chown -R $DEPLOY_USER $FRONT_DIR)"
    fi
  elif [ -e "$FRONT_DIR" ]; then
    say frontdir failed "$FRONT_DIR (caddy.data_dir) exists and is not a directory"
  elif mkdir -p "$(dirname "$FRONT_DIR")" && install -d -m 0700 -o "$DEPLOY_USER" -g "$GROUP" "$FRONT_DIR"; then
    say frontdir changed "created $FRONT_DIR (caddy.data_dir; 0700, $DEPLOY_USER)"
  else
    say frontdir failed "could not make $FRONT_DIR (caddy.data_dir)"
  fi
fi
"""

_FRONT_DIR_DOCTOR = r"""
if [ -n "$FRONT_DIR" ]; then
  D=$FRONT_DIR
  while [ ! -e "$D" ]; do D=$(dirname "$D"); done
  if [ ! -e "$FRONT_DIR" ] && [ -d "$D" ] && [ -w "$D" ] && [ -x "$D" ]; then
    say frontdir ok "$FRONT_DIR (caddy.data_dir) does not exist yet: the first deploy makes it"
  elif [ ! -e "$FRONT_DIR" ]; then
    say frontdir missing "$FRONT_DIR (caddy.data_dir) does not exist, and $ME cannot make it"
  elif [ "$(stat -c %U "$FRONT_DIR")" != "$ME" ]; then
    say frontdir missing "$FRONT_DIR (caddy.data_dir) is owned by $(stat -c %U "$FRONT_DIR"), not $ME: the apps sharing it deploy as one user"
  else
    say frontdir ok "$FRONT_DIR (caddy.data_dir) owned by $ME"
  fi
fi
"""

_SETUP_SCRIPT = r"""
set -u
export DEBIAN_FRONTEND=noninteractive PATH={path}
DEPLOY_USER={deploy_user}
DEPLOY_ROOT={deploy_root}
STAGE={stage}
PUBKEY={pubkey}
PYTHON={python}
FRONT={front}
FRONT_DIR={front_dir}
LOW_PORTS={low_ports}
SYSTEMD={systemd}
SUDO_RULE={sudo_rule}
say() {{ printf 'step %s %s %s\n' "$1" "$2" "$3"; }}
last() {{ printf '%s' "$1" | tail -n 1; }}
if [ "$(id -u)" != 0 ]; then
  say root failed "setup runs as root: log in as root, or as a user with passwordless sudo"
  exit 0
fi
APT_UPDATED=
apt_install() {{
  command -v apt-get >/dev/null 2>&1 || {{ OUT="no apt-get on this host: install $* yourself"; return 1; }}
  if [ -z "$APT_UPDATED" ]; then apt-get update -q </dev/null >/dev/null 2>&1; APT_UPDATED=1; fi
  OUT=$(apt-get install -y -q --no-install-recommends "$@" </dev/null 2>&1)
}}
has_pkg() {{
  command -v dpkg-query >/dev/null 2>&1 || return 0
  dpkg-query -W -f='${{Status}}' "$1" 2>/dev/null </dev/null | grep -q 'install ok installed'
}}

# python3 with venv/ensurepip, 3.9 or later
py_ok() {{
  command -v "$PYTHON" >/dev/null 2>&1 &&
    "$PYTHON" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 9))' </dev/null >/dev/null 2>&1
}}
if py_ok && {{ [ "$PYTHON" != python3 ] || has_pkg python3-venv; }}; then
  say python ok "$("$PYTHON" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' </dev/null)"
elif [ "$PYTHON" != python3 ]; then
  say python failed "$PYTHON is missing, older than 3.9 or without venv: install it on this host"
elif apt_install python3 python3-venv && py_ok; then
  say python changed "installed python3 python3-venv"
else
  say python failed "python3 python3-venv: $(last "$OUT")"
fi

# the front's server, when the stage's front is one
if [ -n "$FRONT" ]; then
  if command -v "$FRONT" >/dev/null 2>&1; then
    say front ok "$(command -v "$FRONT")"
  elif apt_install "$FRONT"; then
    say front changed "installed $FRONT"
  else
    say front failed "$FRONT: $(last "$OUT")"
  fi
fi
# caddy listens on 80/443 itself, as the deploy user: the binary gets that one capability
if [ "$LOW_PORTS" = yes ] && command -v "$FRONT" >/dev/null 2>&1; then
  BIN=$(readlink -f "$(command -v "$FRONT")")
  command -v setcap >/dev/null 2>&1 || apt_install libcap2-bin >/dev/null 2>&1 || :
  if command -v getcap >/dev/null 2>&1 && getcap "$BIN" </dev/null | grep -q cap_net_bind_service; then
    say ports ok "$BIN may listen on ports below 1024"
  elif OUT=$(setcap cap_net_bind_service=+ep "$BIN" </dev/null 2>&1); then
    say ports changed "setcap cap_net_bind_service=+ep $BIN (ports below 1024 without root)"
  else
    say ports failed "setcap cap_net_bind_service=+ep $BIN: $(last "${{OUT:-no setcap}}")"
  fi
fi

# the deploy user
if id -u "$DEPLOY_USER" >/dev/null 2>&1; then
  if [ "$(id -u "$DEPLOY_USER")" = 0 ]; then
    say user failed "$DEPLOY_USER has uid 0: deploys must not run as root"
    exit 0
  fi
  say user ok "$DEPLOY_USER exists"
# password '*': none can match it, yet the account is not locked ('!'), which sshd without PAM
# refuses even for a key
elif OUT=$(useradd --system --create-home --shell /bin/bash --password '*' "$DEPLOY_USER" </dev/null 2>&1); then
  say user changed "created $DEPLOY_USER"
else
  say user failed "useradd $DEPLOY_USER: $(last "$OUT")"
  exit 0
fi
GROUP=$(id -gn "$DEPLOY_USER")
HOME_DIR=$(getent passwd "$DEPLOY_USER" | cut -d: -f6)

# owner and mode of a path, fixed when they differ; CHANGED says so
CHANGED=
own() {{
  if [ "$(stat -c '%U %a' "$1")" != "$DEPLOY_USER $2" ]; then
    chown "$DEPLOY_USER:$GROUP" "$1" && chmod "$2" "$1" && CHANGED="${{CHANGED:-fixed owner/mode of $1}}"
  fi
}}

# the controller's key
SSH_DIR="$HOME_DIR/.ssh"
AUTH="$SSH_DIR/authorized_keys"
KEYBODY=$(printf '%s' "$PUBKEY" | cut -d' ' -f1,2)
if [ -z "$HOME_DIR" ] || [ ! -d "$HOME_DIR" ]; then
  say key failed "$DEPLOY_USER has no home directory to hold ~/.ssh/authorized_keys"
  exit 0
fi
[ -d "$SSH_DIR" ] || {{ mkdir "$SSH_DIR"; CHANGED="created $SSH_DIR"; }}
own "$SSH_DIR" 700
if [ -f "$AUTH" ] && grep -qF -- "$KEYBODY" "$AUTH"; then
  :
else
  if [ -s "$AUTH" ] && [ -n "$(tail -c 1 "$AUTH")" ]; then echo >> "$AUTH"; fi
  printf '%s\n' "$PUBKEY" >> "$AUTH"
  CHANGED="authorised the key in $AUTH"
fi
own "$AUTH" 600
if [ -n "$CHANGED" ]; then say key changed "$CHANGED"; else say key ok "authorised in $AUTH"; fi

# the deploy root; a process of another user running from it: "pid user"
running_in() {{
  for P in /proc/[0-9]*; do
    C=$(readlink "$P/cwd" 2>/dev/null) || continue
    case "$C/" in
      "$1"/*)
        U=$(stat -c %U "$P" 2>/dev/null) || continue
        if [ "$U" != "$DEPLOY_USER" ]; then echo "pid ${{P#/proc/}}, $U"; return 0; fi ;;
    esac
  done
}}
CHANGED=
if [ -d "$DEPLOY_ROOT" ]; then
  OWNER=$(stat -c %U "$DEPLOY_ROOT")
  if [ "$OWNER" != "$DEPLOY_USER" ]; then
    BUSY=$(running_in "$DEPLOY_ROOT")
    if [ -n "$BUSY" ]; then
      say root failed "$DEPLOY_ROOT is owned by $OWNER, whose processes run from it ($BUSY): stop them first (shiplane stop --all --stage $STAGE, logging in as before)"
      exit 0
    elif [ -e "$DEPLOY_ROOT/releases" ] || [ -e "$DEPLOY_ROOT/current" ]; then
      chown -R "$DEPLOY_USER:$GROUP" "$DEPLOY_ROOT"
      CHANGED="owned by $OWNER: given to $DEPLOY_USER with everything in it"
    else
      chown "$DEPLOY_USER:$GROUP" "$DEPLOY_ROOT"
      CHANGED="owned by $OWNER: given to $DEPLOY_USER"
    fi
  fi
elif [ -e "$DEPLOY_ROOT" ]; then
  say root failed "$DEPLOY_ROOT exists and is not a directory"
  exit 0
else
  mkdir -p "$(dirname "$DEPLOY_ROOT")" && install -d -m 0750 -o "$DEPLOY_USER" -g "$GROUP" "$DEPLOY_ROOT"
  CHANGED="created $DEPLOY_ROOT (0750, $DEPLOY_USER)"
fi
if [ ! -d "$DEPLOY_ROOT" ] || [ "$(stat -c %U "$DEPLOY_ROOT")" != "$DEPLOY_USER" ]; then
  say root failed "could not give $DEPLOY_ROOT to $DEPLOY_USER"
elif [ -n "$CHANGED" ]; then
  say root changed "$CHANGED"
else
  say root ok "$DEPLOY_ROOT owned by $DEPLOY_USER"
fi
{front_dir_setup}
# systemd: the user's --user units run without a login
if [ "$SYSTEMD" = yes ] || {{ [ "$SYSTEMD" = auto ] && [ -d /run/systemd/system ]; }}; then
  if [ -e "/var/lib/systemd/linger/$DEPLOY_USER" ]; then
    say linger ok "$DEPLOY_USER's units run without a login"
  elif OUT=$(loginctl enable-linger "$DEPLOY_USER" </dev/null 2>&1); then
    say linger changed "loginctl enable-linger $DEPLOY_USER"
  else
    say linger failed "loginctl enable-linger $DEPLOY_USER: $(last "$OUT")"
  fi
fi

if [ "$SUDO_RULE" = none ]; then
  say sudo ok "no rule: a deploy runs nothing as root (the narrowest rule is none)"
else
  say sudo failed "$SUDO_RULE"
fi
"""

_DOCTOR_SCRIPT = r"""
set -u
export PATH={path}
ROOT={deploy_root}
PYTHON={python}
FRONT={front}
FRONT_DIR={front_dir}
LOW_PORTS={low_ports}
SYSTEMD={systemd}
PORT={port}
BIND={bind}
MIN_FREE_KB={min_free_kb}
say() {{ printf 'check %s %s %s\n' "$1" "$2" "$3"; }}
ME=$(id -un)
say login ok "$ME"

PY=
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  say python missing "no $PYTHON on this host"
else
  V=$("$PYTHON" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' </dev/null 2>/dev/null)
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 9))' </dev/null >/dev/null 2>&1; then
    say python missing "$PYTHON is ${{V:-unusable}}; shiplane needs 3.9 or later"
  elif ! "$PYTHON" -c 'import venv, ensurepip' </dev/null >/dev/null 2>&1; then
    say python missing "$PYTHON $V has no venv/ensurepip (Debian: python3-venv)"
  else
    say python ok "$V"
    PY=$PYTHON
  fi
fi

D=$ROOT
while [ ! -e "$D" ]; do D=$(dirname "$D"); done
if [ ! -e "$ROOT" ] && [ -d "$D" ] && [ -w "$D" ] && [ -x "$D" ]; then
  say root ok "$ROOT does not exist yet: the first deploy makes it ($D is writable by $ME)"
elif [ ! -e "$ROOT" ]; then
  say root missing "$ROOT does not exist, and $ME cannot make it"
elif [ ! -d "$ROOT" ]; then
  say root missing "$ROOT is not a directory"
elif [ "$(stat -c %U "$ROOT")" != "$ME" ]; then
  say root missing "$ROOT is owned by $(stat -c %U "$ROOT"), not $ME"
elif [ ! -w "$ROOT" ] || [ ! -x "$ROOT" ]; then
  say root missing "$ROOT is not writable by $ME"
else
  say root ok "$ROOT owned by $ME, writable"
fi
{front_dir_doctor}
FREE=$(df -Pk "$D" 2>/dev/null | awk 'NR == 2 {{ print $4 }}')
if [ -z "$FREE" ]; then
  say disk skipped "df cannot tell the free space under $D"
elif [ "$FREE" -lt "$MIN_FREE_KB" ]; then
  say disk missing "$((FREE / 1024)) MiB free under $D"
else
  say disk ok "$((FREE / 1024)) MiB free under $D"
fi

if [ -n "$FRONT" ]; then
  if command -v "$FRONT" >/dev/null 2>&1 || [ -x "/usr/sbin/$FRONT" ]; then
    say front ok "$FRONT installed"
  else
    say front missing "no $FRONT on this host (the stage's front)"
  fi
fi
if [ "$LOW_PORTS" = yes ] && [ "$ME" != root ] && command -v "$FRONT" >/dev/null 2>&1; then
  BIN=$(readlink -f "$(command -v "$FRONT")")
  if ! command -v getcap >/dev/null 2>&1; then
    say ports skipped "no getcap: cannot tell whether $BIN may listen on ports below 1024"
  elif getcap "$BIN" </dev/null | grep -q cap_net_bind_service; then
    say ports ok "$BIN may listen on ports below 1024"
  else
    say ports missing "$BIN may not listen on ports below 1024 as $ME"
  fi
fi

if [ "$ME" != root ] && {{ [ "$SYSTEMD" = yes ] || {{ [ "$SYSTEMD" = auto ] && [ -d /run/systemd/system ]; }}; }}; then
  if [ -e "/var/lib/systemd/linger/$ME" ]; then
    say linger ok "$ME's units run without a login"
  else
    say linger missing "$ME does not linger: its systemd --user units stop when it logs out"
  fi
  # the --user units' sandbox needs a user namespace (agent/systemd.py user_namespaces)
  if unshare --user --map-root-user --mount -- true </dev/null >/dev/null 2>&1; then
    say sandbox ok "$ME may make user namespaces: its units get the whole sandbox"
  else
    say sandbox info "$ME may not make user namespaces: its units run with a partial sandbox (docs/hosts.md)"
  fi
fi

if [ -n "$PORT" ]; then
  if [ -z "$PY" ]; then
    say port skipped "not checked without a usable $PYTHON"
  else
    STATE=$("$PY" -c '
import errno, socket, sys
port, bind = int(sys.argv[1]), sys.argv[2]
s = socket.socket(socket.AF_INET6 if ":" in bind else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind((bind, port))
except OSError as exc:
    print({{errno.EADDRINUSE: "taken", errno.EACCES: "denied"}}.get(exc.errno, "error"))
else:
    print("free")
' "$PORT" "$BIND" </dev/null 2>/dev/null)
    case "$STATE" in
      free) say port ok "$BIND:$PORT is free" ;;
      taken)
        if [ -e "$ROOT/current" ]; then say port ok "$BIND:$PORT is held (the app is deployed here)"
        else say port missing "$BIND:$PORT is taken by another process"; fi ;;
      denied) say port missing "$ME may not listen on port $PORT (below 1024)" ;;
      *) say port skipped "could not test $BIND:$PORT" ;;
    esac
  fi
fi
"""


def _q(value: object) -> str:
    return shlex.quote(str(value))


# -- stage and hosts ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stage:
    project: Project
    name: str
    stage: Stage

    @property
    def settings(self) -> ConnectSettings:
        """The stage's SSH settings, as every session's (``user``: its ``deploy_user``)."""
        return Fleet(self.project, self.name, silent).connect_settings()

    @property
    def python(self) -> str:
        return self.stage.python or self.project.deploy.app.python

    def python_on(self, host: str) -> str:
        """The interpreter on ``host``: its own (a table in ``hosts``), else the stage's."""
        return self.stage.python_of(host, self.project.deploy.app.python)

    @property
    def front(self) -> str:
        """The front's server binary the hosts need ("" for shiplane's own proxy)."""
        front = str(self.stage.front)
        return front if front in ("nginx", "caddy") else ""

    @property
    def front_dir(self) -> str:
        """A Caddy dir outside the deploy root (``caddy.data_dir``: shared by several apps)
        that setup gives the deploy user; "" when there is none."""
        data_dir = self.stage.caddy.data_dir if self.front == "caddy" else None
        if not data_dir or self.stage.is_local:
            return ""
        inside = os.path.normpath(data_dir).startswith(os.path.normpath(self.root) + "/")
        return "" if inside else os.path.normpath(data_dir)

    @property
    def low_ports(self) -> str:
        """'yes' when the front's own server listens below 1024 (caddy's 80/443)."""
        if self.front != "caddy":
            return "no"
        caddy = getattr(self.stage, "caddy", None)
        ports = (getattr(caddy, "http_port", 80), getattr(caddy, "https_port", 443))
        return "yes" if min(int(p) for p in ports) < 1024 else "no"

    @property
    def systemd(self) -> str:
        backend = str(self.stage.backend)
        return {"systemd": "yes", "daemon": "no"}.get(backend, "auto")

    @property
    def root(self) -> str:
        deploy_to = self.stage.deploy_to
        if self.stage.is_local and not os.path.isabs(os.path.expanduser(deploy_to)):
            return str((self.project.root / deploy_to).resolve())
        return os.path.expanduser(deploy_to) if self.stage.is_local else deploy_to

    def fix(self) -> str:
        return f"shiplane setup --stage {self.name}"


def _open(file: Path | None, stage: str | None, hosts: str | None, sets: Sequence[str]) -> _Stage:
    project = load_project(file)
    name = stage_of(project, stage)
    project = with_overrides(project, name, hosts, sets)
    return _Stage(project, name, project.deploy.stages[name])


def _split(host: str) -> tuple[str | None, str, str | None]:
    """(user, host, port) of a ``[user@]host[:port]`` spec (validated by the schema)."""
    match = HOST.match(host)
    if match is None:  # pragma: no cover - the schema refused it already
        raise ConfigError(f"host {host!r}: expected [user@]host[:port]")
    return match["user"], str(match["host"]), match["port"]


def _deploy_user(st: _Stage, host: str) -> str | None:
    """Who deploys to ``host`` log in as: the host's own user, else ``deploy_user``, else None
    (ssh's choice: ``~/.ssh/config``'s ``User``, or the controller's login)."""
    user, _, _ = _split(host)
    return user or st.stage.deploy_user


def _login_spec(host: str, user: str) -> str:
    _, address, port = _split(host)
    return f"{user}@{address}" + (f":{port}" if port else "")


def _each(hosts: Sequence[str], work: Callable[[str], T]) -> dict[str, T]:
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(hosts)))) as pool:
        return dict(zip(hosts, pool.map(work, hosts)))


def _run(
    transport: SSHTransport | None, argv: list[str], script: str, timeout: float
) -> tuple[int | None, str, str]:
    """Run ``script`` with ``argv`` (``sh -s``) on the host (``None``: this machine); (exit code,
    stdout, stderr); exit code None on a timeout."""
    command = argv if transport is None else transport.command_argv(argv, tty=False)
    try:
        done = subprocess.run(
            command,
            input=script,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        return None, "", f"no answer within {timeout:.0f} s"
    return done.returncode, done.stdout, done.stderr


def _parsed(stdout: str, kind: str) -> list[tuple[str, str, str]]:
    rows = []
    for line in stdout.splitlines():
        words = line.split(" ", 3)
        if len(words) >= 3 and words[0] == kind:
            rows.append((words[1], words[2], words[3] if len(words) > 3 else ""))
    return rows


# -- the public key -----------------------------------------------------------------------------


def _key_of_file(path: str) -> str | None:
    pub = Path(path + ".pub")
    try:
        text = pub.read_text(encoding="utf-8").strip() if pub.is_file() else ""
    except OSError:
        text = ""
    if not text and Path(path).is_file():
        try:
            derived = subprocess.run(
                ["ssh-keygen", "-y", "-f", path],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # no terminal: a key with a passphrase is no prompt
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        text = derived.stdout.strip() if derived.returncode == 0 else ""
    match = _PUBKEY.match(text.splitlines()[0]) if text else None
    return match[1] if match else None


def public_key(st: _Stage, probe: SSHTransport) -> tuple[str, str]:
    """(the key line to authorise, where it came from): the stage's ``identity_file``, else the
    first key ssh would offer this host (``ssh -G``'s ``identityfile``) that exists, else the
    first of ``ssh-add -L``."""
    if st.stage.identity_file:
        path = os.path.expanduser(st.stage.identity_file)
        key = _key_of_file(path)
        if key is None:
            raise ConfigError(
                f"stages.{st.name}.identity_file {st.stage.identity_file!r}: no public key "
                f"({path}.pub) and none derived from it"
            )
        return key, f"the stage's identity_file ({path})"
    for path in probe.config_values("identityfile"):
        path = os.path.expanduser(path)
        key = _key_of_file(path) if Path(path).exists() or Path(path + ".pub").exists() else None
        if key is not None:
            return key, f"{path}.pub (the first key ssh offers)"
    try:
        agent = subprocess.run(
            ["ssh-add", "-L"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        agent = None
    for line in agent.stdout.splitlines() if agent and agent.returncode == 0 else []:
        match = _PUBKEY.match(line.strip())
        if match:
            return match[1], "the ssh agent's first key (ssh-add -L)"
    raise ConfigError(
        "no public key to authorise for the deploy user",
        hint=f"Set identity_file in [stages.{st.name}], or make a key: ssh-keygen -t ed25519",
    )


# -- setup --------------------------------------------------------------------------------------


def _sudo_rule(st: _Stage) -> str:
    """'none' when a deploy as the deploy user needs no root, else why it still does."""
    nginx = getattr(st.stage, "nginx", None)
    if st.front == "nginx" and nginx is not None and nginx.conf is None:
        return (
            'front = "nginx" without nginx.conf reloads the host\'s nginx as root, which a deploy '
            "user cannot yet: use a private nginx (nginx.conf) or the builtin front"
        )
    return "none"


def run_setup(
    file: Path | None,
    stage: str | None,
    masker: Masker,
    *,
    as_user: str | None = None,
    hosts: str | None = None,
    sets: Sequence[str] = (),
) -> SetupResult:
    st = _open(file, stage, hosts, sets)
    if st.stage.is_local:
        return SetupResult(ok=True, stage=st.name, local=True, changed=False, key="", hosts={})
    setup_user = as_user or st.stage.setup_user
    if not _LOGIN.match(setup_user):
        raise UsageError(f"--as {setup_user!r}: expected a login name")
    users = {}
    for host in st.stage.hosts:
        user = _deploy_user(st, host)
        if user is None:
            raise ConfigError(
                f"stages.{st.name}: setup needs the deploy user's name",
                hint=f'Set deploy_user = "deploy" in [stages.{st.name}] (every verb then logs in '
                f"as it), or name it in hosts (deploy@{_split(host)[1]}).",
            )
        if user == "root":
            raise ConfigError(
                f"stages.{st.name}: host {host!r} logs in as root; setup makes an unprivileged "
                "deploy user",
                hint=f'Set deploy_user = "deploy" in [stages.{st.name}] and drop root@ from hosts.',
            )
        users[host] = user
    settings = st.settings
    transports = {
        host: SSHTransport.connect(_login_spec(host, setup_user), settings)
        for host in st.stage.hosts
    }
    try:
        key, source = public_key(st, next(iter(transports.values())))
        sudo = setup_user != "root"

        def one(host: str) -> HostSetup:
            script = _SETUP_SCRIPT.format(
                path=_q(_PATH),
                deploy_user=_q(users[host]),
                deploy_root=_q(st.root),
                stage=_q(st.name),
                pubkey=_q(f"{key} shiplane-{st.project.deploy.app.name}"),
                python=_q(st.python_on(host)),
                front=_q(st.front),
                front_dir=_q(st.front_dir),
                front_dir_setup=_FRONT_DIR_SETUP,
                low_ports=_q(st.low_ports),
                systemd=_q(st.systemd),
                sudo_rule=_q(_sudo_rule(st)),
            )
            argv = ["sudo", "-n", "sh", "-s"] if sudo else ["sh", "-s"]
            code, out, err = _run(
                transports[host], argv, script, SETUP_TIMEOUT + st.stage.connect_timeout
            )
            steps = [Step(step=s, status=v, detail=d) for s, v, d in _parsed(out, "step")]
            if not steps:
                steps = [
                    Step(
                        step="connect",
                        status="failed",
                        detail=_why(host, setup_user, transports[host], code, err, sudo),
                    )
                ]
            return HostSetup(
                ok=all(s["status"] != "failed" for s in steps),
                changed=any(s["status"] == "changed" for s in steps),
                user=setup_user,
                deploy_user=users[host],
                steps=steps,
            )

        per_host = _each(list(st.stage.hosts), one)
    finally:
        for transport in transports.values():
            transport.close()
        cleanup()
    ok = all(done["ok"] for done in per_host.values())
    changed = any(done["changed"] for done in per_host.values())
    return SetupResult(
        ok=ok, stage=st.name, local=False, changed=changed, key=source, hosts=per_host
    )


def _why(
    host: str, user: str, transport: SSHTransport, code: int | None, err: str, sudo: bool
) -> str:
    if code is None:
        return f"{host}: {err}"
    if code == 255:
        why = transport.explain_failure(code, err)
        if "Permission denied" in err:
            why += f" (setup logs in as {user}: --as USER names another, with passwordless sudo)"
        return why
    if sudo and ("sudo" in err or "password" in err):
        last = [line for line in err.strip().splitlines() if line.strip()][-1:] or ["refused"]
        return (
            f"sudo -n as {user} on {host}: {last[0]}; setup needs passwordless sudo "
            "(NOPASSWD) for that user, or --as root"
        )
    return f"{host}: the setup script exited {code}: {err.strip()[-300:]}"


# -- doctor -------------------------------------------------------------------------------------


def run_doctor(
    file: Path | None,
    stage: str | None,
    masker: Masker,
    *,
    hosts: str | None = None,
    sets: Sequence[str] = (),
) -> DoctorResult:
    st = _open(file, stage, hosts, sets)
    port = st.project.deploy.web_port(st.name)
    bind = st.stage.bind or ("127.0.0.1" if st.stage.is_local else "0.0.0.0")
    script = _DOCTOR_SCRIPT.format(
        path=_q(_PATH),
        deploy_root=_q(st.root),
        python="@@HOST_PYTHON@@",  # each host's own, below
        front=_q(st.front),
        front_dir=_q(st.front_dir),
        front_dir_doctor=_FRONT_DIR_DOCTOR,
        low_ports=_q(st.low_ports),
        systemd=_q(st.systemd),
        port=_q(port or ""),
        bind=_q(bind),
        min_free_kb=_q(MIN_FREE_MIB * 1024),
    )
    settings = st.settings
    transports: dict[str, SSHTransport | None] = {
        host: None if st.stage.is_local else SSHTransport.connect(host, settings)
        for host in st.stage.hosts
    }
    setup_able = st.stage.is_local or all(
        _deploy_user(st, h) not in (None, "root") for h in st.stage.hosts
    )

    def one(host: str) -> HostDoctor:
        transport = transports[host]
        own = script.replace("@@HOST_PYTHON@@", _q(st.python_on(host)), 1)
        code, out, err = _run(
            transport, ["sh", "-s"], own, DOCTOR_TIMEOUT + st.stage.connect_timeout
        )
        rows = _parsed(out, "check")
        if not rows:
            return HostDoctor(
                ok=False, user="", checks=[_unreachable(st, host, transport, code, err, setup_able)]
            )
        checks = [Check(check=c, status=s, detail=d) for c, s, d in rows]
        login = rows[0][2] if rows[0][0] == "login" else ""
        for check in checks:
            if check["status"] == "missing":
                check["fix"] = _fix(st, host, check["check"], login, setup_able)
                if check["check"] == "port" and "below 1024" in check["detail"]:
                    check["fix"] = (
                        f"set port in [stages.{st.name}] to 1024 or above (root's ports are "
                        'for a front such as nginx: front = "nginx")'
                    )
        if login == "root" and not st.stage.is_local:
            checks.append(
                Check(
                    check="user",
                    status="info",
                    detail="deploys log in as root; shiplane setup makes an unprivileged deploy user "
                    f'(deploy_user = "deploy" in [stages.{st.name}])',
                )
            )
        return HostDoctor(
            ok=all(c["status"] != "missing" for c in checks), user=login, checks=checks
        )

    try:
        per_host = _each(list(st.stage.hosts), one)
    finally:
        for transport in transports.values():
            if transport is not None:
                transport.close()
        cleanup()
    missing = sum("fix" in check for done in per_host.values() for check in done["checks"])
    ok = all(done["ok"] for done in per_host.values())
    return DoctorResult(ok=ok, stage=st.name, missing=missing, hosts=per_host)


def _unreachable(
    st: _Stage,
    host: str,
    transport: SSHTransport | None,
    code: int | None,
    err: str,
    setup_able: bool,
) -> Check:
    if transport is None or code is None:
        return Check(check="login", status="missing", detail=err.strip() or f"exit {code}", fix="")
    detail = transport.explain_failure(code, err)
    if "host key" in detail:
        fix = detail.rsplit(": ", 1)[-1]  # explain_failure ends with the ssh-keyscan command
    elif "Permission denied" in err:
        fix = st.fix() if setup_able else f"set deploy_user in [stages.{st.name}], then {st.fix()}"
    else:
        fix = f"check that {host} is up and reachable over SSH"
    return Check(check="login", status="missing", detail=detail, fix=fix)


def _fix(st: _Stage, host: str, check: str, login: str, setup_able: bool) -> str:
    setup = st.fix() if setup_able else f"set deploy_user in [stages.{st.name}], then {st.fix()}"
    if st.stage.is_local:
        setup = {
            "python": f"install Python 3.9 or later with venv as {st.python_on(host)}",
            "root": f"mkdir -p {_q(st.root)}",
        }.get(check, setup)
    port = st.project.deploy.web_port(st.name)
    return {
        "python": setup
        if st.python_on(host) == "python3"
        else f"install Python 3.9 or later with venv as {st.python_on(host)} on {host}",
        "disk": f"free space under {st.root} on {host} (shiplane prune --stage {st.name} removes old releases)",
        "port": f"stop what listens on port {port} on {host} (ss -ltnp 'sport = :{port}'), or set port in [stages.{st.name}]"
        + (" to 1024 or above" if port is not None and port < 1024 else ""),
    }.get(check, setup)


__all__ = ["DoctorResult", "SetupResult", "public_key", "run_doctor", "run_setup"]
