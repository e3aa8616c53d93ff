"""shiplane's per-user cache: build products keyed by content alone, shared by every project.

``shiplane clean`` empties a project's ``.shiplane/build``; what is cached here is what only
its inputs' bytes decide (a fully pinned lock's wheels, a pinned tool, a build backend's
environment, the bytecode of a set of wheels), so it survives, like pip's and uv's own caches.
"""

from __future__ import annotations

import hashlib
import os
import shutil
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
        if not name or "/" in name or not path.is_file() or (sha and sha256_file(path)[0] != sha):
            return None
        files.append(path)
    return files


def cached_files(cache: Path, key: str, fill: Callable[[Path], None],
                 pattern: str = "*.whl") -> list[Path]:
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
        (tmp / ".complete").write_text(
            "".join(f"{p.name} {sha256_file(p)[0]}\n" for p in made))
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
