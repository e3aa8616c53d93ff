"""How a build reaches packages: through pip, configured as the user configured pip.

Every download a build makes for the user's project (the lock's wheels, the build backend's
requirements) goes through pip, which reads the user's ``pip.conf``, the ``PIP_*`` variables
(``PIP_INDEX_URL``, ``PIP_FIND_LINKS``, ``PIP_NO_INDEX``) and the lock's own index options
(``--index-url``, ``--extra-index-url``, ``--find-links``, ``--no-index``), and expands
``${NAME}`` in a requirements file from its environment. So a private index's token is a build
secret (``[build] secrets``) exported to pip's environment only: the lock keeps ``${NAME}``,
and so do the cache keys; pip's output is scrubbed of the value before shiplane shows any of it.
``UV_OFFLINE=1`` is honoured as pip's ``--no-index``. shiplane's own host tools never need an
index at all (``_tools``). docs/dependencies.md, "Air-gapped builds" and "Private indexes".
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..secret import Masker, Secret

# The lines of a requirements file that say where packages come from (pip's own names).
_OPTION = re.compile(
    r"^(--index-url|-i|--extra-index-url|--find-links|-f|--no-index|--trusted-host)(?=[\s=]|$)"
)
_FIND_LINKS = re.compile(r"^(--find-links|-f)([\s=]+)(\S+)$")
_TRUE = ("1", "true", "yes", "on")
_VARIABLE = re.compile(r"\$\{([A-Z0-9_]+)\}")  # what pip expands in a requirements file


def is_index_option(line: str) -> bool:
    """A requirements line naming where packages come from (``--index-url ...``)."""
    return bool(_OPTION.match(line))


def absolute_find_links(line: str, base: Path) -> str:
    """``--find-links ./wheels`` made absolute against the lock's folder: pip gets a copy of
    the lock in another folder, where the relative path would name nothing."""
    m = _FIND_LINKS.match(line)
    if not m or "://" in m.group(3) or m.group(3).startswith("$"):
        return line
    return f"{m.group(1)} {(base / m.group(3)).resolve()}"


@dataclass(frozen=True)
class PackageAccess:
    """Where a build may take packages from: the lock's index options, the environment, and
    the build secrets pip expands in them."""

    options: tuple[str, ...] = ()  # the lock's index lines, verbatim: ``${NAME}`` unexpanded
    secrets: tuple[Secret, ...] = ()

    @classmethod
    def of(cls, lines: Iterable[str], secrets: Iterable[Secret] = ()) -> PackageAccess:
        return cls(tuple(x for x in lines if is_index_option(x)), tuple(secrets))

    def env(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """pip's environment: the caller's, the build secrets, no prompt, no version check."""
        env = dict(os.environ if environ is None else environ)
        env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
        if env.get("UV_OFFLINE", "").lower() in _TRUE:
            env["PIP_NO_INDEX"] = "1"
        env.update({s.name: s.reveal() for s in self.secrets})
        return env

    def uv_env(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """uv's environment for the same sources (the test gate's venv is made by uv): the
        build secrets (uv expands ``${NAME}`` in a requirements file as pip does) and pip's
        index variables under uv's names, unless uv's own are set."""
        env = self.env(environ)
        for pip_name, uv_name in (
            ("PIP_INDEX_URL", "UV_INDEX_URL"),
            ("PIP_EXTRA_INDEX_URL", "UV_EXTRA_INDEX_URL"),
        ):
            if env.get(pip_name) and not env.get(uv_name):
                env[uv_name] = env[pip_name]
        return env

    def uv_args(self, environ: Mapping[str, str] | None = None) -> list[str]:
        """uv's flags for what pip alone reads from the environment: no index, find-links."""
        env = os.environ if environ is None else environ
        args = ["--no-index"] if self.offline(environ) else []
        for link in env.get("PIP_FIND_LINKS", "").split():
            args += ["--find-links", link]
        return args

    def offline(self, environ: Mapping[str, str] | None = None) -> str | None:
        """Why no index may be asked ("PIP_NO_INDEX=1", ...), or None when one may."""
        env = os.environ if environ is None else environ
        for name in ("PIP_NO_INDEX", "UV_OFFLINE"):
            if env.get(name, "").lower() in _TRUE:
                return f"{name}={env[name]}"
        if any(o.startswith("--no-index") for o in self.options):
            return "the lock's --no-index"
        return None

    def sources(self, environ: Mapping[str, str] | None = None) -> str:
        """Where pip looks, for an error message: the find-links folders, and the index unless
        the build is offline (credentials never shown)."""
        env = os.environ if environ is None else environ
        links = [m.group(3) for o in self.options if (m := _FIND_LINKS.match(o))]
        links += env.get("PIP_FIND_LINKS", "").split()
        where = [
            f"the find-links folder {_shown_url(link) if '://' in link else link}" for link in links
        ]
        why = self.offline(environ)
        if why is None:
            where.append("the package index")
        shown = " and ".join(where) if where else "no package source"
        return self.scrub(shown + (f" ({why}: no index)" if why else ""))

    def require_names(
        self, lines: Iterable[str], lock: str, environ: Mapping[str, str] | None = None
    ) -> None:
        """Refuse (exit 2) a ``${NAME}`` in the lock that pip would expand to nothing: neither a
        build secret nor the environment sets it (pip would send the text itself to the index,
        and say only that the index refused it)."""
        env = os.environ if environ is None else environ
        given = {s.name for s in self.secrets}
        unset = sorted(
            {m for line in lines for m in _VARIABLE.findall(line)}
            - given
            - {k for k in env if env[k]}
        )
        if unset:
            shown = ", ".join(f"${{{name}}}" for name in unset)
            raise ConfigError(
                f"{lock} uses {shown}, which nothing sets: pip would send the text itself",
                hint=f"name {', '.join(unset)} in [build] secrets (docs/dependencies.md, "
                '"Private indexes"), or set it in the environment',
            )

    def scrub(self, text: str) -> str:
        """``text`` without any build secret's value (pip masks passwords in URLs; not all)."""
        return Masker(s.reveal() for s in self.secrets)(text)


