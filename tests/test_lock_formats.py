"""Every lock format users have (issue 19): requirements.txt, uv.lock, poetry.lock, pdm.lock,
Pipfile.lock, and a pyproject.toml without a lock.

The fixtures under ``tests/apps/locks/`` lock one small app (flask + itsdangerous, pytest in a
dev group) and were made with the real tools, in a scratch venv: ``uv lock`` (uv 0.13.9),
``poetry lock`` (Poetry 2.5.1), ``pdm lock`` (PDM 2.29.4), ``pipenv lock`` (pipenv 2026.10.3)
and ``uv pip compile pyproject.toml --universal --generate-hashes`` for requirements.txt. Only
the Poetry 1 lock (lock-version 2.0, no groups recorded) is derived here from Poetry 2's, and the
small marker locks below are written by hand following the formats' documentation. None of
poetry, pdm or pipenv is needed to run these tests; uv comes with shiplane.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shiplane.artifact._locks import describe_lock, find_lock, lock_format
from shiplane.artifact._wheelhouse import (
    Lock,
    _for_target,
    load_lock,
    pinned,
    read_lock,
    resolve_target,
    wheelhouse_key,
)
from shiplane.errors import ConfigError

LOCKS = Path(__file__).parent / "apps" / "locks"
# The app's runtime dependencies, as every fixture pins them; pytest & co. are the dev group's.
PINS = {
    "blinker": "1.9.0",
    "click": "8.5.1",
    "flask": "3.1.3",
    "itsdangerous": "2.2.0",
    "jinja2": "3.1.6",
    "markupsafe": "3.0.4",
    "werkzeug": "3.1.9",
}
DEV = {"pytest", "iniconfig", "pluggy", "pygments", "packaging", "tomli", "exceptiongroup"}


def fixture(tmp_path: Path, tool: str) -> Path:
    """A copy of one fixture project (the tools' files only, nothing else of the checkout)."""
    dest = tmp_path / tool
    shutil.copytree(LOCKS / tool, dest)
    return dest


def versions(lock: Lock) -> dict[str, str]:
    return {name: pin.split("==")[1] for name, pin in lock.pins.items()}


@pytest.mark.parametrize(
    ("tool", "name"),
    [
        ("requirements", "requirements.txt"),
        ("uv", "uv.lock"),
        ("poetry", "poetry.lock"),
        ("pdm", "pdm.lock"),
        ("pipenv", "Pipfile.lock"),
    ],
)
def test_every_lock_gives_the_same_pinned_set(tmp_path: Path, tool: str, name: str) -> None:
    """The same app locked by each tool: the same pins, runtime only, each with its hashes."""
    project = fixture(tmp_path, tool)
    lock = load_lock(project, "")
    assert lock.path == (project / name).resolve()
    assert versions(lock) == PINS
    assert lock.names == set(PINS)  # not a dev package
    assert not lock.names & DEV
    assert lock.hashed and all("--hash=sha256:" in line for line in lock.lines)
    assert pinned(lock, ["flask"])  # complete: the wheelhouse is cached beyond the project
    assert lock.warning is None
    # named explicitly, the file name says the format
    assert versions(load_lock(project, name)) == PINS


def test_a_poetry1_lock_is_walked_from_the_main_dependencies(tmp_path: Path) -> None:
    """Poetry < 2 (lock-version 2.0) records no groups: the packages reachable from
    pyproject.toml's dependencies are the app's, the dev group's are left out."""
    project = fixture(tmp_path, "poetry")
    text = (project / "poetry.lock").read_text()
    text = re.sub(r"(?m)^(groups|markers) = .*\n", "", text)
    text = text.replace('lock-version = "2.1"', 'lock-version = "2.0"')
    (project / "poetry.lock").write_text(text)
    lock = load_lock(project, "")
    assert versions(lock) == PINS
    assert lock.hashed


def test_markers_are_kept_for_the_hosts(tmp_path: Path) -> None:
    """A Windows-only dependency keeps its marker; a Linux target leaves it out. A package
    without hashes (a git dependency) drops the lock's hashes, all of them."""
    (tmp_path / "Pipfile.lock").write_text(
        json.dumps(
            {
                "_meta": {"hash": {"sha256": "0"}},
                "default": {
                    "flask": {"version": "==3.1.3", "hashes": ["sha256:" + "a" * 64]},
                    "colorama": {
                        "version": "==0.4.6",
                        "hashes": ["sha256:" + "b" * 64],
                        "markers": "sys_platform == 'win32'",
                    },
                    "tool": {"git": "https://example.org/tool.git", "ref": "abc123"},
                },
                "develop": {"pytest": {"version": "==9.2.0", "hashes": []}},
            }
        )
    )
    lock = load_lock(tmp_path, "")
    assert lock.lines == [
        'colorama==0.4.6 ; sys_platform == "win32"',
        "flask==3.1.3",
        "tool @ git+https://example.org/tool.git@abc123",
    ]
    assert not lock.hashed
    linux = resolve_target("3.11", "linux_x86_64")
    assert [line.split("=")[0].split(" ")[0] for line in _for_target(lock.lines, linux)] == [
        "flask",
        "tool",
    ]


def test_poetry2_markers_per_group_and_pdm_markers(tmp_path: Path) -> None:
    """Hand-written locks in Poetry 2's and PDM's documented shapes: a package's marker (Poetry:
    per group) goes on its line; a dev-only package is left out."""
    poetry = tmp_path / "p"
    poetry.mkdir()
    (poetry / "poetry.lock").write_text(
        "[[package]]\n"
        'name = "colorama"\nversion = "0.4.6"\ngroups = ["main", "dev"]\n'
        'markers = {main = "platform_system == \\"Windows\\"", dev = "sys_platform == \\"win32\\""}\n'
        'files = [{file = "colorama-0.4.6-py2.py3-none-any.whl", hash = "sha256:'
        + "c"
        * 64
        + '"}]\n'
        "\n[[package]]\n"
        'name = "pytest"\nversion = "9.2.0"\ngroups = ["dev"]\nfiles = []\n'
        '\n[metadata]\nlock-version = "2.1"\n'
    )
    assert load_lock(poetry, "").lines == [
        f'colorama==0.4.6 ; platform_system == "Windows" --hash=sha256:{"c" * 64}'
    ]
    pdm = tmp_path / "d"
    pdm.mkdir()
    (pdm / "pdm.lock").write_text(
        '[metadata]\ngroups = ["default", "dev"]\nlock_version = "4.5.0"\n'
        "\n[[package]]\n"
        'name = "colorama"\nversion = "0.4.6"\ngroups = ["default"]\n'
        'marker = "sys_platform == \\"win32\\""\nfiles = []\n'
        "\n[[package]]\n"
        'name = "pytest"\nversion = "9.2.0"\ngroups = ["dev"]\nfiles = []\n'
    )
    assert load_lock(pdm, "").lines == ['colorama==0.4.6 ; sys_platform == "win32"']


def test_a_pyproject_without_a_lock_is_resolved_with_a_warning(tmp_path: Path) -> None:
    """[project] dependencies alone: resolved at build time (uv pip compile --universal), kept
    until pyproject.toml changes, and a warning says deploys are not reproducible."""
    project = fixture(tmp_path, "pyproject")
    assert describe_lock(project, "") == (
        "pyproject.toml (no lock: resolved at each build, detected)"
    )
    lock = load_lock(project, "")
    assert lock.format == "pyproject"
    assert {"flask", "itsdangerous", "werkzeug"} <= lock.names and not lock.names & DEV
    assert set(lock.pins) == lock.names  # every one pinned
    assert lock.warning is not None and "not reproducible" in lock.warning
    assert "uv lock" in lock.warning
    cached = list((project / ".shiplane" / "build" / "locks").glob("pyproject-*.txt"))
    assert len(cached) == 1
    assert load_lock(project, "").data == lock.data  # the same resolution, not a new one


def test_detection_order(tmp_path: Path) -> None:
    """Unset, the lock is the first found: requirements.txt, uv.lock, poetry.lock, pdm.lock,
    Pipfile.lock, then a pyproject.toml declaring dependencies."""
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "a"\nversion = "1"\n')
    with pytest.raises(ConfigError):  # a [project] without dependencies locks nothing
        find_lock(tmp_path, None)
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "a"\nversion = "1"\ndependencies = []\n'
    )
    expected = ["pyproject.toml (no lock: resolved at each build, detected)"]
    for name, tool in [
        ("Pipfile.lock", "Pipenv"),
        ("pdm.lock", "PDM"),
        ("poetry.lock", "Poetry"),
        ("uv.lock", "uv"),
        ("requirements.txt", "pip requirements"),
    ]:
        (tmp_path / name).write_text("")
        expected.append(f"{name} ({tool}, detected)")
    assert expected[-1] == describe_lock(tmp_path, "")
    for name in ["requirements.txt", "uv.lock", "poetry.lock", "pdm.lock", "Pipfile.lock"]:
        (tmp_path / name).unlink()
        expected.pop()
        assert describe_lock(tmp_path, "") == expected[-1]
    # given: read as given, whatever else is there; its file name says its format
    (tmp_path / "deps").mkdir()
    (tmp_path / "deps" / "prod.txt").write_text("flask==3.0.3\n")
    assert describe_lock(tmp_path, "deps/prod.txt") == "deps/prod.txt (pip requirements)"
    (tmp_path / "uv.lock").write_text("")
    assert describe_lock(tmp_path, "uv.lock") == "uv.lock (uv)"
    assert [lock_format(n) for n in ("a/poetry.lock", "Pipfile.lock", "x.in", "pdm.lock")] == [
        "poetry",
        "pipenv",
        "requirements",
        "pdm",
    ]


