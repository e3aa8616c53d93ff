"""Hosts on other Pythons than the controller's (issue 19), deployed over real SSH.

Three test hosts: ``h1`` runs Debian's ``/usr/bin/python3`` (3.11.2: another patch release than
the controller's 3.11.7), ``h2`` and ``h3`` pyenv's 3.12 (another minor version), given as hosts
tables with their own ``python``. The test hosts hide the controller's ``/root``, so pyenv's 3.12
is hard-linked into theirs, at the same path (no copy, no bytes).

The lock is small: gunicorn and packaging (pure Python), MarkupSafe (compiled: a cp311 wheel for
h1, a cp312 one for h2 and h3), ``async-timeout`` only where ``python_full_version <= "3.11.2"``
(h1, not the controller) and ``typing-extensions`` only where ``python_version >= "3.12"``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from apps.common import App, http_get, new_app, share_build_caches, write
from sshhosts import TestHost, TestHosts

pytestmark = [pytest.mark.ssh, pytest.mark.slow]

PORT = 8470
PYENV = Path.home() / ".pyenv" / "versions"
PY312 = sorted(PYENV.glob("3.12.*"), key=lambda p: [int(x) for x in p.name.split(".")])

APP = """import json
import sys


def app(environ, start_response):
    found = {}
    for name in ("async_timeout", "typing_extensions", "markupsafe._speedups"):
        try:
            module = __import__(name, fromlist=["_"])
            found[name] = getattr(module, "__file__", "") or "yes"
        except ImportError:
            found[name] = None
    body = json.dumps({"python": sys.version.split()[0], "prefix": sys.prefix, **found})
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body.encode()]
"""

LOCK = """gunicorn==23.0.0
packaging==24.2
markupsafe==2.1.5
async-timeout==4.0.3 ; python_full_version <= "3.11.2"
typing-extensions==4.12.2 ; python_version >= "3.12"
"""

# a lock made on the controller's 3.11.7 (uv pip compile resolves for the Python it runs on):
# redis needs async-timeout on 3.11.2, and the lock has none
INCOMPLETE = """gunicorn==23.0.0
packaging==24.2
redis==5.0.1
"""


def _toml(hosts: TestHosts, python312: str) -> str:
    h1, h2, h3 = (h.name for h in hosts.hosts)
    return f"""[app]
name = "pyfleet"
wsgi = "app:app"
source = "tree"

[build]
requirements = "requirements.txt"

[services.web]
workers = 1
healthcheck = {{ path = "/", timeout = 30 }}

[stages.fleet]
hosts = [
  "{h1}",
  {{ host = "{h2}", python = "{python312}" }},
  {{ host = "{h3}", python = "{python312}" }},
]
deploy_to = "/srv/pyfleet"
port = {PORT}
bind = "0.0.0.0"
ssh_config = "{hosts.ssh_config}"
"""


def _give_pyenv(host: TestHost, version: Path) -> None:
    """pyenv's Python at the same path on the host: hard links into its /root (one filesystem)."""
    target = host.home / version.relative_to(Path.home())
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-al", str(version), str(target)], check=True)


