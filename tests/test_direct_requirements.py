"""VCS and local path requirements (issue 19): built into wheels on the controller, so hosts
install offline; a path's files key the caches; the app's own path is never a dependency."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from deployhelp import edit, scaffold
from pkgindex import make_wheel
from shiplane.artifact._backend import _uv
from shiplane.artifact._direct import direct_reference
from shiplane.artifact._wheelhouse import load_lock, pinned, resolve_target, wheelhouse_key
from shiplane.errors import ConfigError

GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t",
}


def library(root: Path, name: str, body: str) -> Path:
    """A one-module library built by hatchling, in ``root``."""
    root.mkdir(parents=True)
    (root / "pyproject.toml").write_text(
        f'[project]\nname = "{name}"\nversion = "1.0"\n\n'
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
    )
    (root / name).mkdir()
    (root / name / "__init__.py").write_text(body)
    return root


def test_lines_read_as_vcs_or_path_requirements(tmp_path: Path) -> None:
    app = tmp_path / "app"
    (app / "libs" / "mylib").mkdir(parents=True)
    git = direct_reference("greet @ git+file:///srv/greet@v1.0 ; python_version >= '3.9'", app)
    assert git is not None and git.name == "greet" and not git.fixed and git.path is None
    assert git.line == 'greet @ git+file:///srv/greet@v1.0 ; python_version >= "3.9"'
    commit = direct_reference(f"git+https://example.org/greet.git@{'a' * 40}#egg=Greet", app)
    assert commit is not None and commit.name == "greet" and commit.fixed
    for line in ("-e ./libs/mylib", "./libs/mylib", "file:libs/mylib"):
        found = direct_reference(line, app)
        assert found is not None and found.path == app / "libs" / "mylib" and not found.is_app
        assert found.line == str(app / "libs" / "mylib")
    for line in ("-e .", ".", f"file://{app}"):
        found = direct_reference(line, app)
        assert found is not None and found.is_app
    for line in ("flask==3.1.3", "--index-url https://u:p@example.org/simple", "-r base.txt"):
        assert direct_reference(line, app) is None
    wheel = make_wheel(app, "Local_Pkg", "2.0", "X = 1\n")
    found = direct_reference(f"./{wheel.name}", app)
    assert found is not None and found.name == "local-pkg" and found.fixed
    with pytest.raises(ConfigError) as caught:
        direct_reference("./libs/typo", app)
    assert caught.value.message == (
        f"the lock names the path ./libs/typo, which does not exist ({app / 'libs' / 'typo'})"
    )


def test_a_path_requirement_is_pinned_by_its_files(tmp_path: Path) -> None:
    """``./libs/mylib`` is a dependency (the app's ``-e .`` is not); it counts as pinned, and
    an edit to its files changes the wheelhouse's key."""
    library(tmp_path / "libs" / "mylib", "mylib", "VALUE = 1\n")
    (tmp_path / "requirements.txt").write_text("-e .\n./libs/mylib\nflask==3.1.3\n")
    lock = load_lock(tmp_path, "")
    assert lock.lines == [str(tmp_path.resolve() / "libs" / "mylib"), "flask==3.1.3"]
    assert lock.names == {"mylib", "flask"} and lock.warning is None
    assert pinned(lock, [])
    target = resolve_target(None, None)
    before = wheelhouse_key(lock, target, [])
    (tmp_path / "libs" / "mylib" / "mylib" / "__init__.py").write_text("VALUE = 2\n")
    assert wheelhouse_key(load_lock(tmp_path, ""), target, []) != before


def test_a_vcs_requirement_at_a_tag_is_warned_of_and_at_a_commit_is_pinned(
    tmp_path: Path,
) -> None:
    (tmp_path / "requirements.txt").write_text("greet @ git+https://e.org/g@v1\nflask==3.1.3\n")
    lock = load_lock(tmp_path, "")
    assert not pinned(lock, []) and lock.warning is not None
    assert lock.warning.startswith("requirements.txt names 1 VCS requirement(s) by a tag or")
    assert "name each one's commit" in lock.warning
    (tmp_path / "requirements.txt").write_text(
        f"greet @ git+https://e.org/g@{'0' * 40}\nflask==3.1.3\n"
    )
    lock = load_lock(tmp_path, "")
    assert pinned(lock, []) and lock.warning is None


def test_a_uv_lock_path_source_is_a_dependency_keyed_by_its_files(tmp_path: Path) -> None:
    """uv.lock's ``[tool.uv.sources]`` path (``uv export`` writes it ``./libs/mylib``): read
    as the requirements file's, its files key the caches too."""
    library(tmp_path / "libs" / "mylib", "mylib", "VALUE = 1\n")
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "app"\nversion = "1"\nrequires-python = ">=3.9"\n'
        'dependencies = ["mylib"]\n\n[tool.uv.sources]\nmylib = { path = "libs/mylib" }\n'
    )
    subprocess.run([_uv(), "lock", "--quiet"], cwd=tmp_path, check=True)
    lock = load_lock(tmp_path, "")
    assert lock.format == "uv" and lock.lines == [str(tmp_path.resolve() / "libs" / "mylib")]
    assert pinned(lock, []) and lock.warning is None
    target = resolve_target(None, None)
    before = wheelhouse_key(lock, target, [])
    (tmp_path / "libs" / "mylib" / "mylib" / "__init__.py").write_text("VALUE = 2\n")
    assert wheelhouse_key(load_lock(tmp_path, ""), target, []) != before


@pytest.mark.slow
def test_an_app_using_a_git_and_a_path_requirement_deploys(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The app needs ``greetlib`` from a local git repository at a tag and ``mylib`` from a
    folder of its own; both are built into wheels, installed offline on the host, and the page
    shows what each returns."""
    base = tmp_path_factory.mktemp("direct")  # short: supervisord's socket path
    repo = library(base / "greetlib", "greetlib", "GREETING = 'hello from git'\n")
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "v1"], ["tag", "v1.0"]):
        subprocess.run(["git", *cmd], cwd=repo, check=True, env=GIT_ENV)
    # the tag is what ships: a later commit on the branch is not
    (repo / "greetlib" / "__init__.py").write_text("GREETING = 'not released'\n")
    subprocess.run(["git", "commit", "-qam", "later"], cwd=repo, check=True, env=GIT_ENV)

    app = scaffold(base)
    try:
        library(app.root / "libs" / "mylib", "mylib", "VALUE = 'and from a path'\n")
        with (app.root / "requirements.txt").open("a") as f:
            f.write(f"greetlib @ git+file://{repo}@v1.0\n./libs/mylib\n")
        edit(
            app,
            "src/demo/views.py",
            'f"<p>stage',
            "f\"<p>{__import__('greetlib').GREETING} {__import__('mylib').VALUE}</p>\\n\"\n"
            '        f"<p>stage',
        )
        app.deploy()
        status, body = app.get("/")
        assert status == 200 and "hello from git and from a path" in body, body
    finally:
        app.stop()
