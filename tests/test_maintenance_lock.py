"""A maintenance lock: held with a reason until its owner unlocks it, and every deploy refused
meanwhile names who holds it, since when and why."""

from __future__ import annotations

import getpass
import json
from collections.abc import Iterator

import pytest

from deployhelp import Project, scaffold

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    project = scaffold(tmp_path_factory.mktemp("ml"))  # short: unix socket paths are limited
    try:
        project.deploy()
        yield project
    finally:
        project.stop()


def test_a_maintenance_lock_refuses_deploys_until_its_owner_unlocks(app: Project) -> None:
    app.shiplane("lock", "--stage", "local", "--reason", "database upgrade", check=True)
    status = json.loads(
        app.shiplane("lock", "status", "--stage", "local", "--json", check=True).stdout
    )["result"]
    message = status["hosts"]["local"]["message"]
    assert (
        "for: database upgrade" in message
        and f"{getpass.getuser()}@" in message
        and "ago" in message
    )

    refused = app.deploy(check=False)
    assert refused["exit"] == 1
    assert (
        "for: database upgrade" in refused["output"]
        and "held until `shiplane unlock`" in refused["output"]
    )

    unlocked = app.shiplane("unlock", "--stage", "local")  # our own lock: no --force needed
    assert unlocked.returncode == 0, unlocked.stdout + unlocked.stderr
    assert "not locked" in app.shiplane("lock", "status", "--stage", "local", check=True).stdout
    assert app.deploy()["exit"] == 0
