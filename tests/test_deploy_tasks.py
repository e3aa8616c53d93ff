"""User tasks hooked into the deploy run where `shiplane tasks` shows them: locally or on the
hosts, in the new release once it is installed, and a failing one stops the deploy before any
switch, as a hook does."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from deployhelp import Project, scaffold

pytestmark = pytest.mark.slow

TASKS = """
[tasks.announce]
run = "echo announcing the deploy"
before = ["lock"]

[tasks.warm]
run = "basename $PWD > ../../warmed-in"
on = "all"
after = ["release"]
"""


@pytest.fixture
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    project = scaffold(tmp_path_factory.mktemp("dt"))  # short: unix socket paths are limited
    toml = project.root / "shiplane.toml"
    toml.write_text(toml.read_text().replace("[stages.local]", TASKS + "\n[stages.local]"))
    project.commit("tasks")
    try:
        yield project
    finally:
        project.stop()


def test_hooked_tasks_run_at_their_point(app: Project) -> None:
    shown = app.shiplane("tasks", check=True).stdout
    assert (
        shown.index("announce")
        < shown.index("lock")
        < shown.index("release")
        < shown.index("warm")
        < shown.index("switch")
    )
    done = app.deploy()
    assert "announcing the deploy" in done["output"]
    assert (app.deploy_root / "warmed-in").read_text().strip() == done[
        "release"
    ]  # in the new release


def test_a_failing_hooked_task_stops_the_deploy_before_any_switch(app: Project) -> None:
    first = app.deploy()
    toml = app.root / "shiplane.toml"
    toml.write_text(
        toml.read_text().replace('run = "basename $PWD > ../../warmed-in"', 'run = "exit 7"')
    )
    app.commit("failing task")
    failed = app.deploy(check=False)
    assert failed["exit"] == 1 and "task 'warm' failed" in failed["error"], failed["error"]
    assert app.current() == first["release"]


def test_a_task_inside_the_host_chain_is_refused(app: Project) -> None:
    toml = app.root / "shiplane.toml"
    toml.write_text(toml.read_text().replace('after = ["release"]', 'after = ["copy"]'))
    app.commit("task inside the chain")
    refused = app.shiplane("check")
    assert refused.returncode == 2
    assert (
        "run on each host as one chain" in refused.stderr
        and 'after = ["install"]' in refused.stderr
    )
