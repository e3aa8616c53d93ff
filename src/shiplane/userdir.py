"""The user's private directories that outlive a command: the kept SSH connections' sockets
(transport/ssh.py) and the command server's (cliserver.py). A module of its own, importing
little, as the CLI's start-up reads it before anything else."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


def private_dir(kind: str) -> Path | None:
    """``$TMPDIR/shiplane-<kind>-<uid>``, made if missing, or None when it is not safely the
    user's alone: a real directory (not a link), owned by this uid, mode 0700. Another user of
    a shared /tmp may have made the path first; then nothing is kept there."""
    path = Path(tempfile.gettempdir()) / f"shiplane-{kind}-{os.getuid()}"
    try:
        path.mkdir(mode=0o700, exist_ok=True)
        info = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        return None
    return path
