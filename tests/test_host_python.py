"""The hosts' exact Python: a lock line whose marker names a patch release (``python_full_version
<= "3.11.2"``) ships its wheel whatever the controller's own patch release is, since the hosts'
is known only when they install."""

from __future__ import annotations

from pathlib import Path

import pytest

from shiplane.artifact._wheelhouse import Target, _for_target, build_wheelhouse, read_lock

LOCK = [
    'async-timeout==4.0.3 ; python_full_version <= "3.11.2"',
    "six==1.16.0",
    'tomli==2.0.1 ; python_version < "3.11"',
]


def test_a_marker_on_the_patch_release_holds_for_the_hosts_not_the_controller() -> None:
    picked = _for_target(LOCK, Target("3.11", "linux_x86_64", native=True))
    assert picked == [
        "async-timeout==4.0.3",
        "six==1.16.0",
    ]  # any 3.11.x host may need it; tomli no 3.11


@pytest.mark.slow
def test_the_wheelhouse_holds_the_wheel_a_host_on_an_older_patch_release_needs(
    tmp_path: Path,
) -> None:
    lock = tmp_path / "requirements.txt"
    lock.write_text("\n".join(LOCK) + "\n")
    wheels = build_wheelhouse(
        read_lock(lock),
        Target("3.11", "linux_x86_64", native=True),
        [],
        tmp_path / "cache",
        lambda step, detail: None,
    )
    assert sorted(w.name.split("-")[0] for w in wheels) == ["async_timeout", "six"]
