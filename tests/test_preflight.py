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
