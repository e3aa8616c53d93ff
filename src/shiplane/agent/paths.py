"""Where things live under a deploy root (see docs/DESIGN.md, "Host layout").

Every other agent module takes paths from here, so the layout is written down once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


class Layout:
    """The host layout under one deploy root (``deploy_to``)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(os.path.abspath(os.path.expanduser(str(root))))

    @property
    def current(self) -> Path:
        return self.root / "current"

    @property
    def releases(self) -> Path:
        return self.root / "releases"

    def release(self, release_id: str) -> Path:
        return self.releases / release_id

    @property
    def venvs(self) -> Path:
        return self.root / "venvs"

    def venv(self, dependency_digest: str) -> Path:
        return self.venvs / dependency_digest

    @property
    def store(self) -> Path:
        return self.root / "store"

    def blob(self, sha256: str) -> Path:
        return self.store / sha256

    @property
    def shared(self) -> Path:
        return self.root / "shared"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def log(self) -> Path:
        return self.root / "log"

    @property
    def tools(self) -> Path:
        return self.root / "tools"

    @property
    def history(self) -> Path:
        return self.root / "history.jsonl"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def web_socket(self) -> Path:
        """The symlink the front connects to; it points at the live release's socket."""
        return self.run / "web.sock"

    def release_socket(self, release_id: str) -> Path:
        return self.run / f"web-{release_id}.sock"

    def release_meta(self, release_id: str) -> Path:
        """``release.json``: written last by install, so its presence means "complete"."""
        return self.release(release_id) / "release.json"

    def env_file(self, release_id: str) -> Path:
        """The release's 0600 env file (KEY=VALUE lines, values JSON-quoted)."""
        return self.release(release_id) / "shiplane.env"

    @property
    def agent_dir(self) -> Path:
        """Where the agent versions live (``.shiplane/agent-<sha>/``, unpacked and compiled)."""
        return self.root / ".shiplane"

    @property
    def tmp(self) -> Path:
        """Scratch space on the deploy root's filesystem (so hard links to the store work)."""
        return self.root / ".tmp"

    @property
    def uv_cache(self) -> Path:
        """uv's cache, on the same filesystem as the venvs so installs hard-link files."""
        return self.root / ".cache" / "uv"


def agent_command() -> list[str]:
    """The argv prefix that runs this very agent again (for supervisord programs, exec-env, proxy).

    On a host that is ``python3 -S /root/.shiplane/agent-<sha>`` (the unpacked zipapp, run as a
    directory); from a source checkout (tests) it is ``python -m shiplane.agent``.
    """
    package = __package__ or "shiplane.agent"
    shipped = os.environ.get("SHIPLANE_AGENT_DIR")  # set by the bootstrap
    # -S: the agent is stdlib-only, and skipping site (and whatever .pth files a host's Python
    # runs at start) takes tens of ms off every process it starts, gunicorn's boot included
    if shipped:
        return [sys.executable, "-S", shipped]
    if package != "shiplane.agent":  # shipped, but started without the bootstrap's environment
        return [sys.executable, "-S", str(Path(__file__).resolve().parent.parent)]
    return [sys.executable, "-m", package]
