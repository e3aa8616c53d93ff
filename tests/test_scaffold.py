"""`shiplane init`: the project it writes, what it refuses to overwrite, and that the project works."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from shiplane.errors import UsageError
from shiplane.scaffold import derive_name, write_project

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

LAYOUT = [
    "pyproject.toml",
    "requirements.txt",
    "shiplane.toml",
    "README.md",
    ".gitignore",
    "alembic.ini",
    "config/base.ini",
    "config/dev.ini",
    "config/test.ini",
    "config/staging.ini",
    "config/prod.ini",
    "db/env.py",
    "db/script.py.mako",
    "db/versions/0001_create_visits.py",
    "src/demo/__init__.py",
    "tests/test_app.py",
    ".secrets/local.env",
]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_writes_the_whole_layout_and_returns_it(tmp_path: Path) -> None:
    target = tmp_path / "demo"
    written = write_project(target)
    for rel in LAYOUT:
        assert (target / rel).is_file(), rel
    assert sorted(written) == sorted(p for p in target.rglob("*") if p.is_file())
    for path in written:
        assert "{{" not in path.read_text() and "__name__" not in str(path.relative_to(target))


def test_deploy_file_names_the_app(tmp_path: Path) -> None:
    write_project(tmp_path / "demo")
    deploy = tomllib.loads((tmp_path / "demo" / "shiplane.toml").read_text())
    assert deploy["app"]["name"] == "demo"
    assert deploy["app"]["wsgi"] == "demo:create_app()"
    assert deploy["config"]["env_prefix"] == "DEMO_"
    assert deploy["services"]["web"]["smoke"] == [{"path": "/", "expect": "demo"}]
    assert deploy["stages"]["local"] == {
        "hosts": ["local"],
        "deploy_to": ".shiplane/local",
        "port": 5000,
    }


def test_deploy_file_passes_shiplane_validation(tmp_path: Path) -> None:
    from shiplane.config.loader import check_semantics, load_project

    write_project(tmp_path / "demo")
    project = load_project(tmp_path / "demo" / "shiplane.toml")
    check_semantics(project)
    assert set(project.deploy.stages) == {"local", "staging", "prod"}


def test_requirements_are_locked_exact_pins_including_gunicorn(tmp_path: Path) -> None:
    write_project(tmp_path / "demo")
    lines = (tmp_path / "demo" / "requirements.txt").read_text().splitlines()
    pins = [line for line in lines if line and not line.lstrip().startswith("#")]
    assert pins
    for line in pins:
        assert re.fullmatch(r"[a-z0-9][a-z0-9._-]*==[0-9][^ ;]*( ; .+)?", line), line
    pinned = {line.split("==")[0] for line in pins}
    # The app's direct dependencies, the web server, and their transitive dependencies.
    assert {"flask", "sqlalchemy", "alembic", "gunicorn", "werkzeug", "mako"} <= pinned


def test_secrets_file_is_private_with_a_fresh_key(tmp_path: Path) -> None:
    write_project(tmp_path / "a")
    write_project(tmp_path / "b")
    secrets_a = tmp_path / "a" / ".secrets" / "local.env"
    assert _mode(secrets_a) == 0o600
    assert _mode(secrets_a.parent) == 0o700
    key_a = secrets_a.read_text()
    assert re.fullmatch(r"SECRET_KEY=[0-9a-f]{64}\n", key_a)
    assert key_a != (tmp_path / "b" / ".secrets" / "local.env").read_text()


def test_secrets_file_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_project(tmp_path / "demo")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "demo" / ".secrets" / "local.env") == 0o600


@pytest.mark.parametrize("existing", ["shiplane.toml", "pyproject.toml"])
def test_refuses_an_existing_project_naming_the_file(tmp_path: Path, existing: str) -> None:
    (tmp_path / existing).write_text("# mine\n")
    with pytest.raises(UsageError) as excinfo:
        write_project(tmp_path, name="demo")
    assert str(tmp_path / existing) in str(excinfo.value)
    assert excinfo.value.exit_code == 2
    # Nothing was written: the user's file is intact and no other file appeared.
    assert (tmp_path / existing).read_text() == "# mine\n"
    assert [p.name for p in tmp_path.iterdir()] == [existing]


def test_second_init_refuses_then_force_overwrites_but_keeps_the_secret(tmp_path: Path) -> None:
    target = tmp_path / "demo"
    write_project(target)
    secret = (target / ".secrets" / "local.env").read_text()
    (target / "README.md").write_text("edited\n")
    with pytest.raises(UsageError, match="shiplane.toml"):
        write_project(target)
    assert (target / "README.md").read_text() == "edited\n"

    written = write_project(target, force=True)
    assert target / "README.md" in written
    assert "# demo" in (target / "README.md").read_text()
    assert (target / ".secrets" / "local.env").read_text() == secret


def test_refuses_to_overwrite_other_files_of_the_layout(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("my readme\n")
    with pytest.raises(UsageError, match="README.md"):
        write_project(tmp_path, name="demo")
    assert (tmp_path / "README.md").read_text() == "my readme\n"


def test_refuses_a_target_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "demo").write_text("")
    with pytest.raises(UsageError, match="not a directory"):
        write_project(tmp_path / "demo")


@pytest.mark.parametrize(
    ("directory", "expected"),
    [
        ("demo", "demo"),
        ("my-app", "my_app"),
        ("My App.v2", "my_app_v2"),
        ("2fa", "app_2fa"),
        ("class", "class_"),
    ],
)
def test_package_name_derives_from_the_directory(
    tmp_path: Path, directory: str, expected: str
) -> None:
    assert derive_name(tmp_path / directory) == expected


@pytest.mark.parametrize("name", ["My-App", "1app", "def", "flask", "json", ""])
def test_refuses_bad_or_shadowing_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(UsageError):
        write_project(tmp_path / "x", name=name)
    assert not (tmp_path / "x").exists()


def test_dashed_directory_gives_a_working_project(tmp_path: Path) -> None:
    """The generated project's own test suite passes, run as its README says (no install)."""
    target = tmp_path / "my-app"
    write_project(target)
    assert (target / "src" / "my_app" / "__init__.py").is_file()
    deploy = tomllib.loads((target / "shiplane.toml").read_text())
    assert deploy["app"]["wsgi"] == "my_app:create_app()"
    assert deploy["config"]["env_prefix"] == "MY_APP_"
    assert "sqlite:///var/my_app.sqlite3" in (target / "config" / "base.ini").read_text()
    assert 'name = "my_app"' in (target / "pyproject.toml").read_text()

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SHIPLANE_", "PYTEST_"))}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        # Its own basetemp: the default one is shared with (and pruned by) other pytest runs.
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--basetemp={tmp_path / 'tmp'}",
        ],
        check=False,
        cwd=target,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b\d+ passed\b", result.stdout)
    assert not list(target.rglob("*.sqlite3")), "the tests must not touch the project's database"
