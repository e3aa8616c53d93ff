"""Shipping the controller's uv to hosts that lack it (SPEC §13: uv builds a venv in well under a
second where pip takes seconds per host).

Only to hosts of the controller's own platform, and only a real binary (not a shell shim); the
host runs ``uv --version`` before using it, so a binary that cannot run there (other libc) leaves
pip as the installer. ``SHIPLANE_SHIP_UV=0`` turns this off.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import shutil
import sysconfig
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from shiplane.transport import on_controller
from shiplane.transport.session import AgentSession, HostError

CHUNK = 1 << 20


def controller_platform() -> str:
    """This machine's platform in the agent's spelling (``linux_x86_64``)."""
    return sysconfig.get_platform().replace("-", "_").replace(".", "_")


def local_uv() -> Path | None:
    """The controller's uv binary (the ``uv`` package's, else on PATH), if it is an ELF executable."""
    candidates: list[str] = []
    try:
        import uv  # the PyPI package that ships the binary

        candidates.append(str(uv.find_uv_bin()))
    except (ImportError, FileNotFoundError):
        pass
    found = shutil.which("uv")
    if found:
        candidates.append(found)
    for candidate in candidates:
        path = Path(candidate).resolve()
        try:
            with path.open("rb") as handle:
                if handle.read(4) == b"\x7fELF":
                    return path
        except OSError:
            continue
    return None


@functools.lru_cache(maxsize=4)
def _digest(path: Path, size: int, mtime: float) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def would_ship_uv(hello: Mapping[str, object]) -> bool:
    """True when a deploy to the host that said ``hello`` would send it the controller's uv."""
    if os.environ.get("SHIPLANE_SHIP_UV", "1") == "0" or hello.get("uv"):
        return False
    return hello.get("platform") == controller_platform() and local_uv() is not None


@dataclass(frozen=True)
class UvBlob:
    """The controller's uv as a blob of the deploy: gzipped (``sha256``, ``size``, at ``path``),
    and the binary's own sha256 the host checks after unpacking it."""

    sha256: str
    size: int
    path: Path
    binary_sha256: str
    binary_size: int


def uv_blob(session: AgentSession) -> UvBlob | None:
    """The uv blob to send the host behind ``session``, or None when it needs none (it has uv,
    is this machine, is of another platform, or shipping is off)."""
    if on_controller(session.host) or not would_ship_uv(session.hello):
        return None  # the controller's own machine has our uv already, or is meant to use pip
    binary = local_uv()
    assert binary is not None
    stat = binary.stat()
    binary_sha = _digest(binary, stat.st_size, stat.st_mtime)
    packed = _gzipped(binary, binary_sha)
    packed_stat = packed.stat()
    sha = _digest(packed, packed_stat.st_size, packed_stat.st_mtime)
    return UvBlob(sha, packed_stat.st_size, packed, binary_sha, stat.st_size)


def install_shipped_uv(session: AgentSession, blob: UvBlob, note: Callable[[str], None]) -> bool:
    """Make the uv blob the host received runnable there. Never fails the deploy: a host where it
    cannot be placed keeps using pip (``note`` says why)."""
    try:
        result = session.call(
            "install_uv", {"sha256": blob.sha256, "binary_sha256": blob.binary_sha256}, timeout=120
        )
    except HostError as exc:
        if exc.kind in ("lost", "timeout", "connect"):
            raise
        note(f"uv not shipped ({exc.reason}); installing with pip")
        return False
    session.hello["uv"] = result.get("path")
    note(
        f"shipped uv ({blob.size >> 20} MiB gzipped, {blob.binary_size >> 20} MiB unpacked) "
        f"to {result.get('path')}"
    )
    return True


def ship_uv(session: AgentSession, note: Callable[[str], None]) -> int:
    """Send the controller's uv to the host if it lacks one (its own round trips); returns the
    bytes sent (0 if none). A deploy sends it with its other blobs instead (commands/deploy.py)."""
    blob = uv_blob(session)
    if blob is None:
        return 0
    try:
        missing = session.call("inventory", {"blobs": [blob.sha256]}, timeout=120).get(
            "missing", []
        )
        if missing:
            session.call(
                "receive",
                {"blobs": [{"sha256": blob.sha256, "size": blob.size}]},
                payload=_chunks(blob.path),
                timeout=300,
            )
    except HostError as exc:
        if exc.kind in ("lost", "timeout", "connect"):
            raise
        note(f"uv not shipped ({exc.reason}); installing with pip")
        return 0
    if not install_shipped_uv(session, blob, note):
        return 0
    return blob.size if missing else 0


@functools.lru_cache(maxsize=4)
def _gzipped(binary: Path, sha: str) -> Path:
    """The binary gzipped once per controller (about half its size on the wire), in the user's
    cache; written to a temp name and renamed, so a concurrent deploy never reads half a file."""
    from shiplane.artifact import cache_root

    target = cache_root() / "uv" / f"{sha}.gz"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}-{threading.get_ident()}")
        # mtime 0: the same binary always gives the same bytes, so hosts keep what they have
        with (
            binary.open("rb") as src,
            open(tmp, "wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=0) as out,
        ):
            shutil.copyfileobj(src, out, CHUNK)
        os.replace(tmp, target)
    return target


def _chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            yield chunk
