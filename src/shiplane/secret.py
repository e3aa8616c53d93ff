"""Secrets are a type that redacts itself, so masking cannot be forgotten in a new print."""

from __future__ import annotations

from collections.abc import Iterable

MASK = "***"


class Secret:
    """A secret value. ``str``/``repr``/format print ``***``; only :meth:`reveal` gives the value."""

    __slots__ = ("_value", "name")

    def __init__(self, value: str, name: str = "") -> None:
        self._value = value
        self.name = name

    def reveal(self) -> str:
        """The real value: call this only where it is written to the host's 0600 files."""
        return self._value

    def __str__(self) -> str:
        return MASK

    def __repr__(self) -> str:
        return f"Secret({self.name or ''}={MASK})"

    def __format__(self, spec: str) -> str:
        return MASK

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("secret", self._value))


class Masker:
    """Replaces every known secret value in free text (hook output, remote errors, logs)."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._values = sorted({v for v in values if v}, key=len, reverse=True)

    def add(self, value: str) -> None:
        if value and value not in self._values:
            self._values = sorted([*self._values, value], key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for value in self._values:
            text = text.replace(value, MASK)
        return text
