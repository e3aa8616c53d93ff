"""One exception hierarchy: every error a user can cause carries a message for humans and an exit code."""

from __future__ import annotations


class ShiplaneError(Exception):
    """An error meant for the user: printed as one paragraph, no traceback (unless -v)."""

    exit_code = 1
    kind = "error"  # its name in --json output (docs/json.md)

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n{self.hint}"


class UsageError(ShiplaneError):
    """Bad command line or bad deploy file/config: exit code 2, nothing was changed anywhere."""

    kind = "usage"

    exit_code = 2


class ConfigError(UsageError):
    """The deploy file or a config layer is invalid; the message names file, line and key path."""

    kind = "config"


class OperationError(ShiplaneError):
    """The operation itself failed (a build, a hook, a health check, a host): exit code 1."""

    kind = "operation"

    exit_code = 1
