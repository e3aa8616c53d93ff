"""Air-gapped and private builds (issue 19, item 7): a build that may not reach a public index
takes shiplane's own host tools from shiplane itself, and says whose requirement is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from shiplane.artifact._store import sha256_file
from shiplane.artifact._tools import TOOLS, tool_wheels
from shiplane.errors import OperationError

# Any HTTP(S) request through these fails at once: a build that tries the network is caught.
NO_NETWORK = {
    "PIP_NO_INDEX": "1",
    "UV_OFFLINE": "1",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "ALL_PROXY": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
}


def test_the_host_tools_come_from_shiplane_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No index, an empty cache: supervisor's wheel is shiplane's own copy, its sha256 the pin."""
    for name, value in NO_NETWORK.items():
        monkeypatch.setenv(name, value)
    events: list[str] = []
    wheels = tool_wheels(tmp_path / "tools", lambda step, detail: events.append(detail))
    assert [w.name for w in wheels] == [t.wheel for t in TOOLS]
    assert sha256_file(wheels[0])[0] == TOOLS[0].sha256
    assert "supervisor-4.3.0-py2.py3-none-any.whl (shipped with shiplane)" in events
    # the second build reuses the cached copy
    assert tool_wheels(tmp_path / "tools", lambda step, detail: events.append(detail)) == wheels
    assert events[-1] == "reused supervisor-4.3.0"


def test_a_missing_tool_is_named_as_shiplanes_not_the_locks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shiplane installed without its copy, offline: the error says the wheel is shiplane's
    own tool, not the user's lock, and how to provide it."""
    for name, value in NO_NETWORK.items():
        monkeypatch.setenv(name, value)
    empty = tmp_path / "packaged"
    empty.mkdir()
    with pytest.raises(OperationError) as caught:
        tool_wheels(tmp_path / "tools", lambda step, detail: None, packaged=empty)
    message = caught.value.message
    assert message.startswith("supervisor==4.3.0 cannot be fetched: it is shiplane's own host tool")
    assert "not a requirement of your lock" in message
    assert caught.value.hint is not None
    assert "supervisor-4.3.0-py2.py3-none-any.whl into your find-links folder" in caught.value.hint
    assert not (tmp_path / "tools" / "supervisor-4.3.0").exists()
