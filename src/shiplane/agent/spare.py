"""The spare web server (daemon backend): one idle gunicorn per deploy root, its libraries
imported, ready to become the next release's server.

After a switch the agent keeps one program ``web-next-<hex>`` running from the live release's
venv, through preboot.py in spare mode: once the deploy has released its lock (so the imports
never compete with it) it imports gunicorn and the libraries that venv's servers import, then
waits. The next install of a release with the same venv *adopts* it:
``run/<name>.claim`` names the release and holds its gunicorn arguments, and the program's conf
now records that release. supervisord's command line stays the same, so nothing restarts, and
from then on the program is that release's web server (``DaemonBackend`` finds a release's
program through the confs); the switch lets it load the app like any preboot. A warm redeploy's
candidate thus answers in the time it takes to import the app's own code, which is what makes a
redeploy faster than the app's own cold boot.

Costs one idle gunicorn master's memory (its workers fork only once it is adopted and let go).
Off with ``[services.web] preboot = false``, and for gevent/eventlet worker classes.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path

from . import atomic_write
from . import supervisor as sv
from .paths import Layout
from .preboot import NO_PRELOAD_WORKERS  # they patch the stdlib before any import
from .protocol import WebSpec

PREFIX = "web-next-"


def is_spare(program: str) -> bool:
    return program.startswith(PREFIX)


def new_name() -> str:
    return PREFIX + secrets.token_hex(4)


def claim_path(layout: Layout, program: str) -> Path:
    return layout.run / f"{program}.claim"


def wanted(web: WebSpec) -> bool:
    """Whether this web service may have a spare (preboot on, no stdlib-patching workers)."""
    worker_class = str(web.get("worker_class") or "").lower()
    return web.get("preboot") is not False and not any(
        w in worker_class for w in NO_PRELOAD_WORKERS
    )


def conf(
    layout: Layout,
    program: str,
    digest: str,
    options: dict[str, object],
    release_id: str | None = None,
) -> str:
    """The spare's program conf; the same command before and after its adoption."""
    python = layout.venv(digest) / "bin" / "python"
    argv = [
        str(python),
        str(Path(__file__).with_name("preboot.py")),
        str(layout.root),
        "--spare",
        program,
    ]
    meta: sv.ProgramMeta = {"service": "web", "spare": program, "venv": digest, "preboot": True}
    if release_id:
        meta["release_id"] = release_id
    return sv.program_conf(program, argv, options, meta)


def claim(layout: Layout, program: str, release_id: str, gunicorn_argv: list[str]) -> None:
    """Hand the spare its release: written atomically, read once it has preloaded."""
    atomic_write(
        claim_path(layout, program),
        json.dumps({"release_id": release_id, "argv": gunicorn_argv}) + "\n",
    )
