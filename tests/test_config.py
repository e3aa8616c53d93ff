"""The deploy file and layered config as a user meets them: through the `shiplane` command."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from shiplane.cli import main

BASE = """\
[app]
name = "demo"
wsgi = "demo:create_app()"

[config]
files = ["config/base.ini", "config/{stage}.ini"]
env_prefix = "DEMO_"
secrets = ["SECRET_KEY", "DEMO_DATABASE__PASSWORD"]
secrets_file = ".secrets/{stage}.env"

[services.web]
workers = 2

[env]
LOG_LEVEL = "info"

[stages.local]
hosts = ["local"]
deploy_to = ".shiplane/local"
port = 5000
config = { app = { title = "Local" } }
env = { LOG_LEVEL = "debug" }

[stages.prod]
hosts = ["deploy@web1", "deploy@web2:2222"]
deploy_to = "/srv/demo"
port = 8000
"""

SECRET_VALUES = ("s3cr3t-key-value-123", "pw-Very-Secret-456")


def project(tmp_path: Path, toml: str = BASE) -> Path:
    (tmp_path / "config").mkdir(exist_ok=True)
    (tmp_path / "config/base.ini").write_text(
        "[app]\ntitle = Base\ndebug = false\n[database]\nurl = sqlite:///x.db\n"
    )
    (tmp_path / "config/local.ini").write_text("[app]\ndebug = true\n")
    (tmp_path / "requirements.txt").write_text("flask==3.0.3\n")  # check names the lock
    (tmp_path / "shiplane.toml").write_text(toml)
    return tmp_path


def run(path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    runner = CliRunner()
    result = runner.invoke(
        main, ["--file", str(path / "shiplane.toml"), *args], env=env or {}, catch_exceptions=False
    )
    return result.exit_code, result.output


def secrets_env() -> dict[str, str]:
    return {"SECRET_KEY": SECRET_VALUES[0], "DEMO_DATABASE__PASSWORD": SECRET_VALUES[1]}


def test_check_accepts_a_valid_file(tmp_path: Path) -> None:
    code, out = run(project(tmp_path), "check")
    assert code == 0, out
    assert "stages: local, prod" in out and "lock: requirements.txt (pip requirements" in out


def test_check_refuses_a_project_without_a_lock_saying_how_to_make_one(tmp_path: Path) -> None:
    (project(tmp_path) / "requirements.txt").unlink()
    code, out = run(tmp_path, "check")
    assert code == 2 and "no lock of the app's dependencies" in out and "uv lock" in out, out
    toml = tmp_path / "shiplane.toml"
    toml.write_text(
        toml.read_text().replace("[app]\n", '[build]\nrequirements = "deps/prod.txt"\n\n[app]\n', 1)
    )
    code, out = run(tmp_path, "check")
    assert code == 2 and "deps/prod.txt, which is not in" in out, out
    assert "uv pip compile pyproject.toml -o deps/prod.txt" in out, out


@pytest.mark.parametrize(
    ("edit", "line", "expected"),
    [
        (lambda t: t.replace('name = "demo"', 'name = "demo'), 2, "not valid TOML"),
        (lambda t: t.replace("workers = 2", 'workers = "many"'), 12, "services.web.workers"),
        (
            lambda t: t.replace("port = 5000", "prot = 5000"),
            20,
            "unknown key 'prot'; did you mean 'port'?",
        ),
        (
            lambda t: t.replace('deploy_to = "/srv/demo"\n', ""),
            24,
            "stages.prod.deploy_to: required key is missing",
        ),
        (
            lambda t: t.replace('hosts = ["deploy@web1", "deploy@web2:2222"]', "hosts = []"),
            25,
            "stages.prod.hosts",
        ),
        (
            lambda t: t.replace('[app]\nname = "demo"\n', "[app]\n"),
            1,
            "app.name: required key is missing",
        ),
        (
            lambda t: t.replace("[services.web]", "[services.wbe]\ncommand = 1\n[services.web]"),
            12,
            "services.wbe.command",
        ),
        (
            lambda t: t.replace('hosts = ["local"]', 'hosts = ["bad host!"]'),
            18,
            "stages.local.hosts",
        ),
    ],
)
def test_bad_deploy_file_names_file_line_and_key(
    tmp_path: Path, edit, line: int, expected: str
) -> None:
    path = project(tmp_path, edit(BASE))
    code, out = run(path, "check")
    assert code == 2, out
    assert str(path / "shiplane.toml") in out
    assert f"shiplane.toml:{line}" in out, out
    assert expected in out
    assert "Traceback" not in out


def test_port_clash_between_stages_on_one_host(tmp_path: Path) -> None:
    toml = BASE + '\n[stages.dev]\nhosts = ["local"]\ndeploy_to = ".shiplane/dev"\nport = 5000\n'
    code, out = run(project(tmp_path, toml), "check")
    assert code == 2
    assert "stages.dev.port" in out and "already used by stage 'local'" in out
    assert "shiplane.toml:32" in out


def test_release_hook_inputs_must_stay_inside_the_project(tmp_path: Path) -> None:
    toml = BASE + '\n[hooks]\nrelease = "alembic upgrade head"\nrelease_if_changed = ["../db/**"]\n'
    code, out = run(project(tmp_path, toml), "check")
    assert code == 2
    assert "hooks.release_if_changed" in out and "inside the project" in out and "'../db/**'" in out
    assert "Traceback" not in out


def test_unknown_stage_suggests_the_close_one(tmp_path: Path) -> None:
    code, out = run(project(tmp_path), "config", "show", "--stage", "prdo", env=secrets_env())
    assert code == 2
    assert "unknown stage 'prdo'" in out and "did you mean 'prod'?" in out


def test_layers_explain_who_set_each_key_and_what_it_overrode(tmp_path: Path) -> None:
    env = {**secrets_env(), "DEMO_APP__DEBUG": "maybe"}
    code, out = run(
        project(tmp_path), "config", "show", "--stage", "local", "--explain", "--json", env=env
    )
    assert code == 0, out
    rows = {row["key"]: row for row in json.loads(out)["result"]}
    assert rows["app.title"]["value"] == "Local"
    assert rows["app.title"]["layer"] == "shiplane.toml [stages.local.config]"
    assert [o["layer"] for o in rows["app.title"]["overrides"]] == ["config/base.ini"]
    assert rows["app.debug"]["value"] == "maybe"
    assert [o["layer"] for o in rows["app.debug"]["overrides"]] == [
        "config/local.ini",
        "config/base.ini",
    ]
    assert rows["database.url"]["layer"] == "config/base.ini"
    assert rows["database.password"]["value"] == "***"
    assert rows["LOG_LEVEL"]["value"] == "debug" and rows["LOG_LEVEL"]["kind"] == "env"


def test_missing_secrets_are_all_listed_in_one_error(tmp_path: Path) -> None:
    code, out = run(project(tmp_path), "config", "show", "--stage", "local")
    assert code == 2
    assert "missing secrets: SECRET_KEY, DEMO_DATABASE__PASSWORD" in out
    assert ".secrets/local.env" in out


def test_secrets_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = project(tmp_path)
    (path / ".secrets").mkdir()
    secrets = path / ".secrets/local.env"
    secrets.write_text(
        f"SECRET_KEY={SECRET_VALUES[0]}\nDEMO_DATABASE__PASSWORD='{SECRET_VALUES[1]}'\n"
    )
    secrets.chmod(0o644)
    code, out = run(path, "config", "show", "--stage", "local")
    assert code == 2
    assert "readable by others (mode 0644)" in out and "chmod 600" in out
    secrets.chmod(0o600)
    code, out = run(path, "config", "show", "--stage", "local")
    assert code == 0, out
    assert "password = ***" in out


def test_secrets_command_supplies_what_is_missing(tmp_path: Path) -> None:
    toml = BASE.replace(
        'secrets_file = ".secrets/{stage}.env"',
        f"secrets_command = \"printf 'SECRET_KEY={SECRET_VALUES[0]}\\\\nDEMO_DATABASE__PASSWORD=$SHIPLANE_STAGE-{SECRET_VALUES[1]}\\\\n'\"",
    )
    code, out = run(project(tmp_path, toml), "config", "show", "--stage", "local", "--json")
    assert code == 0, out
    shown = json.loads(out)["result"]
    assert shown["env"]["SECRET_KEY"] == "***"


def test_secret_values_never_appear_in_any_output(tmp_path: Path) -> None:
    """Every read verb, every format: the secrets' values are nowhere in what shiplane prints."""
    path = project(tmp_path)
    env = secrets_env()
    outputs = []
    for args in (
        ["check"],
        ["config", "show", "-s", "local"],
        ["config", "show", "-s", "local", "--explain"],
        ["config", "show", "-s", "local", "--json"],
        ["config", "show", "-s", "local", "--explain", "--json"],
        ["-v", "config", "show", "-s", "local"],
        ["config", "show", "-s", "local", "--set", "port=abc"],
    ):
        outputs.append(run(path, *args, env=env)[1])
    # an error that would quote a secret: a bad value in a rendered template
    text = "\n".join(outputs)
    assert "***" in text
    for value in SECRET_VALUES:
        assert value not in text


