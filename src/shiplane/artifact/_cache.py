"""shiplane's per-user cache: build products keyed by content alone, shared by every project.

``shiplane clean`` empties a project's ``.shiplane/build``; what is cached here is what only
its inputs' bytes decide (a fully pinned lock's wheels, a pinned tool, a build backend's
environment, the bytecode of a set of wheels), so it survives, like pip's and uv's own caches.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from ._store import sha256_file


def cache_root() -> Path:
    """``$SHIPLANE_CACHE_DIR``, else ``$XDG_CACHE_HOME/shiplane``, else ``~/.cache/shiplane``."""
    explicit = os.environ.get("SHIPLANE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "shiplane").resolve()


def remove_cache() -> tuple[Path, int] | None:
    """``shiplane clean --cache``: the whole per-user cache goes (renamed aside first, so no
    reader ever sees half of it); returns it and the bytes freed, or None if there was none."""
    root = cache_root()
    if not root.is_dir():
        return None
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    trash = root.with_name(f".{root.name}.trash-{os.getpid()}")
    os.replace(root, trash)
    shutil.rmtree(trash, ignore_errors=True)
    _digests.cache_clear()
    return root, size


_DIGESTS_LOCK = threading.Lock()


@functools.cache
def _digests() -> dict[str, list[object]]:
    """path -> [size, mtime_ns, inode, device, sha256] of the cache's files hashed so far."""
    try:
        memo = json.loads((cache_root() / "digests.json").read_text())
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def cached_sha256(path: Path) -> tuple[str, int]:
    """``sha256_file`` for the cache's own files, which are written once and never in place: a
    digest is remembered with the file's size, mtime, inode and device (as git's index does) and
    reused while they are unchanged, so a build does not hash the whole wheelhouse again (~20 MB
    for a Flask + SQLAlchemy app, three times: ~0.1 s). Any rewrite changes the mtime or inode,
    and the file is hashed again."""
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]
    key = str(path.resolve())
    memo = _digests()
    with _DIGESTS_LOCK:
        known = memo.get(key)
    if isinstance(known, list) and known[:4] == stamp and isinstance(known[4], str):
        return known[4], st.st_size
    sha, size = sha256_file(path)
    if size == st.st_size:
        with _DIGESTS_LOCK:
            memo[key] = [*stamp, sha]
            _save_digests(memo)
    return sha, size


def _save_digests(memo: dict[str, list[object]]) -> None:
    """Best effort (a read-only cache only loses the shortcut); entries of files gone are dropped."""
    target = cache_root() / "digests.json"
    tmp = target.with_name(f".digests.json.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        live = {k: v for k, v in memo.items() if os.path.exists(k)}
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(live))
        os.replace(tmp, target)
    except OSError:
        tmp.unlink(missing_ok=True)


def _listed(directory: Path) -> list[Path] | None:
    """The files ``.complete`` lists ("name sha256" lines), each checked against its hash;
    None when the entry is absent, incomplete or was altered (it is then made anew)."""
    try:
        lines = (directory / ".complete").read_text().splitlines()
    except OSError:
        return None
    files = []
    for line in lines:
        name, _, sha = line.partition(" ")
        path = directory / name
        # A cache shared by projects is checked before use: a corrupt wheel must not ship.
        if not name or "/" in name or not path.is_file() or (sha and cached_sha256(path)[0] != sha):
            return None
        files.append(path)
    return files


def cached_files(
    cache: Path, key: str, fill: Callable[[Path], None], pattern: str = "*.whl"
) -> list[Path]:
    """The files matching ``pattern`` in ``cache/key``, made once by ``fill(tmpdir)`` and
    renamed into place; ``.complete`` (written last) records each file's sha256."""
    final = cache / key
    found = _listed(final)
    if found is not None:
        return sorted(found)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        made = sorted(p for p in tmp.glob(pattern) if p.is_file())
        (tmp / ".complete").write_text("".join(f"{p.name} {cached_sha256(p)[0]}\n" for p in made))
        if final.exists():
            # A stale or altered entry: move it aside first so readers never see half of one.
            trash = cache / f".{key}.trash-{os.getpid()}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            # Another build filled the same key meanwhile: its files are as good as ours.
            if _listed(final) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(_listed(final) or [])


def digest_of(*parts: str | bytes) -> str:
    """sha256 over the parts, NUL-separated: the cache keys' one recipe."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()
