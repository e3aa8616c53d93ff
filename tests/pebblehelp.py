"""A real ACME CA for the HTTPS tests: Debian's pebble (Let's Encrypt's test CA) with
pebble-challtestsrv as its DNS, answering every name with one address.

Pebble validates HTTP-01 on ``http_port`` and TLS-ALPN-01 on ``https_port`` of the address the
name resolves to; its ACME directory listens on ``listen`` (an address the hosts' Caddy reaches),
its management API (the root it signs with) on 127.0.0.1. Its own HTTPS certificate comes from a
throwaway CA made here with openssl (``ca_root``: Caddy's ``acme_ca_root``).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from deployhelp import free_port, wait_for

TOOLS = ("caddy", "pebble", "pebble-challtestsrv", "openssl")


def missing_tools() -> list[str]:
    return [t for t in TOOLS if not shutil.which(t)]


@dataclass
class Pebble:
    directory: str  # the ACME directory URL
    ca_root: Path  # the root of pebble's own HTTPS (Caddy's acme_ca_root)
    issued_root: Path  # the root pebble signs certificates with
    dns_management: int  # pebble-challtestsrv's management port
    http_port: int
    https_port: int
    log: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _minica(base: Path, addresses: list[str]) -> None:
    """A CA, and a certificate for pebble's own HTTPS listener on ``addresses``."""
    subject = ("-subj", "/CN=shiplane test ACME root")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        *subject,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=base,
    )
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "key.pem",
        "-out",
        "req.csr",
        cwd=base,
    )
    sans = ",".join(["DNS:localhost", *(f"IP:{a}" for a in addresses)])
    (base / "ext.cnf").write_text(f"subjectAltName={sans}\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        "req.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "cert.pem",
        cwd=base,
    )


def _fetch_root(management: int, ca: Path) -> bytes:
    ctx = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", management, context=ctx, timeout=5)
    try:
        conn.request("GET", "/roots/0")
        resp = conn.getresponse()
        body = resp.read()
        return body if resp.status == 200 else b""
    finally:
        conn.close()


@contextlib.contextmanager
def running_pebble(
    *,
    listen: str = "127.0.0.1",
    answer: str = "127.0.0.1",
    http_port: int | None = None,
    https_port: int | None = None,
    validity: int | None = None,
) -> Iterator[Pebble]:
    """Pebble and its DNS, stopped (by their pids) on exit. ``answer``: the IPv4 address every
    name resolves to; ``validity``: the certificates' lifetime in seconds (pebble's default
    otherwise)."""
    base = Path(tempfile.mkdtemp(prefix="shl-pebble-", dir="/tmp"))
    _minica(base, sorted({"127.0.0.1", listen}))
    dns, dns_mgmt, acme, mgmt = free_port(), free_port(), free_port(), free_port()
    http_port = http_port or free_port()
    https_port = https_port or free_port()
    config = {
        "listenAddress": f"{listen}:{acme}",
        "managementListenAddress": f"127.0.0.1:{mgmt}",
        "certificate": str(base / "cert.pem"),
        "privateKey": str(base / "key.pem"),
        "httpPort": http_port,
        "tlsPort": https_port,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": False,
    }
    if validity is not None:
        config["certificateValidityPeriod"] = validity
    (base / "pebble.json").write_text(json.dumps({"pebble": config}))
    log = base / "pebble.log"
    env = {
        **os.environ,
        "PEBBLE_VA_NOSLEEP": "1",
        "PEBBLE_VA_ALWAYS_VALID": "0",  # every challenge is really validated
        "PEBBLE_WFE_NONCEREJECT": "0",
    }
    dns_argv = [
        "pebble-challtestsrv",
        "-dns01",
        f"127.0.0.1:{dns}",
        "-http01",
        "",
        "-https01",
        "",
        "-tlsalpn01",
        "",
        "-defaultIPv6",
        "",
        "-defaultIPv4",
        answer,
        "-management",
        f"127.0.0.1:{dns_mgmt}",
    ]
    pebble_argv = ["pebble", "-config", str(base / "pebble.json"), "-dnsserver", f"127.0.0.1:{dns}"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with open(log, "wb") as out:
            procs.append(subprocess.Popen(dns_argv, stdout=out, stderr=out))
            procs.append(subprocess.Popen(pebble_argv, stdout=out, stderr=out, env=env))
        root = wait_for(lambda: _fetch_root(mgmt, base / "ca.pem"), 30, "pebble's root")
        (base / "issued-root.pem").write_bytes(root)
        yield Pebble(
            directory=f"https://{listen}:{acme}/dir",
            ca_root=base / "ca.pem",
            issued_root=base / "issued-root.pem",
            dns_management=dns_mgmt,
            http_port=http_port,
            https_port=https_port,
            log=log,
        )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)
        shutil.rmtree(base, ignore_errors=True)


def dns_add_a(pebble: Pebble, host: str, address: str) -> None:
    """Make challtestsrv answer ``host`` with ``address`` (instead of the default one)."""
    conn = http.client.HTTPConnection("127.0.0.1", pebble.dns_management, timeout=5)
    try:
        conn.request("POST", "/add-a", body=json.dumps({"host": host, "addresses": [address]}))
        assert conn.getresponse().status == 200
    finally:
        conn.close()


def https_get(
    pebble: Pebble, name: str, address: str = "127.0.0.1", path: str = "/"
) -> tuple[int, bytes, bytes]:
    """GET https://name/path connected to ``address``, the chain verified against pebble's
    root and the certificate against ``name`` (SNI ``name``); one connection per request.
    Returns the status, the body and the server's certificate (DER)."""
    ctx = ssl.create_default_context(cafile=str(pebble.issued_root))
    raw = socket.create_connection((address, pebble.https_port), timeout=10)
    conn = http.client.HTTPSConnection(name, pebble.https_port, context=ctx, timeout=10)
    conn.sock = ctx.wrap_socket(raw, server_hostname=name)
    try:
        cert = conn.sock.getpeercert(binary_form=True) or b""
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read(), cert
    finally:
        conn.close()


def http_get_raw(
    pebble: Pebble, name: str, address: str = "127.0.0.1", path: str = "/"
) -> tuple[int, str]:
    """GET http://name/path on ``address`` (Host ``name``): the status and Location."""
    conn = http.client.HTTPConnection(address, pebble.http_port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": name})
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("Location") or ""
    finally:
        conn.close()
