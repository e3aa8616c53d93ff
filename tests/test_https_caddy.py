"""HTTPS with automatic certificates (issue 20): a stage with ``domains`` is served by a private
Caddy with a certificate from an ACME CA — here Debian's pebble, Let's Encrypt's test CA, with
pebble-challtestsrv as its DNS (every name resolves to 127.0.0.1, IPv4 only).

Everything listens on 127.0.0.1 on free high ports: pebble validates HTTP-01 and TLS-ALPN-01 on
the ports Caddy's ``http_port``/``https_port`` name, so nothing needs 80 or 443 and no traffic
leaves the machine. The deploys are real ``shiplane deploy --stage local`` runs of the scaffold
app; every wait is a poll with a deadline.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from deployhelp import Project, edit, free_port, scaffold, wait_for
from shiplane.agent import caddy
from shiplane.agent.paths import Layout
from shiplane.agent.protocol import ServicesSpec
from shiplane.config.schema import Stage

needs_pebble = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("caddy", "pebble", "pebble-challtestsrv", "openssl")),
    reason="needs Debian's caddy and pebble packages, and openssl",
)


def stage(**keys: Any) -> Stage:
    return Stage.model_validate({"hosts": ["web1"], "deploy_to": "/srv/demo", **keys})


def test_domains_choose_the_caddy_front_and_are_checked() -> None:
    assert stage(domains=["Example.COM."]).front == "caddy"
    assert stage(domains=["example.com"]).domains == ["example.com"]
    assert stage().front == "builtin" and stage().domains == []
    for bad, says in [
        (["*.example.com"], "wildcard"),
        (["localhost"], "expected a domain name"),
        (["192.0.2.1"], "expected a domain name"),
        (["a_b.example.com"], "expected a domain name"),
        (["example.com", "EXAMPLE.com"], "listed twice"),
    ]:
        with pytest.raises(ValidationError, match=says):
            stage(domains=bad)
    with pytest.raises(ValidationError, match='front = "nginx" cannot'):
        stage(domains=["example.com"], front="nginx")
    with pytest.raises(ValidationError, match='front = "builtin" cannot'):
        stage(domains=["example.com"], front="builtin")
    with pytest.raises(ValidationError, match="set domains"):
        stage(front="caddy")
    with pytest.raises(ValidationError, match="absolute"):
        stage(domains=["example.com"], caddy={"acme_ca_root": "ca.pem"})


def test_the_caddyfile_proxies_the_domains_to_the_switched_socket(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "root")
    spec: ServicesSpec = {
        "app": "demo",
        "stage": "prod",
        "front": "caddy",
        "web": None,
        "workers": {},
        "backend": "daemon",
        "nginx": None,
        "caddy": {
            "domains": ["example.com", "www.example.com"],
            "acme_ca": caddy.LETS_ENCRYPT,
            "acme_email": "ops@example.com",
            "acme_ca_root": None,
            "data_dir": None,
            "http_port": 80,
            "https_port": 443,
            "issue_timeout": 120,
        },
    }
    text = caddy.caddyfile(layout, spec)
    data = tmp_path / "root" / "caddy"
    assert f'admin "unix/{data}/admin.sock"' in text  # never the shared localhost:2019
    assert f'root "{data}/data"' in text
    assert f'acme_ca "{caddy.LETS_ENCRYPT}"' in text and 'email "ops@example.com"' in text
    assert "example.com, www.example.com {" in text
    assert f'reverse_proxy "unix/{layout.web_socket}"' in text
    assert "keepalive off" in text and "bind" not in text
    if shutil.which("caddy"):  # Caddy's own parser accepts it
        conf = tmp_path / "Caddyfile"
        conf.write_text(text)
        done = subprocess.run(
            ["caddy", "adapt", "--config", str(conf), "--adapter", "caddyfile"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr


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


def _minica(base: Path) -> None:
    """A CA and a ``localhost``/127.0.0.1 certificate for pebble's own HTTPS listener."""
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=shiplane test ACME root",
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
    (base / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
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


@pytest.fixture(scope="module")
def pebble() -> Iterator[Pebble]:
    base = Path(tempfile.mkdtemp(prefix="shl-pebble-", dir="/tmp"))
    _minica(base)
    dns, dns_mgmt, acme, mgmt = free_port(), free_port(), free_port(), free_port()
    http_port, https_port = free_port(), free_port()
    (base / "pebble.json").write_text(
        json.dumps(
            {
                "pebble": {
                    "listenAddress": f"127.0.0.1:{acme}",
                    "managementListenAddress": f"127.0.0.1:{mgmt}",
                    "certificate": str(base / "cert.pem"),
                    "privateKey": str(base / "key.pem"),
                    "httpPort": http_port,
                    "tlsPort": https_port,
                    "ocspResponderURL": "",
                    "externalAccountBindingRequired": False,
                }
            }
        )
    )
    log = base / "pebble.log"
    env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}
    procs: list[subprocess.Popen[bytes]] = []
    with open(log, "wb") as out:
        procs.append(
            subprocess.Popen(
                [
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
                    "127.0.0.1",
                    "-management",
                    f"127.0.0.1:{dns_mgmt}",
                ],
                stdout=out,
                stderr=out,
            )
        )
        procs.append(
            subprocess.Popen(
                ["pebble", "-config", str(base / "pebble.json"), "-dnsserver", f"127.0.0.1:{dns}"],
                stdout=out,
                stderr=out,
                env=env,
            )
        )
    try:
        root = wait_for(lambda: _fetch_root(mgmt, base / "ca.pem"), 30, "pebble's root")
        (base / "issued-root.pem").write_bytes(root)
        yield Pebble(
            directory=f"https://127.0.0.1:{acme}/dir",
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


def _dns_add_a(pebble: Pebble, host: str, address: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", pebble.dns_management, timeout=5)
    try:
        body = json.dumps({"host": host, "addresses": [address]})
        conn.request("POST", "/add-a", body=body)
        assert conn.getresponse().status == 200
    finally:
        conn.close()


def https_get(pebble: Pebble, host: str, path: str = "/") -> tuple[int, bytes]:
    """GET https://host:<https_port>/ connected to 127.0.0.1, verified against pebble's root."""
    ctx = ssl.create_default_context(cafile=str(pebble.issued_root))
    raw = socket.create_connection(("127.0.0.1", pebble.https_port), timeout=10)
    conn = http.client.HTTPSConnection(host, pebble.https_port, context=ctx, timeout=10)
    conn.sock = ctx.wrap_socket(raw, server_hostname=host)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def http_get_raw(pebble: Pebble, host: str, path: str = "/") -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", pebble.http_port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host})
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("Location") or ""
    finally:
        conn.close()


def https_stage(project: Project, pebble: Pebble, domains: list[str], timeout: float) -> None:
    toml = project.root / "shiplane.toml"
    text = toml.read_text()
    head, sep, rest = text.partition("[stages.staging]")
    head = head.split("\ndomains = ")[0].split("\n[stages.local.caddy]")[0].rstrip("\n") + "\n"
    block = (
        f"domains = {json.dumps(domains)}\n\n[stages.local.caddy]\n"
        f'acme_ca = "{pebble.directory}"\n'
        f'acme_ca_root = "{pebble.ca_root}"\n'
        f'acme_email = "ops@example.com"\n'
        f"http_port = {pebble.http_port}\nhttps_port = {pebble.https_port}\n"
        f"issue_timeout = {timeout}\n\n"
    )
    toml.write_text(head + block + sep + rest)
    project.commit("https")


@pytest.fixture(scope="module")
def project(pebble: Pebble) -> Iterator[Project]:
    tmp = Path(tempfile.mkdtemp(prefix="shl-https-", dir="/tmp"))
    project = scaffold(tmp)
    https_stage(project, pebble, ["app.test"], 60)
    try:
        yield project
    finally:
        project.stop()
        caddy_pid = project.deploy_root / "caddy" / "caddy.pid"
        assert not _alive(caddy_pid), "shiplane stop --all left the stage's caddy running"
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text()), 0)
    except (OSError, ValueError):
        return False
    return True