def whose_requirement(
    message: str,
    hint: str | None,
    *,
    lock: Path | None,
    locked: Iterable[str],
    added: Iterable[str],
    access: PackageAccess,
) -> tuple[str, str | None]:
    """A wheelhouse failure's message and hint, saying whose the missing requirement is: the
    user's lock's, a package shiplane adds for the server, or one the lock's pins need; and
    where pip looked (an air-gapped build's find-links folder). Scrubbed of build secrets."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    m = re.search(r": ([^\s:]+) cannot be resolved", message)
    if m is None:
        return access.scrub(message), hint
    try:
        name = canonicalize_name(Requirement(m.group(1)).name)
    except InvalidRequirement:
        return access.scrub(message), hint
    lock_name = lock.name if lock is not None else "the lock"
    if name in {canonicalize_name(n) for n in added}:
        whose = (
            f"{name} is not in your lock: shiplane adds it to run the app's server "
            "([services.web]), resolved against the lock's pins"
        )
        fix = f"add {name} to {lock_name}, pinned"
    elif name in {canonicalize_name(n) for n in locked}:
        whose = f"{name} is a requirement of your lock ({lock_name})"
        fix = f"check its pin in {lock_name} (name, version, target Python)"
    else:
        whose = f"{name} is a dependency of a requirement of your lock ({lock_name})"
        fix = f"pin it in {lock_name}, or check the pins that need it"
    offline = access.offline()
    if offline:
        fix = f"put its wheel into the find-links folder, or {fix}"
    head, _, tail = message.partition("\n")
    shown = f"{head}\n{whose}; pip looked in {access.sources()}" + (f"\n{tail}" if tail else "")
    return access.scrub(shown), fix


def _shown_url(url: str) -> str:
    """An index URL without its credentials (``https://host/simple``)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # not a number: shown without
        port = ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


def describe_packages(project: Path, requirements: str | None = None) -> str:
    """``shiplane check``'s "packages" line, offline: where the build takes the lock's packages
    from (find-links folders, the indexes without their credentials, or "no index") and where
    shiplane's own host tools come from."""
    from ._locks import find_lock
    from ._tools import describe_tools
    from ._wheelhouse import read_lock  # it imports this module

    found = find_lock(project, requirements)
    lines = (
        read_lock(found.path, format="requirements").lines if found.format == "requirements" else []
    )
    access = PackageAccess.of(lines)
    env = os.environ
    urls = [
        re.split(r"[\s=]+", o, maxsplit=1)[-1]
        for o in access.options
        if o.startswith(("--index-url", "-i ", "--extra-index-url"))
    ]
    urls += [
        u for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL") for u in env.get(name, "").split()
    ]
    where = access.sources()
    if urls and access.offline() is None:
        shown = ", ".join(_shown_url(u) for u in urls)
        where = where.replace("the package index", f"the package index ({shown})")
    return f"{where}; host tools: {describe_tools()}"
