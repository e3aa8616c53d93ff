"""The hosts' platform (SPEC §5): the wheelhouse is resolved for the Python and platform the
deploy file names (``[build] python_version`` / ``platform``); a host that runs another Python or
platform stops the deploy after connecting, before anything is locked, sent or installed, with
one error naming the host, what it runs, what the artifact was built for, and the fix.

The apps here are tiny (one WSGI module, a lock of gunicorn and its one dependency), so resolving
a wheelhouse for another target is one small ``pip download``, cached across runs.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from apps.common import App, compiled_lock, new_app, share_build_caches, write
from shiplane.artifact import host_misfit, platform_fits

HERE_PY = f"{sys.version_info.major}.{sys.version_info.minor}"
OTHER_PY = "3.10" if HERE_PY != "3.10" else "3.12"

APP = """def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"tiny app serving\\n"]
"""

TOML = """[app]
name = "tiny"
wsgi = "app:app"

[build]
requirements = "requirements.txt"
{build}
[services.web]
workers = 1
healthcheck = {{ path = "/up", timeout = 20 }}

[stages.local]
hosts = ["local"]
deploy_to = "{deploy_to}"
port = {port}
"""


@pytest.fixture
def tiny(tmp_path: Path) -> Iterator[App]:
    """A one-module WSGI app on the local stage (its own short deploy_to); stopped at the end."""
    deploy_to = Path(tempfile.mkdtemp(prefix="shl-plt-", dir="/tmp"))
    app = new_app(tmp_path / "tiny", deploy_to)
    write(app.root, "app.py", APP)
    write(app.root, "requirements.txt", compiled_lock(["gunicorn"]))
    write(app.root, ".gitignore", "__pycache__/\n")
    app.commit("tiny app")
    share_build_caches(app.root)
    try:
        yield app
    finally:
        try:
            app.stop()
        finally:
            shutil.rmtree(deploy_to, ignore_errors=True)


def set_build(app: App, **build: str) -> None:
    """Write the deploy file with these ``[build]`` keys (and commit it)."""
    lines = "".join(f'{key} = "{value}"\n' for key, value in build.items())
    write(
        app.root, "shiplane.toml", TOML.format(build=lines, deploy_to=app.deploy_to, port=app.port)
    )
    app.commit("deploy file")


def ledger(app: App) -> list[dict[str, object]]:
    path = app.root / ".shiplane" / "history" / "local.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_host_on_another_python_stops_the_deploy_before_anything_is_sent(tiny: App) -> None:
    set_build(tiny, python_version=OTHER_PY)
    failed = tiny.deploy("--skip-tests", check=False)
    assert failed.exit == 1, failed.output[-3000:]
    error = failed.result["error"]
    assert f"local runs Python {HERE_PY} on linux_x86_64" in error, error
    assert f"built for Python {OTHER_PY} on linux_x86_64" in error, error
    assert (
        f'set python_version = "{HERE_PY}" in the [build] table' in error
        and "platform =" not in error
    ), error
    assert "nothing was sent" in error, error
    # nothing reached the host: no release, no blob, no venv; the deploy lock was never taken
    for sub in ("releases", "venvs", "current", ".lock"):
        assert not (tiny.deploy_to / sub).exists(), sub
    store = tiny.deploy_to / "store"
    assert not store.exists() or not any(store.iterdir())
    assert failed.result["hosts"]["local"]["bytes"] == 0
    assert failed.result["hosts"]["local"]["outcome"] == "failed"
    last = ledger(tiny)[-1]
    assert last["outcome"] == "failed" and f"Python {OTHER_PY}" in str(last["error"])

    # doing what the error says deploys
    set_build(tiny, python_version=HERE_PY, platform="linux_x86_64")
    deployed = tiny.deploy("--skip-tests")
    assert deployed.result["hosts"]["local"]["outcome"] == "ok"
    assert tiny.text("/") == "tiny app serving\n"
    assert (tiny.deploy_to / "releases" / deployed.result["release"]).is_dir()


@pytest.mark.slow
def test_host_on_another_platform_is_refused_naming_the_platform(tiny: App) -> None:
    set_build(tiny, python_version=HERE_PY, platform="macosx_11_0_arm64")
    failed = tiny.deploy("--skip-tests", check=False)
    assert failed.exit == 1, failed.output[-3000:]
    error = failed.result["error"]
    assert "local runs Python" in error and "on linux_x86_64" in error, error
    assert "built for Python" in error and "on macosx_11_0_arm64" in error, error
    assert (
        'set platform = "linux_x86_64" in the [build] table' in error
        and "python_version =" not in error
    ), error
    assert not (tiny.deploy_to / "releases").exists()


@pytest.mark.slow
def test_manylinux_target_deploys_on_a_linux_host(tiny: App) -> None:
    """A wheelhouse resolved for manylinux wheels (not the controller's own tag) fits Linux hosts."""
    set_build(tiny, python_version=HERE_PY, platform="manylinux_2_17_x86_64")
    deployed = tiny.deploy("--skip-tests")
    manifest = json.loads(
        (
            tiny.root / ".shiplane" / "build" / "artifacts" / f"{deployed.result['artifact']}.json"
        ).read_text()
    )
    assert manifest["target"] == {"python_version": HERE_PY, "platform": "manylinux_2_17_x86_64"}
    assert tiny.text("/") == "tiny app serving\n"


# --- which host fits which target (the rule the deploy applies; no processes) ---------------


@pytest.mark.parametrize(
    "target, host, fits",
    [
        ("linux_x86_64", "linux_x86_64", True),
        ("manylinux_2_17_x86_64", "linux_x86_64", True),
        ("manylinux2014_x86_64", "linux_x86_64", True),
        ("musllinux_1_2_aarch64", "linux_aarch64", True),
        ("manylinux_2_28_aarch64", "linux_x86_64", False),
        ("linux_x86_64", "macosx_14_0_arm64", False),
        ("macosx_11_0_universal2", "macosx_14_0_arm64", True),
        ("macosx_11_0_x86_64", "macosx_14_0_arm64", False),
        ("win_amd64", "win_amd64", True),
    ],
)
def test_platform_fits(target: str, host: str, fits: bool) -> None:
    assert platform_fits(target, host) is fits


def test_host_misfit_names_what_differs() -> None:
    target = {"python_version": "3.11", "platform": "linux_x86_64"}
    assert host_misfit(target, {"python_version": "3.11", "platform": "linux_x86_64"}) is None
    assert (
        host_misfit(target, {"python_version": "3.12", "platform": "linux_x86_64"})
        == "Python 3.12, not 3.11"
    )
    assert (
        host_misfit(target, {"python_version": "3.11", "platform": "linux_aarch64"})
        == "platform linux_aarch64, not linux_x86_64"
    )
    # an old manifest (no target) or an agent that does not say: not held against the host
    assert host_misfit({}, {"python_version": "3.12"}) is None
    assert host_misfit(target, {}) is None
