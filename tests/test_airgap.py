"""Air-gapped and private builds (issue 19, item 7): a build that may not reach a public index
takes shiplane's own host tools from shiplane itself, and says whose requirement is missing."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from shiplane.artifact import describe_packages
from shiplane.artifact._index import PackageAccess, absolute_find_links, whose_requirement
from shiplane.artifact._store import sha256_file
from shiplane.artifact._tools import TOOLS, tool_wheels
from shiplane.errors import ConfigError, OperationError
from shiplane.secret import Secret

# Any HTTP(S) request through these fails at once: a build that tries the network is caught.
NO_NETWORK = {
    "PIP_NO_INDEX": "1",
    "UV_OFFLINE": "1",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "ALL_PROXY": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
}


def test_the_host_tools_come_from_shiplane_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No index, an empty cache: supervisor's wheel is shiplane's own copy, its sha256 the pin."""
    for name, value in NO_NETWORK.items():
        monkeypatch.setenv(name, value)
    events: list[str] = []
    wheels = tool_wheels(tmp_path / "tools", lambda step, detail: events.append(detail))
    assert [w.name for w in wheels] == [t.wheel for t in TOOLS]
    assert sha256_file(wheels[0])[0] == TOOLS[0].sha256
    assert "supervisor-4.3.0-py2.py3-none-any.whl (shipped with shiplane)" in events
    # the second build reuses the cached copy
    assert tool_wheels(tmp_path / "tools", lambda step, detail: events.append(detail)) == wheels
    assert events[-1] == "reused supervisor-4.3.0"


def test_a_missing_tool_is_named_as_shiplanes_not_the_locks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shiplane installed without its copy, offline: the error says the wheel is shiplane's
    own tool, not the user's lock, and how to provide it."""
    for name, value in NO_NETWORK.items():
        monkeypatch.setenv(name, value)
    empty = tmp_path / "packaged"
    empty.mkdir()
    with pytest.raises(OperationError) as caught:
        tool_wheels(tmp_path / "tools", lambda step, detail: None, packaged=empty)
    message = caught.value.message
    assert message.startswith("supervisor==4.3.0 cannot be fetched: it is shiplane's own host tool")
    assert "not a requirement of your lock" in message
    assert caught.value.hint is not None
    assert "supervisor-4.3.0-py2.py3-none-any.whl into your find-links folder" in caught.value.hint
    assert not (tmp_path / "tools" / "supervisor-4.3.0").exists()


