"""Whether the release hook (migrations) has anything new to do: ``hooks.release_if_changed``.

By default the release hook runs on every deploy. When the deploy file lists what it depends on
(``release_if_changed = ["db/**", "alembic.ini"]``, globs relative to the project), a deploy
built from the checkout digests those files, the hook's commands and the stage's non-secret
config, and skips the hook when the primary host's ledger says the last release hook there ran
with the same digest (capistrano-rails' ``conditionally_migrate``, made content-based). A
rollback across a release whose hook was skipped needs no ``--yes``: nothing was migrated.

Every deploy that runs the hook records the digest it ran with, or None when there is none (an
artifact not built here, a hook that failed part-way): a None never matches, so the next deploy
runs the hook again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from shiplane.agent.protocol import LedgerEntry
from shiplane.config.layers import Layered

# never inputs of a hook: the VCS and shiplane's own build output
_SKIPPED_DIRS = {".git", ".shiplane", "__pycache__"}


def inputs_digest(
    root: Path, patterns: Sequence[str], commands: Sequence[str], layered: Layered
) -> str:
    """The digest of the files matching ``patterns`` under ``root`` (path and content), the
    hook ``commands`` and the stage's config and env (secrets print masked, so they are out)."""
    digest = hashlib.sha256()
    digest.update(
        json.dumps(
            {"commands": list(commands), "config": layered.config, "env": layered.env},
            sort_keys=True,
            default=str,
        ).encode()
    )
    for path in _matching(root, patterns):
        digest.update(b"\0" + path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _matching(root: Path, patterns: Sequence[str]) -> list[Path]:
    found: set[Path] = set()
    for pattern in patterns:
        for hit in root.glob(pattern):
            # a directory stands for every file under it ("db/**" yields only dirs before 3.13)
            for path in hit.rglob("*") if hit.is_dir() else [hit]:
                if path.is_file() and not set(path.relative_to(root).parts) & _SKIPPED_DIRS:
                    found.add(path)
    return sorted(found)


def last_inputs(entries: Iterable[LedgerEntry]) -> str | None:
    """The digest the newest recorded release hook ran with (entries oldest first), or None."""
    recorded = [e["release_inputs"] for e in entries if "release_inputs" in e]
    return recorded[-1] if recorded and isinstance(recorded[-1], str) else None
