"""The content-addressed blob store: ``store/<sha256>``, every byte verified on receive.

Also the safe way out of it: relative paths that cannot escape, wheels unpacked without traversal.

Kept behind two functions (``missing``, ``receive``) so a later version can pull blobs from an
object store instead of having the controller push them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from . import AgentError, fsync_dir
from .paths import Layout

Emit = Callable[[dict[str, Any]], None]

SHA_RE = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20
PROGRESS_EVERY = 8 << 20


def valid_sha(sha: object) -> bool:
    """True for a lowercase 64-hex sha256 (the only strings we ever join to a path)."""
    return isinstance(sha, str) and bool(SHA_RE.match(sha))


def missing(layout: Layout, shas: Iterable[str]) -> list[str]:
    """The shas (in the given order, without duplicates) that are not in the store yet."""
    out: list[str] = []
    seen: set[str] = set()
    for sha in shas:
        if sha in seen:
            continue
        seen.add(sha)
        if not valid_sha(sha):
            raise AgentError(f"not a sha256: {sha!r}", kind="usage")
        if not layout.blob(sha).is_file():
            out.append(sha)
    return out


def receive(layout: Layout, blobs: list[dict[str, Any]], stream: BinaryIO, emit: Emit) -> dict[str, Any]:
    """Read each blob's bytes from ``stream`` (back to back, sizes as listed) into the store.

    Every listed byte is consumed even when a blob is bad, so the session stays in sync; a blob
    whose bytes do not hash to its sha256 is discarded and the op fails naming it (``integrity``).
    """
    sizes: list[int] = []
    for blob in blobs:
        size = blob.get("size") if isinstance(blob, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            # Without a size we cannot know how many bytes to skip: the stream is lost anyway.
            raise AgentError(f"receive: blob without a valid size: {blob!r}", kind="protocol")
        sizes.append(size)
    total = sum(sizes)
    layout.store.mkdir(parents=True, exist_ok=True)
    done = 0
    last_report = 0
    received = 0
    bad: list[str] = []
    for blob, size in zip(blobs, sizes):
        sha = blob.get("sha256")
        if not valid_sha(sha):
            _skip(stream, size)
            done += size
            bad.append(str(sha))
            continue
        ok = _receive_one(layout, str(sha), size, stream)
        done += size
        if ok:
            received += 1
        else:
            bad.append(str(sha))
        if done - last_report >= PROGRESS_EVERY or done == total:
            last_report = done
            emit({"phase": "receive", "status": "progress", "bytes": done, "total": total})
    if bad:
        raise AgentError(
            "received bytes do not match their sha256 (discarded): " + ", ".join(bad),
            kind="integrity",
            blobs=bad,
        )
    fsync_dir(layout.store)
    return {"received": received, "bytes": total}


def _receive_one(layout: Layout, sha: str, size: int, stream: BinaryIO) -> bool:
    """Stream one blob to a temp file, rename it into place only if the hash matches."""
    tmp = layout.store / f".tmp-{sha}-{os.getpid()}"
    digest = hashlib.sha256()
    remaining = size
    with open(tmp, "wb") as out:
        while remaining:
            chunk = stream.read(min(CHUNK, remaining))
            if not chunk:
                out.close()
                tmp.unlink()
                raise AgentError(
                    f"receive: stream ended {remaining} bytes before the end of blob {sha}",
                    kind="protocol",
                )
            digest.update(chunk)
            out.write(chunk)
            remaining -= len(chunk)
        out.flush()
        os.fsync(out.fileno())
    if digest.hexdigest() != sha:
        tmp.unlink()
        return False
    os.chmod(tmp, 0o644)
    os.replace(tmp, layout.blob(sha))
    return True


def _skip(stream: BinaryIO, size: int) -> None:
    remaining = size
    while remaining:
        chunk = stream.read(min(CHUNK, remaining))
        if not chunk:
            raise AgentError("receive: stream ended early", kind="protocol")
        remaining -= len(chunk)


def require(layout: Layout, shas: Iterable[str]) -> None:
    """Fail (kind ``missing``) naming every sha the store lacks; install calls this first."""
    lacking = missing(layout, shas)
    if lacking:
        raise AgentError(
            f"{len(lacking)} blob(s) missing from the store: " + ", ".join(lacking[:5]),
            kind="missing",
            blobs=lacking,
        )


# --- out of the store, into a release tree ------------------------------------------------------

def safe_relpath(path: object, what: str = "path") -> str:
    """A normalised relative POSIX path that cannot leave its base directory (else kind ``usage``)."""
    if not isinstance(path, str) or not path or "\x00" in path:
        raise AgentError(f"{what}: invalid path {path!r}", kind="usage")
    pure = PurePosixPath(path)
    parts = [p for p in pure.parts if p not in ("", ".")]
    if pure.is_absolute() or not parts or any(p == ".." for p in parts):
        raise AgentError(f"{what}: path {path!r} must stay inside its directory", kind="usage")
    return "/".join(parts)


def unpack_wheel(wheel: Path, lib: Path, name: str) -> None:
    """Unpack a wheel into ``lib/``; members with absolute paths, ``..`` or symlinks are refused."""
    lib.mkdir(parents=True, exist_ok=True)
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as exc:
        raise AgentError(f"app wheel {name} is not a zip file: {exc}", kind="integrity") from exc
    with zf:
        for info in zf.infolist():
            unix_mode = info.external_attr >> 16
            if stat.S_ISLNK(unix_mode):
                raise AgentError(f"wheel {name}: member {info.filename!r} is a symlink",
                                 kind="usage")
            rel = safe_relpath(info.filename.rstrip("/") or ".", f"wheel {name} member")
            # `<dist>.data/purelib|platlib/...` belongs on the path like the rest of the code.
            parts = rel.split("/")
            if len(parts) > 2 and parts[0].endswith(".data") and parts[1] in ("purelib", "platlib"):
                rel = "/".join(parts[2:])
            dest = lib / rel
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
            os.chmod(dest, 0o755 if unix_mode & 0o111 else 0o644)
