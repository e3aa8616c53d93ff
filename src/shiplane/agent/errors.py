"""The agent's error type, importable as ``agent.errors.AgentError``.

The class itself lives in the package ``__init__`` (every agent module shares it); this module
re-exports it so both import paths name the very same class and one ``except`` catches all.
"""

from __future__ import annotations

from . import AgentError

__all__ = ["AgentError"]
