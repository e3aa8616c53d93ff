"""The agent runs on the hosts' own Python, down to the oldest one README's Design section names
(3.9, Debian 11's): every agent module imports there, and a whole session works there, driven by
this controller as it drives a host. Skipped when no Python 3.9 is installed under pyenv."""

from __future__ import annotations

import io
import subprocess
import zipfile
from pathlib import Path

import pytest

from shiplane.agent_bundle import PACKAGE, agent_zip
from test_agent_core import AgentClient, holder, install_tree, release_id

FLOOR = (3, 9)
FOUND = sorted(
    Path("~/.pyenv/versions").expanduser().glob("{}.{}.*/bin/python{}.{}".format(*FLOOR, *FLOOR))
)
pytestmark = pytest.mark.skipif(
    not FOUND, reason="no Python {}.{} under ~/.pyenv/versions".format(*FLOOR)
)


@pytest.fixture
def floor_python() -> str:
    return str(FOUND[-1])


def test_every_agent_module_imports_on_the_oldest_host_python(
    floor_python: str, tmp_path: Path
) -> None:
    data, _ = agent_zip()
    zipfile.ZipFile(io.BytesIO(data)).extractall(tmp_path)
    modules = sorted(p.stem for p in (tmp_path / PACKAGE).glob("*.py") if p.stem != "__main__")
    assert "server" in modules and "preboot" in modules
    # -S: as on a host, the stdlib alone; importing a module evaluates its annotations' aliases too
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        f"    importlib.import_module({PACKAGE!r} + '.' + name)\n"
        "print('%d.%d' % sys.version_info[:2])\n"
    )
    done = subprocess.run(
        [floor_python, "-S", "-c", script],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "{}.{}".format(*FLOOR)


def test_a_session_on_the_oldest_host_python_installs_locks_and_unlocks(
    floor_python: str, tmp_path: Path
) -> None:
    root = tmp_path / "deploy"
    client = AgentClient(root, python=floor_python)
    try:
        assert client.needed  # the bootstrap unpacked and byte-compiled the agent with 3.9
        assert client.hello["python_version"] == "{}.{}".format(*FLOOR)
        assert client.request("inventory").result["current"] is None

        installed = install_tree(client, 1)
        assert installed.ok, installed.error
        assert client.request("mark", {"release_id": release_id(1), "state": "good"}).ok
        inventory = client.request("inventory").result
        assert [r["release_id"] for r in inventory["releases"]] == [release_id(1)]

        assert client.request("lock", {"holder": holder(111)}).ok
        assert client.request("inventory").result["lock"]["pid"] == 111
        other = AgentClient(root, python=floor_python)
        try:
            refused = other.request("lock", {"holder": holder(222, "ci")})
            assert not refused.ok and refused.error["kind"] == "lock"
        finally:
            other.close()
        assert client.request("unlock").result["released"] is True
        assert client.request("inventory").result["lock"] is None
    finally:
        assert client.close() == 0
