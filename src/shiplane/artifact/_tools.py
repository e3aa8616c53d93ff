"""shiplane's own host tools: wheels shipped to every host whatever the app's lock says.

Today one: supervisor (pure Python, no dependencies), the daemon backend's process supervisor
(DESIGN.md, "Services"). Its wheel ships inside shiplane (``artifact/tools/``; its BSD-derived
licence is in the wheel's ``LICENSES.txt``), so a build never asks an index for it: an
air-gapped controller (``PIP_NO_INDEX=1``, a find-links folder holding only the lock's wheels,
a private index only) builds as well as one online (docs/dependencies.md, "Air-gapped builds").
A copy goes into the per-user cache, as every build input does; a shiplane installed without
its package data falls back to pip, with the pin's sha256 checked either way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import OperationError
from ._cache import cached_files
from ._store import sha256_file

Emit = Callable[[str, str], None]

PACKAGED = Path(__file__).parent / "tools"


@dataclass(frozen=True)
class Tool:
    """A pinned host tool: its wheel's file name and sha256 are part of the pin."""

    name: str
    version: str
    wheel: str
    sha256: str


TOOLS: tuple[Tool, ...] = (
    Tool(
        "supervisor",
        "4.3.0",
        "supervisor-4.3.0-py2.py3-none-any.whl",
        "0bcb763fddafba410f35cbde226aa7f8514b9fb82eb05a0c85f6588d1c13f8db",
    ),
)


def tool_wheels(cache: Path, emit: Emit, packaged: Path = PACKAGED) -> list[Path]:
    """The host tools' wheels: from shiplane's own package data (``packaged``), else
    downloaded once with pip; cached per user either way, each checked against its pin."""
    wheels: list[Path] = []
    for tool in TOOLS:
        key = f"{tool.name}-{tool.version}"
        if (cache / key / ".complete").is_file():
            emit("tools", f"reused {key}")

        def fill(out: Path, tool: Tool = tool) -> None:
            shipped = packaged / tool.wheel
            if shipped.is_file():
                emit("tools", f"{tool.wheel} (shipped with shiplane)")
                shutil.copyfile(shipped, out / tool.wheel)
            else:
                emit("tools", f"pip download {tool.name}=={tool.version}")
                _download(tool, out)
            got = out / tool.wheel
            if not got.is_file() or sha256_file(got)[0] != tool.sha256:
                raise OperationError(
                    f"shiplane's own host tool {tool.wheel} does not match its pinned sha256 "
                    f"{tool.sha256[:16]}...: it is not the file shiplane was released with",
                    hint="reinstall shiplane; this is not about your lock",
                )

        wheels += cached_files(cache, key, fill)
    return wheels


def _download(tool: Tool, out: Path, environ: Mapping[str, str] | None = None) -> None:
    """pip as the user configured it (index, find-links, PIP_NO_INDEX), the pin's hash
    required; a failure says this is shiplane's tool, not the user's lock."""
    pins = out / ".pin.txt"
    pins.write_text(f"{tool.name}=={tool.version} --hash=sha256:{tool.sha256}\n")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        + ["--require-hashes", "--dest", str(out), "-r", str(pins)],
        cwd=out,
        env={
            **(os.environ if environ is None else environ),
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PIP_NO_INPUT": "1",
        },
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        check=False,
    )
    pins.unlink()
    if done.returncode != 0:
        tail = "\n".join(line for line in done.stdout.splitlines()[-6:] if line.strip())
        raise OperationError(
            f"{tool.name}=={tool.version} cannot be fetched: it is shiplane's own host tool "
            f"(the process supervisor every host runs), not a requirement of your lock, and this "
            f"shiplane was installed without its copy of {tool.wheel}\n{tail}",
            hint=f"put {tool.wheel} into your find-links folder (or private index), or run one "
            f"build with access to an index: it is then kept in shiplane's cache "
            f"({out.parent}) for every later build",
        )


def describe_tools(packaged: Path = PACKAGED) -> str:
    """Where the host tools come from, for ``shiplane check``: this shiplane's own copy (no
    index needed, an air-gapped build included), else pip once, then the per-user cache."""
    names = ", ".join(f"{t.name} {t.version}" for t in TOOLS)
    if all((packaged / t.wheel).is_file() for t in TOOLS):
        return f"{names}, shipped with shiplane (no index needed)"
    return f"{names}, fetched by pip once, then from shiplane's cache"
