"""What `shiplane init` writes: a working Flask + SQLAlchemy + Alembic project with a shiplane.toml.

The project's files are package data under ``template/``. Every template file ends in ``.j2`` and
is rendered with Jinja2 (``{{ name }}``, ``{{ env_prefix }}``, ``{{ config_env }}``); the suffix is
dropped, a ``__name__`` path segment becomes the package name and a leading ``dot-`` becomes ``.``
(so that no template is a hidden file or an importable module inside shiplane itself).
"""

from __future__ import annotations

import keyword
import os
import re
import secrets
import sys
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import jinja2

from shiplane.errors import UsageError

if TYPE_CHECKING:
    if sys.version_info >= (3, 11):
        from importlib.resources.abc import Traversable
    else:
        from importlib.abc import Traversable

__all__ = ["derive_name", "write_project"]

TEMPLATE_SUFFIX = ".j2"
SECRETS_FILE = PurePosixPath(".secrets/local.env")
# Files whose presence means "a project is already here"; they are named first in a refusal.
PROJECT_MARKERS = ("shiplane.toml", "pyproject.toml")
# A package with one of these names would shadow a module the app or its tools import.
_RESERVED = frozenset(sys.stdlib_module_names) | {
    "alembic", "blinker", "click", "flask", "greenlet", "gunicorn", "itsdangerous", "jinja2",
    "mako", "markupsafe", "pytest", "shiplane", "sqlalchemy", "tomli", "typing_extensions",
    "werkzeug",
}  # fmt: skip
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]*")


def derive_name(target: Path) -> str:
    """The package name for a project in ``target``: its directory name as a Python identifier
    (``My-App`` -> ``my_app``, ``2fa`` -> ``app_2fa``, ``class`` -> ``class_``)."""
    raw = Path(os.path.abspath(target)).name
    name = re.sub(r"[^a-z0-9_]+", "_", raw.lower()).strip("_")
    if not name:
        raise UsageError(
            f"cannot make a package name out of the directory name {raw!r}",
            hint="pass one with --name",
        )
    if name[0].isdigit():
        name = f"app_{name}"
    if keyword.iskeyword(name):
        name += "_"
    return name


def _check_name(name: str) -> str:
    if not _IDENTIFIER.fullmatch(name) or keyword.iskeyword(name):
        raise UsageError(
            f"{name!r} is not a valid package name",
            hint="use lowercase letters, digits and underscores, not starting with a digit",
        )
    if name in _RESERVED:
        raise UsageError(
            f"a package named {name!r} would shadow the module {name!r} the app depends on",
            hint="choose another name with --name",
        )
    return name


def _walk(node: Traversable, prefix: PurePosixPath) -> Iterator[tuple[PurePosixPath, Traversable]]:
    for child in sorted(node.iterdir(), key=lambda item: item.name):
        if child.name == "__pycache__":
            continue
        path = prefix / child.name
        if child.is_dir():
            yield from _walk(child, path)
        elif child.name.endswith(TEMPLATE_SUFFIX):
            yield path, child


def _output_path(template: PurePosixPath, name: str) -> PurePosixPath:
    parts = []
    for part in template.parts:
        if part == "__name__":
            part = name
        elif part.startswith("dot-"):
            part = "." + part[len("dot-") :]
        parts.append(part)
    out = PurePosixPath(*parts)
    return out.with_name(out.name[: -len(TEMPLATE_SUFFIX)])


def render_project(name: str) -> dict[PurePosixPath, str]:
    """The project's files (relative path -> content) for package ``name``, without writing any."""
    env = jinja2.Environment(
        keep_trailing_newline=True, undefined=jinja2.StrictUndefined, autoescape=False
    )
    context = {
        "name": name,
        "env_prefix": f"{name.upper()}_",
        "config_env": f"{name.upper()}_CONFIG",
    }
    root = files(__name__) / "template"
    return {
        _output_path(path, name): env.from_string(node.read_text(encoding="utf-8")).render(context)
        for path, node in _walk(root, PurePosixPath())
    }


def write_project(target: Path, *, name: str | None = None, force: bool = False) -> list[Path]:
    """Write the example project into ``target`` (created if missing) and return the files written.

    ``name`` defaults to :func:`derive_name` of ``target``. Nothing is written, and a
    :class:`UsageError` names the first conflicting file, when ``target`` already holds
    ``shiplane.toml``, ``pyproject.toml`` or any other file the project would overwrite, unless
    ``force``. ``.secrets/local.env`` (mode 0600, in a 0700 directory) gets a fresh random
    ``SECRET_KEY``; an existing one is kept even with ``force``, since replacing a secret key
    would silently invalidate what was signed with it.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target} exists and is not a directory")
    name = _check_name(name if name is not None else derive_name(target))
    rendered = render_project(name)

    if not force:
        order = [PurePosixPath(m) for m in PROJECT_MARKERS] + sorted(rendered)
        for rel in order:
            if (target / rel).exists():
                raise UsageError(
                    f"{target / rel} already exists: {target} looks like a project already",
                    hint="run `shiplane init` in a new directory, or pass --force to overwrite",
                )

    written: list[Path] = []
    for rel, content in sorted(rendered.items()):
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8", newline="\n")
        written.append(path)

    secrets_path = target / SECRETS_FILE
    secrets_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    secrets_path.parent.chmod(0o700)
    if not secrets_path.exists():
        # Created 0600 from the start: the key is never readable by others, not even briefly.
        fd = os.open(secrets_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(f"SECRET_KEY={secrets.token_hex(32)}\n")
        os.chmod(secrets_path, 0o600)  # in case the umask took bits away we meant to keep
        written.append(secrets_path)
    return written
