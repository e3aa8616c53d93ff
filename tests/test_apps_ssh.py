"""A real app over SSH (issue 10): the FastAPI module app (gunicorn with uvicorn workers, SQLite
in a shared dir, static files) deployed with the ``shiplane`` CLI to two OpenSSH test hosts whose
Python is Debian's /usr/bin/python3, its wheelhouse resolved for the target the deploy file names.

Each host serves the page from its own database and its static file; a one-line code change sends
each host exactly that file; rollback serves the previous code on both.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from apps.common import App, Deployed, http_get
from apps.fastapi_app import STYLE, make_fastapi
from sshhosts import TestHost, TestHosts

pytestmark = [pytest.mark.ssh, pytest.mark.slow]

PORT = 8400
STAGE = "fleet"


def _stage(hosts: TestHosts) -> str:
    names = ", ".join(f'"{h.name}"' for h in hosts.hosts)
    return (
        f'[stages.{STAGE}]\nhosts = [{names}]\ndeploy_to = "/srv/visits"\nport = {PORT}\n'
        f'bind = "0.0.0.0"\nssh_config = "{hosts.ssh_config}"\n'
    )


@pytest.fixture
def fleet_app(make_ssh_hosts: Any, tmp_path: Path) -> Iterator[tuple[App, TestHosts]]:
    """The FastAPI app with one stage on two fresh test hosts; everything it started is stopped."""
    hosts: TestHosts = make_ssh_hosts(2)
    app = make_fastapi(tmp_path / "visits", tmp_path / "unused-local")
    toml = app.root / "shiplane.toml"
    text = toml.read_text()
    # the hosts' interpreter, as the deploy file states it (SPEC §5): Debian 12's Python 3.11
    text = text.replace(
        'requirements = "requirements.txt"\n',
        'requirements = "requirements.txt"\npython_version = "3.11"\nplatform = "linux_x86_64"\n',
    )
    toml.write_text(text[: text.index("[stages.local]")] + _stage(hosts))
    app.commit("the fleet stage")
    app.stage = STAGE
    try:
        yield app, hosts
    finally:
        app.shiplane("stop", "--all", "--stage", STAGE, timeout=120)


def page(host: TestHost, path: str = "/") -> tuple[int, bytes]:
    return http_get(host.url(PORT, path))


def visits(host: TestHost) -> tuple[str, int]:
    status, body = page(host)
    assert status == 200, (host.name, status, body[:300])
    text = body.decode()
    found = re.search(r"visits: (\d+)", text)
    assert found, text
    return text, int(found.group(1))


def sent(deployed: Deployed, host: TestHost) -> int:
    return int(deployed.result["hosts"][host.name]["bytes"])


def current(host: TestHost) -> str:
    return os.readlink(host.root / "visits" / "current").rsplit("/", 1)[-1]


def test_fastapi_app_on_two_ssh_hosts(fleet_app: tuple[App, TestHosts]) -> None:
    app, hosts = fleet_app
    first = app.deploy()
    manifest = json.loads(
        (
            app.root / ".shiplane" / "build" / "artifacts" / f"{first.result['artifact']}.json"
        ).read_text()
    )
    assert manifest["target"] == {"python_version": "3.11", "platform": "linux_x86_64"}
    counts: dict[str, int] = {}
    for host in hosts.hosts:
        assert first.result["hosts"][host.name]["outcome"] == "ok"
        text, counts[host.name] = visits(host)
        assert "version: v1" in text and counts[host.name] >= 1  # its own database answers
        assert page(host, "/static/style.css") == (200, STYLE)
        assert (host.root / "visits" / "shared" / "var" / "visits.sqlite3").is_file()
        hello = json.loads(
            host.ssh(
                "/usr/bin/python3 -c 'import json,sys; print(json.dumps(sys.version_info[:2]))'"
            ).stdout
        )
        assert hello == [3, 11]
    venvs = {h.name: sorted(os.listdir(h.root / "visits" / "venvs")) for h in hosts.hosts}

    app.edit("main.py", "version: v1", "version: v2")
    second = app.deploy()
    size = (app.root / "main.py").stat().st_size
    assert not [
        e
        for e in second.events
        if e.get("phase") == "venv" and e.get("status") in ("building", "built")
    ]
    for host in hosts.hosts:
        assert sent(second, host) == size, (host.name, second.result["hosts"], size)
        assert sorted(os.listdir(host.root / "visits" / "venvs")) == venvs[host.name]
        text, count = visits(host)
        assert (
            "version: v2" in text and count > counts[host.name]
        )  # the database outlived the release

    back = app.shiplane("rollback", "--stage", STAGE)
    assert back.returncode == 0, back.stdout + back.stderr
    for host in hosts.hosts:
        assert current(host) == first.result["release"]
        assert "version: v1" in visits(host)[0]
        assert page(host, "/static/style.css") == (200, STYLE)
