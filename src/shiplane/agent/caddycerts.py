"""Waiting for a Caddy front's certificates after a start or reload (agent/caddy.py): until
each domain completes a TLS handshake on this host with its own name (SNI), or Caddy logged that
an attempt failed, or ``issue_timeout`` passed; then an ``AgentError(kind="front")`` names each
domain without a certificate, Caddy's reason and the usual fix.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
from pathlib import Path

from .caddyfile import LETS_ENCRYPT, data_dir, listen_host, settings
from .errors import AgentError
from .paths import Layout
from .protocol import CaddySpec, Emit, ServicesSpec

POLL = 0.2  # poll interval while Caddy talks to the CA


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
    whether an attempt is over (``will retry``, ``could not get certificate``); not the
    attempts a reload cancelled."""
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
        if "context canceled" in line:
            # a reload (this stage's, or another app's in a shared Caddy) ended the old
            # config's attempt; the new config starts its own
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
    host = listen_host(spec) or "127.0.0.1"
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