@pytest.mark.slow
@needs_pebble
def test_a_stage_with_domains_serves_https_with_a_certificate_from_the_ca(
    pebble: Pebble, project: Project
) -> None:
    project.deploy()
    status, body = https_get(pebble, "app.test")
    assert status == 200, body[:300]
    # HTTP answers with a redirect to the same URL over HTTPS
    status, location = http_get_raw(pebble, "app.test", "/some/path?x=1")
    assert status in (301, 302, 307, 308)
    # (Caddy 2.6 names no port in it: on the standard 443 the URL is exact)
    assert location.startswith("https://app.test") and location.endswith("/some/path?x=1")
    # the certificate's key and the ACME account's key: 0600, in dirs nobody else can read
    data = project.deploy_root / "caddy"
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    keys = [p for p in (data / "data").rglob("*.key")]
    assert any(p.name == "app.test.key" for p in keys), keys
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        for parent in key.relative_to(data).parents:
            mode = stat.S_IMODE((data / parent).stat().st_mode)
            assert mode & 0o007 == 0, f"{data / parent} is open to others ({oct(mode)})"


@pytest.mark.slow
@needs_pebble
def test_a_redeploy_switches_behind_https_without_a_failed_request(
    pebble: Pebble, project: Project
) -> None:
    if not (project.deploy_root / "current").exists():
        project.deploy()
    caddy_pid = (project.deploy_root / "caddy" / "caddy.pid").read_text()
    before = project.current()
    edit(project, "README.md", "\n", "\nanother release\n")
    failures: list[str] = []
    served = 0
    stop = threading.Event()

    def load() -> None:
        nonlocal served
        while not stop.is_set():
            try:
                status, body = https_get(pebble, "app.test")
                if status != 200:
                    failures.append(f"{status} {body[:120]!r}")
            except (OSError, http.client.HTTPException) as exc:
                failures.append(repr(exc))
            served += 1

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        project.deploy()
        # a few more requests on the new release before the load stops
        end = served + 20
        wait_for(lambda: served >= end, 30, "requests after the switch")
    finally:
        stop.set()
        thread.join(30)
    assert project.current() != before
    assert served > 20
    assert failures == [], failures[:5]
    # the switch moved run/web.sock: the same Caddy serves, never restarted
    assert (project.deploy_root / "caddy" / "caddy.pid").read_text() == caddy_pid


@pytest.mark.slow
@needs_pebble
def test_a_domain_the_ca_cannot_validate_fails_the_deploy_naming_it(
    pebble: Pebble, project: Project
) -> None:
    if not (project.deploy_root / "current").exists():
        project.deploy()
    # bad.test resolves to an address nothing listens on: the CA cannot connect
    _dns_add_a(pebble, "bad.test", "127.0.0.2")
    https_stage(project, pebble, ["app.test", "bad.test"], 60)
    started = time.monotonic()
    result = project.deploy(check=False)
    assert result["exit"] != 0
    output = result["output"]
    assert "no certificate for bad.test" in output, output[-3000:]
    assert "fix:" in output and "port" in output, output[-3000:]
    assert time.monotonic() - started < 90
    # the name that has its certificate keeps being served
    status, _ = https_get(pebble, "app.test")
    assert status == 200
