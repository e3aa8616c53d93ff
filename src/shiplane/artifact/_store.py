"""The content-addressed blob store: every file of every artifact, named by its sha256.

Kept to a small interface (`path`, `has`, `put_file`, `open`) so a remote store (S3, a shared
disk) can replace the local one without touching the build.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20


def sha256_file(path: Path) -> tuple[str, int]:
    """The sha256 hex digest and size of the file at ``path``, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class BlobStore:
    """A directory of blobs named by the sha256 of their bytes (``<root>/<sha256>``).

    Blobs are immutable: they are written under a temporary name, then renamed into place, and
    made read-only, so a reader never sees a partial blob and a later build cannot alter one.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"BlobStore({str(self.root)!r})"

    def path(self, sha256: str) -> Path:
        """Where the blob ``sha256`` lives (whether or not it is present)."""
        if not _SHA256.match(sha256):
            # A name from a manifest becomes a path: refuse anything but a digest.
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256

    def has(self, sha256: str) -> bool:
        """True when the blob is present."""
        return self.path(sha256).is_file()

    def put_file(
        self,
        src: Path,
        *,
        link: bool = False,
        digest: Callable[[Path], tuple[str, int]] = sha256_file,
    ) -> tuple[str, int]:
        """Store a copy of ``src``; return its (sha256, size). A present blob is not rewritten.

        ``link=True`` hard-links instead of copying when possible: only for files nobody will
        modify afterwards (the build's own caches), never for the user's source files; those
        may pass a ``digest`` that remembers their hashes (``cached_sha256``). A new blob's
        bytes are hashed again once stored, whatever ``digest`` said.
        """
        sha, size = digest(src)
        dest = self.path(sha)
        if dest.is_file():
            return sha, size
        self.root.mkdir(parents=True, exist_ok=True)
        # per thread too: a build stores the app and the dependencies at the same time
        tmp = self.root / f".{sha}.tmp-{os.getpid()}-{threading.get_ident()}"
        try:
            linked = False
            if link:
                try:
                    os.link(src, tmp)
                    linked = True
                except OSError:
                    linked = False
            if not linked:
                shutil.copyfile(src, tmp)
            # Re-check after copying: the source may have changed while we read it.
            if sha256_file(tmp)[0] != sha:
                raise OSError(f"{src} changed while it was being stored")
            os.chmod(tmp, 0o444)
            os.replace(tmp, dest)
        finally:
            if tmp.exists():
                tmp.unlink()
        return sha, size

    def open(self, sha256: str) -> BinaryIO:
        """Open the blob for reading (binary). Raises FileNotFoundError when it is absent."""
        return open(self.path(sha256), "rb")
