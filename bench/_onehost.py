"""What the one-host SSH benches share: a test host of their own, and their table's way out.
The bench puts ``tests/`` on ``sys.path`` first, as the fleet bench does."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from sshhosts import TestHosts, ssh_available, start_hosts


def one_host(bench: str) -> tuple[Path, TestHosts] | None:
    """A temp dir and one running test host in it; None (said on stderr) where hosts cannot run."""
    why = ssh_available()
    if why is not None:
        print(f"{bench}: cannot start a test host: {why}", file=sys.stderr)
        return None
    work = Path(tempfile.mkdtemp(prefix=f"shiplane-{bench}-"))
    return work, start_hosts(1, work / "hosts")


def publish(lines: list[str], out: Path | None) -> None:
    """Print the Markdown table, and write it to ``out`` when given."""
    table = "\n".join(lines)
    print(table)
    if out:
        out.write_text(table + "\n", encoding="utf-8")
