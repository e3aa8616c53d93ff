"""gunicorn's options from the deploy file (typed keys and a checked pass-through), and the
placeholders {deploy_to}, {shared}, {release} in env values and hook commands, expanded on the host."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployhelp import scaffold

WEB = """
[services.web]
server = "gunicorn"
workers = 2
threads = 4
access_log = true
options = ["--log-level=debug"]
healthcheck = { path = "/up", timeout = 15 }
"""


def with_web(toml: Path, web: str) -> None:
    text = toml.read_text()
    start = text.index("[services.web]")
    end = text.index("[shared]")
    toml.write_text(text[:start] + web.strip() + "\n\n" + text[end:])


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


@pytest.mark.slow
def test_server_options_and_placeholders_reach_the_host(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    project = scaffold(tmp_path_factory.mktemp("so"))  # short: unix socket paths are limited
    toml = project.root / "shiplane.toml"
    with_web(toml, WEB)
    text = toml.read_text().replace(
        'LOG_TO_STDOUT = "1"', 'LOG_TO_STDOUT = "1"\nDATA_DIR = "{shared}/data"'
    )
    toml.write_text(
        text.replace(
            'release = "alembic upgrade head"',
            'release = "alembic upgrade head"\nafter_install = ["echo {release} $DATA_DIR > {shared}/where"]',
        )
    )
    project.commit("server options and placeholders")
    try:
        done = project.deploy()
        release = project.deploy_root / "releases" / done["release"]
        assert (project.deploy_root / "shared" / "where").read_text().split() == [
            str(release),
            str(project.deploy_root / "shared" / "data"),
        ]
        assert project.get("/")[0] == 200
        status = project.shiplane("status", "--stage", "local", "--json", check=True)
        import json

        web = next(
            s
            for s in json.loads(status.stdout)["result"]["hosts"]["local"]["services"]
            if s["name"] == "web" and s.get("release") == done["release"]
        )
        argv = cmdline(web["pid"])
        assert (
            "--threads=4" in argv and "--access-logfile=-" in argv and "--log-level=debug" in argv
        ), argv
        log = (project.deploy_root / "log" / "web.log").read_text()
        assert '"GET / HTTP/1.1" 200' in log  # the access log, in the service's log
    finally:
        project.stop()


@pytest.mark.parametrize(
    ("option", "says"),
    [
        ("--bind=0.0.0.0:80", "--bind is set by shiplane"),
        ("--threds=3", "did you mean --threads"),
        ("-w 3", "is not a gunicorn option"),
    ],
)
def test_options_are_checked_against_gunicorns_names(
    tmp_path: Path, option: str, says: str
) -> None:
    import subprocess
    import sys

    subprocess.run(
        [sys.executable, "-m", "shiplane", "init", str(tmp_path / "app")],
        check=True,
        capture_output=True,
    )
    toml = tmp_path / "app" / "shiplane.toml"
    with_web(toml, WEB.replace('["--log-level=debug"]', f'["{option}"]'))
    done = subprocess.run(
        [sys.executable, "-m", "shiplane", "check"],
        cwd=tmp_path / "app",
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2 and says in done.stderr and "services.web.options" in done.stderr, (
        done.stderr
    )
