"""Every verb's ``--json`` output follows docs/json.md: one JSON object per line, each an event,
the result or an error, each with the contract's version; the error's exit code is the process's."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deployhelp import Project, free_port, scaffold

pytestmark = pytest.mark.slow

EXTRA = """
[tasks.hello]
run = "echo hello"

[stages.again]
hosts = ["local"]
deploy_to = ".shiplane/again"
port = {port}
promote_from = "local"
"""


def lines_of(done: Any) -> list[dict[str, Any]]:
    """Each stdout line parsed and checked against the contract; the last is the result or error."""
    parsed = []
    for line in done.stdout.splitlines():
        message = json.loads(line)
        assert isinstance(message, dict) and message.get("v") == 1, line
        kinds = [k for k in ("result", "error") if k in message] or (
            ["event"] if "phase" in message else []
        )
        assert len(kinds) == 1, f"neither an event, a result nor an error: {line}"
        if "error" in message:
            error = message["error"]
            assert isinstance(error["kind"], str) and isinstance(error["message"], str)
            assert error["exit_code"] == done.returncode
        if "phase" in message:
            assert isinstance(message["status"], str)
        parsed.append(message)
    assert parsed and ("result" in parsed[-1] or "error" in parsed[-1]), (
        done.stdout[-500:] + done.stderr[-500:]
    )
    assert all("phase" in m for m in parsed[:-1]), "only events come before the result"
    return parsed


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    project = scaffold(tmp_path_factory.mktemp("jc"))  # short: unix socket paths are limited
    toml = project.root / "shiplane.toml"
    toml.write_text(toml.read_text() + EXTRA.format(port=free_port()))
    secrets = project.root / ".secrets" / "again.env"
    secrets.write_text((project.root / ".secrets" / "local.env").read_text())
    secrets.chmod(0o600)
    project.commit("a task and a second local stage")
    try:
        yield project
    finally:
        project.shiplane("stop", "--all", "--stage", "again")
        project.stop()


VERBS: list[tuple[str, ...]] = [
    ("check",),
    ("config", "show", "--stage", "local"),
    ("test",),
    ("build",),
    ("plan", "--stage", "local"),
    ("deploy", "--stage", "local", "--skip-tests"),
    ("copy", "--stage", "local", "--skip-tests"),
    ("install", "--stage", "local", "--skip-tests"),
    ("deploy", "--stage", "local", "--skip-tests"),
    ("promote", "--from", "local", "--to", "again"),
    ("status", "--stage", "local"),
    ("releases", "--stage", "local"),
    ("history", "--stage", "local"),
    ("logs", "--stage", "local", "--lines", "5"),
    ("restart", "--stage", "local"),
    ("reload", "--stage", "local"),
    ("rollback", "--stage", "local", "--yes"),
    ("prune", "--stage", "local"),
    ("tasks",),
    ("run", "hello"),
    ("lock", "--stage", "local", "--reason", "json"),
    ("lock", "status", "--stage", "local"),
    ("unlock", "--stage", "local"),
    ("verify", "--stage", "local"),
    ("stop", "--stage", "local"),
    ("start", "--stage", "local"),
    ("exec", "--stage", "local", "--", "true"),
    ("setup", "--stage", "local"),
    ("doctor", "--stage", "local"),
    ("clean",),
]


def test_every_verb_speaks_the_contract(app: Project, tmp_path: Path) -> None:
    for verb in VERBS:
        cut = (
            verb.index("--") if "--" in verb else len(verb)
        )  # after `--`, words are exec's command
        done = app.shiplane(*verb[:cut], "--json", *verb[cut:])
        parsed = lines_of(done)
        assert done.returncode == 0 and "result" in parsed[-1], (
            verb,
            done.stdout[-800:],
            done.stderr[-800:],
        )
    done = app.shiplane("init", str(tmp_path / "other"), "--json")
    assert "result" in lines_of(done)[-1]


def test_errors_are_json_too(app: Project) -> None:
    unknown = app.shiplane("status", "--stage", "nope", "--json")
    assert unknown.returncode == 2
    assert lines_of(unknown)[-1]["error"]["kind"] in ("usage", "config")
    app.shiplane("lock", "--stage", "local", "--reason", "held", check=True)
    try:
        refused = app.shiplane("deploy", "--stage", "local", "--skip-tests", "--json")
        assert refused.returncode == 1
        last = lines_of(refused)[-1]
        assert (
            "result" in last and last["result"]["ok"] is False and "held" in last["result"]["error"]
        )
    finally:
        app.shiplane("unlock", "--stage", "local", check=True)
