"""The caddy front (``front = "caddy"``, or a stage with ``domains``): HTTPS with certificates
from an ACME CA, in a private Caddy.

The stage's Caddy runs from ``<data_dir>`` (default ``<root>/caddy``, 0700): its Caddyfile, its
admin API on a unix socket (``admin.sock``, so that stages and the host's own Caddy never share
``localhost:2019``), its state (``data/``: the ACME account and the certificates; Caddy writes
keys 0600 in 0700 dirs) and its log (``caddy.log``, rolled by Caddy). It listens on
``https_port`` (443) and ``http_port`` (80): HTTP answers ACME HTTP-01 challenges and redirects
everything else to HTTPS (Caddy's automatic HTTPS); HTTPS proxies to ``run/web.sock``, the
symlink a switch renames. Caddy dials that path per connection (``keepalive off``: no pooled
connection to an old release) and retries a refused or reset connection for up to
``lb_try_duration``, so a switch needs no reload. A changed Caddyfile is loaded with ``caddy
reload`` (Caddy swaps its config without closing a listener); an unchanged one does nothing.

Caddy obtains and renews the certificates itself (renewal starts a third of the lifetime before
expiry; the old certificate serves until the new one is in place). After a start or reload the
front waits, up to ``issue_timeout`` seconds, until each domain completes a TLS handshake on
127.0.0.1 with its own name (SNI); when Caddy logs that an attempt failed, or the time is up, an
``AgentError(kind="front")`` names the domain, Caddy's reason and the usual fix.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

from . import atomic_write, pid_alive
from .errors import AgentError
from .paths import Layout
from .protocol import CaddySpec, Emit, ServicesSpec

CADDY_TIMEOUT = 60.0  # a caddy CLI command (reload, version)
START_TIMEOUT = 30.0  # caddy run until its admin socket answers
STOP_TIMEOUT = 30.0
POLL = 0.2  # poll interval while waiting for Caddy or a certificate
LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LOG_TAIL = 4000


def settings(spec: ServicesSpec) -> CaddySpec:
    """The stage's ``caddy`` settings; a spec without them is a usage error."""
    cfg = spec.get("caddy")
    if not isinstance(cfg, dict) or not cfg.get("domains"):
        raise AgentError('front "caddy" needs the stage\'s domains', kind="usage")
    return cfg


def data_dir(layout: Layout, spec: ServicesSpec) -> Path:
    """Where the stage's Caddy keeps its config, state, socket and log."""
    given = settings(spec).get("data_dir")
    return Path(given) if given else layout.root / "caddy"


def _q(value: object) -> str:
    """A double-quoted Caddyfile token (no placeholders: ``{`` cannot start one here)."""
    text = str(value)
    if any(ch in text for ch in "\n\r\0{}"):
        raise AgentError(f"value not allowed in a Caddyfile: {text!r}", kind="usage")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _listen_host(spec: ServicesSpec) -> str | None:
    """The address the site binds (None: every address)."""
    web = spec.get("web")
    bind = str((web and web.get("bind")) or "")
    return None if bind in ("", "0.0.0.0", "::", "[::]") else bind.strip("[]")


