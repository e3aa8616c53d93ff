"""The content-addressed blob store: ``store/<sha256>``, every byte verified on receive.

Also the safe way out of it: relative paths that cannot escape, wheels unpacked without traversal.

Kept behind two functions (``missing``, ``receive``) so a later version can pull blobs from an
object store instead of having the controller push them.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import stat
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from . import AgentError, fsync_dir
from .paths import Layout
from .protocol import BlobRef, Emit, ReceiveResult, VerifyResult

SHA_RE = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20
PROGRESS_EVERY = 8 << 20
# what blobs leave free at least on the store's disk, which the live release shares: its logs,
# its database and its uploads keep room while a deploy is refused (docs/RELIABILITY.md)
RESERVE = 16 << 20


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


def receive(
    layout: Layout,
    blobs: list[BlobRef],
    stream: BinaryIO,
    emit: Emit,
    stored: Callable[[str], None] = lambda sha: None,
) -> ReceiveResult:
    """Read each blob's bytes from ``stream`` (back to back, sizes as listed) into the store;
    ``stored(sha)`` as each one is in place.

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
    try:
        check_room(layout, total)
    except AgentError:
        _skip(stream, total)  # the session stays in step
        raise
    done = 0
    last_report = 0
    received = 0
    bad: list[str] = []
    for index, (blob, size) in enumerate(zip(blobs, sizes)):
        sha = blob.get("sha256")
        if not valid_sha(sha):
            _skip(stream, size)
            done += size
            bad.append(str(sha))
            continue
        try:
            ok = _receive_one(layout, str(sha), size, stream)
        except AgentError as exc:
            if (
                exc.kind == "disk"
            ):  # the bytes still on their way are read and dropped: the session stays in step
                _skip(stream, sum(sizes[index + 1 :]))
            raise
        done += size
        if ok:
            received += 1
            stored(str(sha))
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
    """Stream one blob to a temp file, rename it into place only if the hash matches. A write
    that fails (a full disk) removes the temp file, reads the rest of the blob's bytes, and
    fails kind ``disk`` naming the path and the free space."""
    tmp = layout.store / f".tmp-{sha}-{os.getpid()}"
    digest = hashlib.sha256()
    remaining = size
    try:
        with open(tmp, "wb") as out:
            while remaining:
                chunk = _read(stream, min(CHUNK, remaining))
                if not chunk:
                    raise AgentError(
                        f"receive: stream ended {remaining} bytes before the end of blob {sha}",
                        kind="protocol",
                    )
                remaining -= len(chunk)
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        _skip(stream, remaining)
        raise _write_error(layout, tmp, exc, size) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if digest.hexdigest() != sha:
        tmp.unlink()
        return False
    os.chmod(tmp, 0o644)
    os.replace(tmp, layout.blob(sha))
    return True


# one blob from any stream: the controller's (receive) or a peer's HTTP response (agent/peers.py)
store_one = _receive_one


def _read(stream: BinaryIO, size: int) -> bytes:
    """Up to ``size`` bytes of a blob; a stream that fails (a peer's connection reset) is kind
    ``protocol``, never mistaken for a write error of the store's disk."""
    try:
        return stream.read(size)
    except OSError as exc:
        raise AgentError(
            f"receive: reading the blob's bytes failed: {exc}", kind="protocol"
        ) from None


def check_room(layout: Layout, size: int) -> None:
    """Refuse ``size`` bytes of blobs, before any is written, when they would leave less than
    ``RESERVE`` free on the store's disk: a deploy never fills the disk the live release
    writes to. Kind ``disk``, naming the path and the free space."""
    free = _free(layout)
    if free < 0 or size + RESERVE <= free:
        return
    raise AgentError(
        f"no space left on the disk of {layout.store} for this deploy "
        f"({free / (1 << 20):.1f} MiB free there; {size / (1 << 20):.1f} MiB of blobs to "
        f"arrive, and {RESERVE >> 20} MiB are kept free for the running release); nothing "
        "was written. Free some space (`shiplane prune` removes old releases) and deploy again",
        kind="disk",
    )


def _free(layout: Layout) -> int:
    """Bytes free on the store's disk (for an unprivileged user), -1 when unknown."""
    try:
        return shutil.disk_usage(layout.store).free
    except OSError:
        return -1


def _write_error(layout: Layout, path: Path, exc: OSError, size: int) -> AgentError:
    free = _free(layout)
    room = f"{free / (1 << 20):.1f} MiB free there" if free >= 0 else "free space unknown"
    if exc.errno == errno.ENOSPC:
        return AgentError(
            f"no space left on the disk of {layout.store} ({room}; a blob of "
            f"{size / (1 << 20):.1f} MiB was arriving); nothing was kept. Free some space "
            "(`shiplane prune` removes old releases) and deploy again",
            kind="disk",
        )
    return AgentError(
        f"cannot write {path}: {exc.strerror or exc} ({room}); nothing was kept", kind="disk"
    )


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


def verify(layout: Layout, shas: Iterable[str]) -> None:
    """Check that each stored blob still hashes to its name before it is used (linked, copied or
    unpacked into a release or venv): a blob changed on disk since it arrived must never reach a
    release. Bad blobs are moved to ``store/.quarantine/`` and the op fails kind ``integrity``
    naming them, so the controller sends them again (``blobs``) and retries."""
    bad = [sha for sha in dict.fromkeys(shas) if file_sha256(layout.blob(sha)) != sha]
    if not bad:
        return
    for sha in bad:
        quarantine(layout, sha)
    raise AgentError(
        f"{len(bad)} stored blob(s) no longer match their sha256 (quarantined): "
        + ", ".join(sha[:12] for sha in bad[:5]),
        kind="integrity",
        blobs=bad,
    )


def file_sha256(path: Path) -> str | None:
    """The sha256 of a file, or None when it cannot be read."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def quarantine(layout: Layout, sha: str) -> None:
    """Move a bad blob out of the store (kept for a look, never used again)."""
    place = layout.store / ".quarantine"
    place.mkdir(exist_ok=True)
    try:
        os.replace(layout.blob(sha), place / f"{sha}-{os.getpid()}")
    except FileNotFoundError:
        pass


def check_store(layout: Layout, emit: Emit) -> VerifyResult:
    """Re-hash every stored blob (``shiplane verify``); bad ones are quarantined and listed."""
    try:
        names = sorted(p.name for p in layout.store.iterdir() if valid_sha(p.name))
    except FileNotFoundError:
        names = []
    bad = []
    for sha in names:
        if file_sha256(layout.blob(sha)) != sha:
            quarantine(layout, sha)
            bad.append(sha)
            emit(
                {
                    "phase": "verify",
                    "status": "bad",
                    "detail": f"blob {sha[:12]} does not match its sha256: quarantined",
                }
            )
    return {"blobs": len(names), "bad": bad}


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
                raise AgentError(
                    f"wheel {name}: member {info.filename!r} is a symlink", kind="usage"
                )
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
