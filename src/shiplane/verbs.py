"""The verbs that connect to the stage's hosts right after loading the deploy file: the CLI
pre-warms their SSH connections (transport/prewarm.py) and imports the transports only for
them. A module of its own, importing nothing, so the CLI's start-up reads it for free."""

from __future__ import annotations

CONNECTING_VERBS = frozenset(
    {
        "deploy",
        "rollback",
        "status",
        "releases",
        "history",
        "logs",
        "start",
        "stop",
        "restart",
        "reload",
        "plan",
        "lock",
        "unlock",
        "copy",
        "install",
        "prune",
    }
)