def caddyfile(layout: Layout, spec: ServicesSpec) -> str:
    """The text of the stage's Caddyfile."""
    cfg = settings(spec)
    data = data_dir(layout, spec)
    lines = [
        f"# written by shiplane for {spec.get('app')} ({spec.get('stage')}); replaced at deploys",
        "{",
        f"\tadmin {_q('unix/' + str(data / 'admin.sock'))}",
        "\tstorage file_system {",
        f"\t\troot {_q(data / 'data')}",
        "\t}",
        f"\thttp_port {int(cfg['http_port'])}",
        f"\thttps_port {int(cfg['https_port'])}",
        f"\tacme_ca {_q(cfg.get('acme_ca') or LETS_ENCRYPT)}",
    ]
    if cfg.get("acme_ca_root"):
        lines.append(f"\tacme_ca_root {_q(cfg['acme_ca_root'])}")
    if cfg.get("acme_email"):
        lines.append(f"\temail {_q(cfg['acme_email'])}")
    lines += [
        "\tlog {",
        f"\t\toutput file {_q(data / 'caddy.log')} {{",
        "\t\t\troll_size 10MiB",
        "\t\t\troll_keep 3",
        "\t\t}",
        "\t\tformat json",
        "\t}",
        "}",
        "",
        ", ".join(cfg["domains"]) + " {",
    ]
    host = _listen_host(spec)
    if host:
        lines.append(f"\tbind {_q(host)}")
    lines += [
        f"\treverse_proxy {_q('unix/' + str(layout.web_socket))} {{",
        "\t\t# the socket is a symlink a switch renames: a new connection per request, and a",
        "\t\t# refused or reset one (a server closing its listener) is tried again",
        "\t\tlb_try_duration 5s",
        "\t\tlb_try_interval 50ms",
        "\t\ttransport http {",
        "\t\t\tkeepalive off",
        "\t\t}",
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _env(data: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HOME=str(data),
        XDG_DATA_HOME=str(data / "data"),
        XDG_CONFIG_HOME=str(data / "config"),
    )
    return env


def _run(argv: list[str], data: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=CADDY_TIMEOUT,
            stdin=subprocess.DEVNULL,
            env=_env(data),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AgentError(f"{argv[0]}: {exc}", kind="front") from None


def running_pid(data: Path) -> int | None:
    """The stage's Caddy's pid from its pid file, when that process is alive."""
    try:
        pid = int((data / "caddy.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def _admin_answers(data: Path) -> bool:
    """True when Caddy's admin API answers on its unix socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(2.0)
    try:
        sock.connect(str(data / "admin.sock"))
        sock.sendall(b"GET /config/ HTTP/1.0\r\nHost: localhost\r\n\r\n")
        return sock.recv(16).startswith(b"HTTP/1.")
    except OSError:
        return False
    finally:
        sock.close()


def _tail(path: Path, size: int = LOG_TAIL) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(path) - size))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _start(data: Path, conf: Path, emit: Emit) -> None:
    """``caddy run`` detached (its own session), then wait until its admin API answers."""
    emit({"phase": "switch", "status": "front", "detail": f"starting caddy ({conf})"})
    stderr = data / "caddy.stderr"
    argv = ["caddy", "run", "--config", str(conf), "--adapter", "caddyfile"]
    argv += ["--pidfile", str(data / "caddy.pid")]
    try:
        with open(stderr, "wb") as err:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                cwd=str(data),
                env=_env(data),
                start_new_session=True,
            )
    except OSError as exc:
        raise AgentError(
            f"caddy could not start: {exc} (install Debian's caddy package)", kind="front"
        ) from None
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = _tail(stderr).strip()
            hint = ""
            if "address already in use" in tail:
                hint = (
                    "\nanother server holds the port: Debian's own caddy.service listens on 80 "
                    "(systemctl disable --now caddy), or another stage's front does"
                )
            elif "permission denied" in tail and "bind" in tail:
                hint = (
                    "\nbinding ports below 1024 needs root or the capability: "
                    "setcap cap_net_bind_service=+ep /usr/bin/caddy"
                )
            raise AgentError(
                f"caddy exited at start (code {proc.returncode}):\n{tail[-1500:]}{hint}",
                kind="front",
            )
        if _admin_answers(data):
            return
        time.sleep(POLL)  # poll interval while caddy loads its config
    raise AgentError(
        f"caddy did not answer on {data / 'admin.sock'} within {START_TIMEOUT:.0f}s:\n"
        f"{_tail(stderr)[-1500:]}",
        kind="front",
    )


def _handshake(host: str, port: int, domain: str) -> bool:
    """True when ``host:port`` completes a TLS handshake for ``domain`` (SNI) with a
    certificate (not verified here: the CA may be a private one the agent does not trust)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        raw = socket.create_connection((host, port), timeout=3.0)
        with raw, ctx.wrap_socket(raw, server_hostname=domain) as tls:
            return bool(tls.getpeercert(binary_form=True))
    except (OSError, ssl.SSLError):
        return False


FIXES = (
    (
        ("rateLimited", "rate limit", "too many"),
        (
            "the CA's rate limit was reached: wait before the next attempt (Let's Encrypt: "
            "https://letsencrypt.org/docs/rate-limits/), and try changes against a staging CA "
            "(caddy.acme_ca)"
        ),
    ),
    (
        ("acme:error:dns", "no such host", "NXDOMAIN", "SERVFAIL", "no valid A", "resolving"),
        (
            "the domain does not resolve to this host: give it an A (and AAAA) record with the "
            "host's public address"
        ),
    ),
    (
        ("connection refused", "acme:error:connection", "timeout", "i/o timeout", "unreachable"),
        (
            "the CA could not connect to this host on port {http} (HTTP-01) or {https} (TLS-ALPN-01): "
            "open them in the firewall, and point the domain's DNS at this host"
        ),
    ),
    (
        ("unauthorized", "acme:error:tls", "incorrect"),
        (
            "the CA reached another server than this stage's Caddy: the domain's DNS points at "
            "another host, or something else answers on port {http}"
        ),
    ),
)


def _failures(log: Path, offset: int, domains: list[str]) -> dict[str, list[str]]:
    """Caddy's error lines about each domain since ``offset`` of its log: the errors, and
    whether an attempt is over (``will retry``, ``could not get certificate``)."""
    found: dict[str, list[str]] = {}
    try:
        with open(log, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return found
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict) or entry.get("level") != "error":
            continue
        for domain in domains:
            if domain in line:
                reason = str(entry.get("error") or entry.get("problem") or entry.get("msg"))
                found.setdefault(domain, []).append(f"{entry.get('msg')}: {reason}")
    return found


def _attempt_over(reasons: list[str]) -> bool:
    return any("will retry" in r or "could not get certificate" in r for r in reasons)


def _explain(domain: str, reasons: list[str], cfg: CaddySpec) -> str:
    text = "\n".join(reasons)
    fix = "read caddy.log in the stage's caddy dir for Caddy's attempts"
    for needles, advice in FIXES:
        if any(n.lower() in text.lower() for n in needles):
            fix = advice.format(http=cfg["http_port"], https=cfg["https_port"])
            break
    last = reasons[-1] if reasons else "no answer from Caddy yet"
    return f"{domain}: {last[:600]}\n  fix: {fix}"


def wait_certificates(layout: Layout, spec: ServicesSpec, offset: int, emit: Emit) -> None:
    """Until each domain completes a TLS handshake on this host, or Caddy logged a failed
    attempt for it, or ``issue_timeout`` passed; raises ``AgentError(kind="front")`` naming
    the domains without a certificate and Caddy's reasons."""
    cfg = settings(spec)
    data = data_dir(layout, spec)
    host = _listen_host(spec) or "127.0.0.1"
    port = int(cfg["https_port"])
    waiting = list(cfg["domains"])
    deadline = time.monotonic() + float(cfg["issue_timeout"])
    next_note = time.monotonic()
    failed: dict[str, list[str]] = {}
    while waiting:
        waiting = [d for d in waiting if not _handshake(host, port, d)]
        if not waiting:
            return
        errors = _failures(data / "caddy.log", offset, waiting)
        failed = {d: r for d, r in errors.items() if _attempt_over(r)}
        if failed or time.monotonic() >= deadline:
            failed = {d: errors.get(d, []) for d in waiting}
            break
        if time.monotonic() >= next_note:
            emit(
                {
                    "phase": "switch",
                    "status": "front",
                    "detail": f"caddy: waiting for certificates for {', '.join(waiting)}",
                }
            )
            next_note = time.monotonic() + 5.0
        time.sleep(POLL)  # poll interval while Caddy talks to the CA
    lines = [_explain(d, r, cfg) for d, r in failed.items()]
    raise AgentError(
        f"no certificate for {', '.join(failed)} from {cfg.get('acme_ca') or LETS_ENCRYPT} "
        f"within {float(cfg['issue_timeout']):.0f}s or after a failed attempt:\n"
        + "\n".join(lines),
        kind="front",
    )


def _log_size(data: Path) -> int:
    try:
        return os.path.getsize(data / "caddy.log")
    except OSError:
        return 0


def ensure(layout: Layout, spec: ServicesSpec, emit: Emit) -> bool:
    """Write the Caddyfile; start Caddy, or reload it when the text changed; then wait for the
    certificates. Unchanged text and a running Caddy: no reload (returns False). A rejected
    reload puts the previous Caddyfile back and raises ``AgentError(kind="front")``."""
    cfg = settings(spec)
    data = data_dir(layout, spec)
    # shutdown's stop() has only the saved spec: it finds this Caddy by the dir written here
    cfg["data_dir"] = str(data)
    data.mkdir(parents=True, exist_ok=True)
    os.chmod(data, 0o700)  # the ACME account key and the certificates' keys live below
    conf = data / "Caddyfile"
    text = caddyfile(layout, spec)
    try:
        previous: str | None = conf.read_text(encoding="utf-8")
    except FileNotFoundError:
        previous = None
    running = running_pid(data) is not None and _admin_answers(data)
    offset = _log_size(data)
    if previous == text and running:
        wait_certificates(layout, spec, offset, emit)  # a handshake per domain when all is well
        return False
    atomic_write(conf, text, mode=0o600)
    if not running:
        _start(data, conf, emit)
        try:
            wait_certificates(layout, spec, offset, emit)
        except AgentError:
            # a Caddy this deploy started serves nothing yet: nobody would stop it
            stop_caddy(spec, emit)
            raise
        return True
    else:
        emit({"phase": "switch", "status": "front", "detail": f"reloading caddy ({conf})"})
        done = _run(["caddy", "reload", "--config", str(conf), "--adapter", "caddyfile"], data)
        if done.returncode != 0:
            if previous is None:
                conf.unlink()
            else:
                atomic_write(conf, previous, mode=0o600)
            raise AgentError(
                f"caddy refused the new config {conf}; it serves the previous one:\n"
                f"{(done.stderr or done.stdout).strip()[-1500:]}",
                kind="front",
            )
    wait_certificates(layout, spec, offset, emit)
    return True


def stop_caddy(spec: ServicesSpec, emit: Emit, timeout: float = STOP_TIMEOUT) -> int | None:
    """Stop the stage's Caddy (SIGTERM: Caddy's graceful shutdown), waiting for its exit.
    Returns its pid, or None when none ran."""
    cfg = spec.get("caddy")
    given = cfg.get("data_dir") if isinstance(cfg, dict) else None
    if not given:
        return None
    data = Path(given)
    pid = running_pid(data)
    if pid is None:
        return None
    emit({"phase": "services", "status": "stop", "detail": f"caddy (pid {pid})"})
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return pid
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # poll interval while Caddy finishes its connections
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    return pid


class CaddyFront:
    """``front = "caddy"`` (fronts.py): HTTPS for the stage's domains; the backend runs no
    proxy."""

    name = "caddy"
    supervised = False

    def ensure(self, layout: Layout, spec: ServicesSpec, emit: Emit) -> None:
        ensure(layout, spec, emit)

    def stop(self, spec: ServicesSpec, emit: Emit) -> list[str]:
        return ["caddy"] if stop_caddy(spec, emit) else []