def test_override_is_validated_like_the_file(tmp_path: Path) -> None:
    code, out = run(
        project(tmp_path), "config", "show", "-s", "local", "--set", "port=abc", env=secrets_env()
    )
    assert code == 2
    assert "stages.local.port" in out and "'abc'" in out
    code, out = run(
        project(tmp_path),
        "config",
        "show",
        "-s",
        "local",
        "--set",
        "config.app.title=Over",
        env=secrets_env(),
    )
    assert code == 0 and "title = Over" in out


def test_task_cycle_exits_2_naming_the_cycle(tmp_path: Path) -> None:
    toml = BASE + textwrap.dedent("""
        [tasks.a]
        run = "true"
        needs = ["b"]
        [tasks.b]
        run = "true"
        needs = ["a"]
    """)
    code, out = run(project(tmp_path, toml), "tasks")
    assert code == 2
    assert "cycle" in out and ("a -> b -> a" in out or "b -> a -> b" in out)


def test_run_executes_dependencies_and_names_the_failed_task(tmp_path: Path) -> None:
    toml = BASE + textwrap.dedent("""
        [tasks.first]
        run = "echo one > first.txt"
        [tasks.second]
        run = "test -f first.txt && exit 3"
        needs = ["first"]
        [tasks.third]
        run = "echo never > third.txt"
        needs = ["second"]
    """)
    path = project(tmp_path, toml)
    code = (
        CliRunner().invoke(main, ["--file", str(path / "shiplane.toml"), "run", "third"]).exit_code
    )
    assert code == 1
    assert (path / "first.txt").exists()
    assert not (path / "third.txt").exists()


def test_no_traceback_for_missing_deploy_file(tmp_path: Path) -> None:
    runner = CliRunner()
    old = os.getcwd()
    os.chdir(tmp_path)
    try:
        result = runner.invoke(main, ["check"])
    finally:
        os.chdir(old)
    assert result.exit_code == 2
    assert "no shiplane.toml" in result.output and "shiplane init" in result.output


def test_check_warns_of_a_lock_that_does_not_pin_everything(tmp_path: Path) -> None:
    root = project(tmp_path)
    (root / "requirements.txt").write_text("flask==3.0.3\nrequests>=2\n")
    code, out = run(root, "check")
    assert code == 0, out  # a warning: loose requirements are common, and still build
    assert "warning: requirements.txt does not pin 1 requirement(s) (requests)" in out, out
    assert "uv pip compile" in out
