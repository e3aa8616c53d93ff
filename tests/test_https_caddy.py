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
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from deployhelp import Project, edit, scaffold, wait_for
from pebblehelp import Pebble, dns_add_a, http_get_raw, https_get, missing_tools, running_pebble
from shiplane.agent import caddyfile
from shiplane.agent.paths import Layout
from shiplane.agent.protocol import ServicesSpec
from shiplane.config.schema import Stage

needs_pebble = pytest.mark.skipif(
    bool(missing_tools()), reason="needs Debian's caddy and pebble packages, and openssl"
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
            "acme_ca": caddyfile.LETS_ENCRYPT,
            "acme_email": "ops@example.com",
            "acme_ca_root": None,
            "data_dir": None,
            "http_port": 80,
            "https_port": 443,
            "issue_timeout": 120,
            "renew_interval": 600,
        },
    }
    data = tmp_path / "root" / "caddy"
    main = caddyfile.main_text(data, caddyfile.settings(spec))
    assert f'admin "unix/{data}/admin.sock"' in main  # never the shared localhost:2019
    assert f'root "{data}/data"' in main and "renew_interval 600s" in main
    assert f'import "{data}/sites/*.caddy"' in main
    site = caddyfile.site_path(layout, spec)
    assert site.parent == data / "sites" and site.name.startswith("demo-prod-")
    text = caddyfile.site_text(layout, spec)
    assert text.startswith("# shiplane-route ")  # status reads what the site routes where
    assert f'ca "{caddyfile.LETS_ENCRYPT}"' in text and 'tls "ops@example.com" {' in text
    assert "example.com, www.example.com {" in text
    assert f'reverse_proxy "unix/{layout.web_socket}"' in text
    assert "keepalive off" in text and "bind" not in text
    if shutil.which("caddy"):  # Caddy's own parser accepts it
        site.parent.mkdir(parents=True)
        site.write_text(text)
        conf = data / "Caddyfile"
        conf.write_text(main)
        done = subprocess.run(
            ["caddy", "adapt", "--config", str(conf), "--adapter", "caddyfile"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def pebble() -> Iterator[Pebble]:
    with running_pebble() as ca:
        yield ca


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
    status, body, _ = https_get(pebble, "app.test")
    assert status == 200, body[:300]
    # HTTP answers with a redirect to the same URL over HTTPS
    status, location = http_get_raw(pebble, "app.test", path="/some/path?x=1")
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
                status, body, _ = https_get(pebble, "app.test")
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
    dns_add_a(pebble, "bad.test", "127.0.0.2")
    https_stage(project, pebble, ["app.test", "bad.test"], 60)
    started = time.monotonic()
    result = project.deploy(check=False)
    assert result["exit"] != 0
    output = result["output"]
    assert "no certificate for bad.test" in output, output[-3000:]
    assert "fix:" in output and "port" in output, output[-3000:]
    assert time.monotonic() - started < 90
    # the name that has its certificate keeps being served
    status, _, _ = https_get(pebble, "app.test")
    assert status == 200