@pytest.fixture(scope="module")
def fleet(ssh_hosts: TestHosts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[App]:
    if not PY312:
        pytest.skip(f"no Python 3.12 in {PYENV}")
    for host in ssh_hosts.hosts[1:]:
        _give_pyenv(host, PY312[-1])
    base = tmp_path_factory.mktemp("pyfleet")
    app = new_app(base / "pyfleet", base / "unused")
    write(app.root, "app.py", APP)
    write(app.root, "requirements.txt", LOCK)
    write(app.root, "shiplane.toml", _toml(ssh_hosts, str(PY312[-1] / "bin" / "python3")))
    write(app.root, ".gitignore", "__pycache__/\n")
    app.commit("an app on a mixed fleet")
    share_build_caches(app.root)
    app.stage = "fleet"
    try:
        yield app
    finally:
        app.shiplane("stop", "--all", "--stage", "fleet", timeout=120)
        for host in ssh_hosts.hosts[1:]:
            shutil.rmtree(host.home / ".pyenv", ignore_errors=True)


def served(host: TestHost) -> dict[str, str | None]:
    status, body = http_get(host.url(PORT, "/"))
    assert status == 200, (host.name, status, body[:300])
    found: dict[str, str | None] = json.loads(body)
    return found


def stored(host: TestHost) -> set[str]:
    store = host.root / "pyfleet" / "store"
    return {p.name for p in store.iterdir()} if store.is_dir() else set()


def test_a_mixed_fleet_gets_the_wheels_of_each_hosts_python(
    fleet: App, ssh_hosts: TestHosts
) -> None:
    h1, h2, h3 = ssh_hosts.hosts
    deployed = fleet.deploy("--skip-tests")
    assert deployed.result["outcome"] == "ok", deployed.output[-3000:]

    on_h1 = served(h1)
    assert on_h1["python"] == "3.11.2", on_h1  # Debian's, not the controller's 3.11.7
    assert on_h1["async_timeout"], on_h1  # python_full_version <= "3.11.2" holds there
    assert on_h1["typing_extensions"] is None, on_h1
    assert "cpython-311" in str(on_h1["markupsafe._speedups"]), on_h1
    for host in (h2, h3):
        on = served(host)
        assert on["python"] == PY312[-1].name, on
        assert on["async_timeout"] is None and on["typing_extensions"], on
        assert "cpython-312" in str(on["markupsafe._speedups"]), on

    # one artifact, one wheelhouse per interpreter; each host was sent its own wheels only
    manifest = json.loads(
        (
            fleet.root / ".shiplane" / "build" / "artifacts" / f"{deployed.result['artifact']}.json"
        ).read_text()
    )
    targets = {t["target"]["python"]: t for t in manifest["targets"]}
    assert set(targets) == {"3.11.2", PY312[-1].name}, targets.keys()
    wheels_311 = {e["sha256"] for e in targets["3.11.2"]["dependencies"]}
    wheels_312 = {e["sha256"] for e in targets[PY312[-1].name]["dependencies"]}
    assert wheels_311 <= stored(h1) and not (wheels_312 - wheels_311) & stored(h1)
    assert wheels_312 <= stored(h2) and not (wheels_311 - wheels_312) & stored(h2)

    # the build said which hosts' interpreter each wheelhouse is for
    said = " ".join(str(e.get("detail", "")) for e in deployed.events if e.get("phase") == "build")
    assert f"for {h1.name}: CPython 3.11.2 (cp311, linux_x86_64)" in said, said[-2000:]
    assert f"for {h2.name}, {h3.name}: CPython {PY312[-1].name} (cp312" in said, said[-2000:]


def test_plan_names_each_hosts_python_and_plans_the_same_artifact(
    fleet: App, ssh_hosts: TestHosts
) -> None:
    h1, h2, _ = ssh_hosts.hosts
    planned = fleet.json("plan", "--stage", "fleet")
    hosts = planned["hosts"]
    assert hosts[h1.name]["python"] == "CPython 3.11.2 (cp311, linux_x86_64) at /usr/bin/python3"
    assert hosts[h2.name]["python"].startswith(f"CPython {PY312[-1].name} (cp312, linux_x86_64)")
    # the deploy's artifact, built for the same interpreters: nothing to send, venvs reused
    assert all(h["same_artifact"] and h["venv_reused"] and not h["blobs"] for h in hosts.values())


def test_doctor_checks_each_hosts_own_python(fleet: App, ssh_hosts: TestHosts) -> None:
    done = fleet.shiplane("doctor", "--stage", "fleet", "--json")
    hosts = json.loads(done.stdout)["result"]["hosts"]
    said = {
        name: next(c for c in info["checks"] if c["check"] == "python")
        for name, info in hosts.items()
    }
    h1, h2, h3 = ssh_hosts.hosts
    assert said[h1.name] == {"check": "python", "status": "ok", "detail": "3.11.2"}, said
    for host in (h2, h3):
        assert said[host.name]["detail"] == PY312[-1].name, said


def test_a_lock_lacking_a_package_a_host_needs_fails_the_build_naming_it(
    fleet: App, ssh_hosts: TestHosts
) -> None:
    h1 = ssh_hosts.hosts[0]
    before = stored(h1)
    releases = sorted(os.listdir(h1.root / "pyfleet" / "releases"))
    write(fleet.root, "requirements.txt", INCOMPLETE)
    fleet.commit("a lock made on the controller's Python")
    failed = fleet.deploy("--skip-tests", check=False)
    assert failed.exit == 2, failed.output[-3000:]
    assert "async-timeout" in failed.output, failed.output[-3000:]
    assert 'python_full_version <= "3.11.2"' in failed.output, failed.output[-3000:]
    assert h1.name in failed.output and "3.11.2" in failed.output, failed.output[-3000:]
    for other in ssh_hosts.hosts[1:]:  # their Python needs no async-timeout: not named
        assert f"{other.name} need" not in failed.output
    # refused at the build: nothing was sent nor installed
    assert stored(h1) == before
    assert sorted(os.listdir(h1.root / "pyfleet" / "releases")) == releases

    # the same lock built here (for this machine's 3.11.7, which needs no async-timeout) and
    # shipped as it is: h1 is checked against the artifact's wheels and refused, naming the gap
    done = fleet.shiplane("build", "--json")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    built = json.loads(done.stdout.splitlines()[-1])["result"]
    shipped = fleet.deploy(
        "--skip-tests", "--artifact", built["digest"], "--hosts", h1.name, check=False
    )
    assert shipped.exit == 1, shipped.output[-3000:]
    error = shipped.result["error"]
    assert f"{h1.name} runs CPython 3.11.2 (cp311, linux_x86_64), and the artifact's" in error
    assert "async-timeout" in error and "python_full_version" in error, error
    assert "deploy without --artifact" in error, error
    assert stored(h1) == before
