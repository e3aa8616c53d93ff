"""The host's blob store is checked where it is used: a blob changed on disk after it arrived
is quarantined and sent again in the same deploy, so a release never gets a corrupt byte; and
``shiplane verify`` re-checks a whole store."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from deployhelp import Project, edit, scaffold

pytestmark = pytest.mark.slow

INCLUDED = (
    "db/env.py"  # shipped beside the wheel (build.include), unchanged by a code change: reused
)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    project = scaffold(tmp_path_factory.mktemp("sv"))  # short: unix socket paths are limited
    try:
        project.deploy()
        yield project
    finally:
        project.stop()


def corrupt_blob(project: Project, path: str) -> str:
    """Flip 8 bytes in the stored blob of one project file, as a bad disk would; its sha256."""
    sha = hashlib.sha256((project.root / path).read_bytes()).hexdigest()
    blob = project.deploy_root / "store" / sha
    data = bytearray(blob.read_bytes())
    for i in range(8):
        data[len(data) // 2 + i] ^= 0xFF
    blob.write_bytes(bytes(data))
    return sha


def test_a_corrupt_blob_is_replaced_in_the_same_deploy(app: Project) -> None:
    sha = corrupt_blob(app, INCLUDED)
    edit(app, "src/demo/views.py", "<h1>{title}</h1>", "<h1>{title}.</h1>")
    done = app.deploy()
    assert "did not match their sha256 (quarantined there): sending them again" in done["output"]
    release = app.deploy_root / "releases" / done["release"]
    assert (release / INCLUDED).read_bytes() == (app.root / INCLUDED).read_bytes()
    assert hashlib.sha256((app.deploy_root / "store" / sha).read_bytes()).hexdigest() == sha
    assert list((app.deploy_root / "store" / ".quarantine").glob(f"{sha}-*"))
    status, body = app.get("/")
    assert status == 200 and f"release {done['release']}" in body and ".</h1>" in body


def test_verify_finds_and_quarantines_a_bad_blob(app: Project) -> None:
    clean = app.shiplane("verify", "--stage", "local")
    assert clean.returncode == 0 and "all match their sha256" in clean.stdout, (
        clean.stdout + clean.stderr
    )
    sha = corrupt_blob(app, INCLUDED)
    found = app.shiplane("verify", "--stage", "local")
    assert found.returncode == 1, found.stdout + found.stderr
    assert f"1 did not match their sha256 and were quarantined: {sha[:12]}" in found.stdout
    assert not (app.deploy_root / "store" / sha).exists()
    # the next deploy sends it again as a missing blob
    edit(app, "src/demo/views.py", "<h1>{title}.</h1>", "<h1>{title}:</h1>")
    done = app.deploy()
    assert (app.deploy_root / "releases" / done["release"] / INCLUDED).read_bytes() == (
        app.root / INCLUDED
    ).read_bytes()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a deploy root on a disk that fills up."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
            capture_output=True,
            check=False,
        ).returncode
        != 0
    ):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
@pytest.mark.parametrize("filled_meanwhile", [False, True])
def test_a_full_disk_fails_the_copy_at_once_and_keeps_nothing(
    small_disk: Path, filled_meanwhile: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blobs that would not fit (with room kept for the live release) are refused before a byte
    is written; a disk that fills up anyway while they arrive (another writer: the check let
    them through) fails the same way, at once."""
    import io

    from shiplane.agent import AgentError, store
    from shiplane.agent.paths import Layout

    if filled_meanwhile:
        monkeypatch.setattr(store, "RESERVE", -(8 << 20))  # the check sees room for them
    fits, too_big = b"a" * 1000, os.urandom(3 << 20)
    blobs = [{"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for b in (too_big, fits)]
    stream = io.BytesIO(too_big + fits + b"next request")
    with pytest.raises(AgentError) as failed:
        store.receive(Layout(str(small_disk / "app")), blobs, stream, lambda event: None)
    assert failed.value.kind == "disk"
    assert (
        "no space left on the disk of" in failed.value.message
        and "MiB free there" in failed.value.message
    )
    assert (
        stream.read() == b"next request"
    )  # every byte of the request was read: the session goes on
    assert not [p for p in (small_disk / "app" / "store").iterdir()]  # no temp file left behind
