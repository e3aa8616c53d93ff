"""Mistakes caught before anything runs on a host, each with one clear paragraph, never a traceback."""

from __future__ import annotations

import pytest

from deployhelp import scaffold

pytestmark = pytest.mark.slow


def test_a_missing_host_python_is_named(tmp_path_factory: pytest.TempPathFactory) -> None:
    project = scaffold(tmp_path_factory.mktemp("pf"))
    toml = project.root / "shiplane.toml"
    toml.write_text(toml.read_text().replace('python = "python3"', 'python = "python9"'))
    project.commit("no such python")
    failed = project.deploy(check=False)
    assert failed["exit"] == 1
    assert "cannot start the agent with the host's Python `python9`" in failed["output"]
    assert "Traceback" not in failed["output"]
    assert not (project.deploy_root / "current").exists()


def test_a_port_held_by_another_program_stops_the_deploy_before_anything_is_sent(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    import socket

    project = scaffold(tmp_path_factory.mktemp("pp"))
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", project.port))
        squatter.listen(1)
        failed = project.deploy(check=False)
    assert failed["exit"] == 1
    assert f"port is taken by another program (127.0.0.1:{project.port}" in failed["output"]
    assert not any((project.deploy_root / "releases").glob("*"))  # nothing installed,
    assert not any((project.deploy_root / "store").glob("*"))  # nothing sent
    done = project.deploy()  # once the port is free, the same deploy goes on
    try:
        assert project.get("/")[0] == 200 and done["exit"] == 0
    finally:
        project.stop()


def test_an_app_entry_that_is_not_there_stops_the_deploy_after_the_gate_exit_2(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    project = scaffold(tmp_path_factory.mktemp("pe"))
    toml = project.root / "shiplane.toml"
    text = toml.read_text()
    entry = next(line for line in text.splitlines() if line.startswith("wsgi = "))
    module = entry.split('"')[1].split(":")[0]
    for wrong, said in (
        (f"{module}:make_app()", f"module '{module}' has no 'make_app'"),
        (f"{module}x:create_app()", f"there is no module '{module}x'"),
    ):
        toml.write_text(text.replace(entry, f'wsgi = "{wrong}"'))
        project.commit(f"entry {wrong}")
        done = project.shiplane("deploy", "--stage", project.stage)  # with the test gate
        assert done.returncode == 2, done.stdout + done.stderr
        assert said in done.stderr and "Traceback" not in done.stdout + done.stderr
        assert not (project.deploy_root / "releases").exists() or not any(
            (project.deploy_root / "releases").iterdir()
        )