@pytest.mark.slow
def test_an_air_gapped_build_deploys_from_a_folder_of_the_locks_wheels(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """One online build warms shiplane's cache; then, with no index and no network, a changed
    lock is resolved from a folder holding only the lock's wheels, and the app deploys and
    serves. A wheel missing from the folder is named as the lock's requirement."""
    sys.path.insert(0, str(Path(__file__).parent))
    from deployhelp import edit, scaffold

    base = tmp_path_factory.mktemp("airgap")  # short: supervisord's socket path
    cache = {"SHIPLANE_CACHE_DIR": str(base / "cache")}
    app = scaffold(base)
    try:
        app.shiplane("build", env=cache, check=True)
        folder = base / "wheels"
        folder.mkdir()
        for wheel in (base / "cache" / "wheelhouse").glob("*/*.whl"):
            shutil.copy(wheel, folder)
        assert any(w.name.startswith("flask-") for w in folder.iterdir())
        assert not any(w.name.startswith("supervisor-") for w in folder.iterdir())
        offline = {**cache, **NO_NETWORK, "PIP_FIND_LINKS": str(folder)}

        edit(app, "requirements.txt", "flask==", "# built without an index\nflask==")
        result = app.deploy(env=offline)
        status, body = app.get("/")
        assert status == 200 and f"release {result['release']}" in body

        werkzeug = next((base / "cache" / "wheelhouse").glob("*/werkzeug-*.whl"))
        (folder / werkzeug.name).unlink()
        edit(app, "requirements.txt", "flask==", "# again\nflask==")
        done = app.shiplane("build", env=offline)
        assert done.returncode == 1, done.stdout + done.stderr
        out = done.stdout + done.stderr
        assert "werkzeug==" in out and "cannot be resolved" in out
        assert "werkzeug is a requirement of your lock (requirements.txt)" in out
        assert f"pip looked in the find-links folder {folder} (PIP_NO_INDEX=1: no index)" in out
        assert "supervisor" not in out and "Traceback" not in out

        # a cold cache: the build backend's requirements are not in the folder, and are
        # named as the app's [build-system] requires, not as the lock's
        shutil.copy(werkzeug, folder)
        cold = {**offline, "SHIPLANE_CACHE_DIR": str(base / "cold")}
        edit(app, "requirements.txt", "flask==", "# cold\nflask==")  # a new app wheel too
        done = app.shiplane("build", env=cold)
        out = done.stdout + done.stderr
        assert done.returncode == 1, out
        assert "the app's build backend needs hatchling" in out
        assert "[build-system] requires in pyproject.toml" in out
        assert "put their wheels into the find-links folder" in out
    finally:
        app.stop()


def test_check_says_where_packages_and_host_tools_come_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`shiplane check`'s packages line: the lock's find-links folder (relative to the lock),
    its private index without credentials, offline or not, and the host tools' source."""
    (tmp_path / "requirements.txt").write_text(
        "--extra-index-url https://me:${PYPI_TOKEN}@pypi.corp.example/simple\n"
        "-f ./wheels\nflask==3.1.3\n"
    )
    for name in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "UV_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    tools = "host tools: supervisor 4.3.0, shipped with shiplane (no index needed)"
    folder = tmp_path.resolve() / "wheels"
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    assert describe_packages(tmp_path) == (
        f"the find-links folder {folder} (PIP_NO_INDEX=1: no index); {tools}"
    )
    monkeypatch.delenv("PIP_NO_INDEX")
    assert describe_packages(tmp_path) == (
        f"the find-links folder {folder} and the package index "
        f"(https://pypi.corp.example/simple); {tools}"
    )


def test_a_missing_wheel_is_named_as_the_locks_or_as_shiplanes_addition(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The lock's own requirement, a package shiplane adds for the server, or a dependency of
    the lock's: each said as such, with where pip looked; a build secret never shown."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    access = PackageAccess.of(["--find-links /srv/wheels"], [Secret("s3cr3t", "PYPI_TOKEN")])
    lock = Path("/app/requirements.txt")

    def explain(requirement: str) -> tuple[str, str | None]:
        message = f"building the wheelhouse: {requirement} cannot be resolved\npip said s3cr3t"
        return whose_requirement(
            message, None, lock=lock, locked=["Flask"], added=["gunicorn"], access=access
        )

    where = "pip looked in the find-links folder /srv/wheels (PIP_NO_INDEX=1: no index)"
    message, hint = explain("flask==3.1.3")
    assert message.splitlines()[1] == (
        f"flask is a requirement of your lock (requirements.txt); {where}"
    )
    assert message.splitlines()[2] == "pip said ***"
    assert hint is not None and hint.startswith("put its wheel into the find-links folder")
    message, hint = explain("gunicorn")
    assert "gunicorn is not in your lock: shiplane adds it to run the app's server" in message
    assert hint is not None and "add gunicorn to requirements.txt, pinned" in hint
    message, _ = explain("markupsafe>=2")
    assert "markupsafe is a dependency of a requirement of your lock" in message


def test_package_access_reads_pip_and_uv_settings(tmp_path: Path) -> None:
    """UV_OFFLINE=1 is pip's --no-index; the build secrets are in pip's and uv's environment
    only; pip's index variables reach uv under uv's names; a relative find-links is made
    absolute against the lock's folder."""
    token = Secret("t0k", "PYPI_TOKEN")
    access = PackageAccess.of(["flask==3.1.3", "--find-links /w", "--no-index"], [token])
    assert access.options == ("--find-links /w", "--no-index")
    assert access.offline({}) == "the lock's --no-index"
    plain = PackageAccess()
    assert plain.offline({"UV_OFFLINE": "1"}) == "UV_OFFLINE=1"
    assert plain.offline({"PIP_NO_INDEX": "0"}) is None
    env = access.env({"UV_OFFLINE": "true", "PIP_INDEX_URL": "https://idx/simple"})
    assert env["PIP_NO_INDEX"] == "1" and env["PYPI_TOKEN"] == "t0k"
    assert access.uv_env({"PIP_INDEX_URL": "https://idx/simple"})["UV_INDEX_URL"] == (
        "https://idx/simple"
    )
    assert plain.uv_args({"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/a /b"}) == [
        "--no-index",
        "--find-links",
        "/a",
        "--find-links",
        "/b",
    ]
    assert absolute_find_links("-f ./wheels", tmp_path) == f"-f {tmp_path.resolve() / 'wheels'}"
    assert absolute_find_links("--find-links=https://h/w", tmp_path) == "--find-links=https://h/w"
    assert repr(access).count("t0k") == 0
    remote = PackageAccess.of(["--find-links https://me:pw@wheels.example/w/"])
    assert (
        remote.sources({})
        == "the find-links folder https://wheels.example/w/ and the package index"
    )


def test_a_variable_the_lock_uses_and_nothing_sets_is_refused() -> None:
    """``${PYPI_TOKEN}`` in the lock with no such build secret nor variable: exit 2 naming it,
    not the index's 401."""
    lines = ["--extra-index-url https://me:${PYPI_TOKEN}@pypi.example/simple", "x==1"]
    with pytest.raises(ConfigError) as caught:
        PackageAccess().require_names(lines, "requirements.txt", {"OTHER": "1"})
    assert caught.value.exit_code == 2
    assert caught.value.message.startswith("requirements.txt uses ${PYPI_TOKEN}, which nothing")
    assert caught.value.hint is not None and "[build] secrets" in caught.value.hint
    PackageAccess().require_names(lines, "requirements.txt", {"PYPI_TOKEN": "t"})
    PackageAccess.of(lines, [Secret("t", "PYPI_TOKEN")]).require_names(lines, "r.txt", {})