def test_no_lock_is_a_usage_error_naming_the_commands(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        describe_lock(tmp_path, "")
    error = caught.value
    assert error.exit_code == 2
    assert error.message == (
        f"no lock of the app's dependencies in {tmp_path}: looked for requirements.txt, uv.lock, "
        "poetry.lock, pdm.lock, Pipfile.lock and dependencies in pyproject.toml's [project]"
    )
    assert error.hint is not None
    for command in ("uv pip compile requirements.in -o requirements.txt", "uv lock", "poetry lock"):
        assert f"`{command}`" in error.hint


def test_no_lock_stops_the_build_before_anything_is_built(tmp_path: Path) -> None:
    """`shiplane build` in a project without a lock: exit 2, the hint, no artifact."""
    root = tmp_path / "demo"
    subprocess.run(
        [sys.executable, "-m", "shiplane", "init", str(root)], check=True, capture_output=True
    )
    for name in ("requirements.txt", "requirements.in"):
        (root / name).unlink(missing_ok=True)
    toml = root / "shiplane.toml"
    toml.write_text(re.sub(r"(?m)^requirements = .*\n", "", toml.read_text()))
    text = (root / "pyproject.toml").read_text()
    (root / "pyproject.toml").write_text(re.sub(r"(?s)dependencies = \[.*?\]\n", "", text, count=1))
    done = subprocess.run(
        [sys.executable, "-m", "shiplane", "build"],
        check=False,
        cwd=root,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert done.returncode == 2, done.stdout + done.stderr
    out = done.stdout + done.stderr
    assert "no lock of the app's dependencies" in out
    assert "uv pip compile requirements.in -o requirements.txt" in out
    assert not (root / ".shiplane" / "build" / "artifacts").exists()


def test_a_changed_lock_changes_the_cache_keys(tmp_path: Path) -> None:
    """The lock's bytes feed the wheelhouse key and the artifact's inputs: lock again, and
    both change; an unchanged lock keeps them."""
    target = resolve_target(None, None)
    for tool, name in [("uv", "uv.lock"), ("poetry", "poetry.lock"), ("pdm", "pdm.lock")]:
        project = fixture(tmp_path, tool)
        before = wheelhouse_key(load_lock(project, ""), target, ["gunicorn"])
        assert wheelhouse_key(load_lock(project, ""), target, ["gunicorn"]) == before
        path = project / name
        path.write_text(path.read_text().replace("3.1.9", "3.1.8"))
        changed = load_lock(project, "")
        assert versions(changed)["werkzeug"] == "3.1.8"
        assert wheelhouse_key(changed, target, ["gunicorn"]) != before


def test_requirements_files_read_as_before(tmp_path: Path) -> None:
    """A requirements file is read as it always was: includes followed, editables dropped."""
    (tmp_path / "base.txt").write_text("flask==3.1.3\n")
    (tmp_path / "requirements.txt").write_text("-r base.txt\n-e .\nitsdangerous==2.2.0\n")
    lock = load_lock(tmp_path, "")
    assert lock.format == "requirements"
    assert lock.lines == [f"-r {tmp_path.resolve() / 'base.txt'}", "itsdangerous==2.2.0"]
    assert lock == read_lock(tmp_path / "requirements.txt")


@pytest.mark.slow
def test_deploy_an_app_locked_with_uv_lock(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The example app with uv.lock as its only lock (no requirements.txt, [build] requirements
    unset) deploys to the local stage and serves its page."""
    sys.path.insert(0, str(Path(__file__).parent))
    from deployhelp import scaffold

    app = scaffold(tmp_path_factory.mktemp("uvlock"))  # short: supervisord's socket path
    try:
        root = app.root
        # lock with the versions the scaffold's requirements.txt pins (as tested), via uv
        # (markers kept: a pin may hold for some Pythons only)
        pins = re.findall(r"(?m)^[A-Za-z0-9._-]+==.*$", (root / "requirements.txt").read_text())
        with (root / "pyproject.toml").open("a") as f:
            f.write(f"\n[tool.uv]\nconstraint-dependencies = {json.dumps(pins)}\n")
        for name in ("requirements.txt", "requirements.in"):
            (root / name).unlink(missing_ok=True)
        toml = root / "shiplane.toml"
        toml.write_text(re.sub(r"(?m)^requirements = .*\n", "", toml.read_text()))
        from shiplane.artifact._backend import _uv

        subprocess.run([_uv(), "lock", "--quiet"], cwd=root, check=True)
        app.commit("uv.lock instead of requirements.txt")
        assert describe_lock(root, "") == "uv.lock (uv, detected)"
        result = app.deploy()
        status, body = app.get("/")
        assert status == 200
        assert f"release {result['release']}" in body
    finally:
        app.stop()
