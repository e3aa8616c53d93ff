"""The dependencies' bytecode, compiled once on the controller instead of on every host.

Compiling a venv's modules is most of a cold install (about 1.5 CPU-seconds for a Flask +
SQLAlchemy app, against 0.3 s to install the files). The bytecode of a set of wheels is the
same on every host running the same interpreter version, so the controller compiles it once,
caches it per user, and ships it as one zip beside the wheels (a dependency entry of kind
``bytecode``; it does not enter the dependency digest). The agent unpacks it into the venv's
site-packages when its interpreter's magic number matches, and compiles on the host otherwise.

The ``.pyc`` files are *checked-hash* pycs (PEP 552): Python verifies them against the hash of
the installed source on import and recompiles on a mismatch, so they can never run stale code.
"""

from __future__ import annotations

import importlib.util
import json
import marshal
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import OperationError
from ._cache import cache_root, digest_of
from ._wheelhouse import Target

KIND = "bytecode"
META = "SHIPLANE-BYTECODE.json"
_DATE = (1980, 1, 1, 0, 0, 0)  # zip's epoch: the same pycs give the same zip bytes

# One worker: compile every module of the wheels named in argv[1:]; writes a marshalled list of
# (path relative to site-packages, pyc bytes) to stdout.
_WORKER = r"""
import importlib.util, marshal, sys, warnings, zipfile
warnings.simplefilter("ignore")
magic, tag, out = importlib.util.MAGIC_NUMBER, sys.implementation.cache_tag, []
for wheel in sys.argv[1:]:
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            parts = name.split("/")
            if not name.endswith(".py") or ".." in parts:
                continue
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                parts = parts[2:]
            source = zf.read(name)
            try:
                code = compile(source, "/".join(parts), "exec", dont_inherit=True)
            except (SyntaxError, ValueError):
                continue  # as compileall: the module fails when imported, not here
            # PEP 552 flags 0b11: hash-based, checked against the source on every import
            pyc = magic + (3).to_bytes(4, "little") + importlib.util.source_hash(source) \
                + marshal.dumps(code)
            out.append(("/".join([*parts[:-1], "__pycache__", f"{parts[-1][:-3]}.{tag}.pyc"]), pyc))
sys.stdout.buffer.write(marshal.dumps(out))
"""


def wanted(target: Target) -> bool:
    """Ship bytecode when it runs on the hosts (they run this CPython's minor version) and
    ``SHIPLANE_SHIP_BYTECODE=0`` does not turn it off (slow links: the zip is about as big as
    the wheels, and hosts then compile for themselves as before)."""
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    return (
        os.environ.get("SHIPLANE_SHIP_BYTECODE", "1") != "0"
        and sys.implementation.name == "cpython"
        and target.python_version == here
    )


def _groups(wheels: Sequence[Path], n: int) -> list[list[Path]]:
    """Split the wheels into ``n`` groups of about the same size (largest first)."""
    groups: list[list[Path]] = [[] for _ in range(n)]
    sizes = [0] * n
    for wheel in sorted(wheels, key=lambda w: w.stat().st_size, reverse=True):
        i = sizes.index(min(sizes))
        groups[i].append(wheel)
        sizes[i] += wheel.stat().st_size
    return [g for g in groups if g]


def _compile_all(wheels: Sequence[Path]) -> dict[str, bytes]:
    """Every module's pyc, by path, compiled by one worker process per core."""
    workers = max(1, min(os.cpu_count() or 1, len(wheels)))
    procs = [
        subprocess.Popen(
            [sys.executable, "-I", "-c", _WORKER, *map(str, group)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for group in _groups(wheels, workers)
    ]
    pycs: dict[str, bytes] = {}
    failed = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            failed.append(err.decode("utf-8", "replace")[-2000:])
        else:
            pycs.update(marshal.loads(out))
    if failed:
        raise OperationError("compiling the dependencies' bytecode failed\n" + failed[0])
    return pycs


def _zip(pycs: dict[str, bytes], dest: Path) -> None:
    meta = {
        "magic": importlib.util.MAGIC_NUMBER.hex(),
        "cache_tag": sys.implementation.cache_tag,
        "python_version": f"{sys.version_info.major}.{sys.version_info.minor}",
    }
    with zipfile.ZipFile(dest, "w") as zf:
        zf.writestr(zipfile.ZipInfo(META, _DATE), json.dumps(meta, sort_keys=True))
        for name in sorted(pycs):
            info = zipfile.ZipInfo(name, _DATE)
            info.external_attr = 0o644 << 16
            # level 1: three times faster than the default for 10% more bytes
            zf.writestr(info, pycs[name], compress_type=zipfile.ZIP_DEFLATED, compresslevel=1)


def bytecode_bundle(wheels: Sequence[tuple[Path, str]], emit: Callable[[str, str], None]) -> Path:
    """The zip of every module's ``.pyc`` for these (wheel, sha256) pairs, made once per user.

    Paths inside are relative to site-packages (``flask/__pycache__/app.cpython-311.pyc``);
    ``SHIPLANE-BYTECODE.json`` names the interpreter (magic number, cache tag) it is for.
    """
    tag = sys.implementation.cache_tag
    key = digest_of(
        "bytecode-v1", importlib.util.MAGIC_NUMBER.hex(), tag, *sorted(sha for _, sha in wheels)
    )
    cache = cache_root() / "bytecode"
    final = cache / f"{key[:32]}.zip"
    if final.is_file():
        emit("bytecode", f"reused {key[:12]}")
        return final
    emit("bytecode", f"compiling {len(wheels)} wheels for {tag}")
    cache.mkdir(parents=True, exist_ok=True)
    part = cache / f".{key[:32]}.zip.tmp-{os.getpid()}"
    try:
        _zip(_compile_all([w for w, _ in wheels]), part)
        os.replace(part, final)
    finally:
        part.unlink(missing_ok=True)
    return final


def bundle_name() -> str:
    """The bundle's file name in the manifest, e.g. ``bytecode-cpython-311.zip``."""
    return f"bytecode-{sys.implementation.cache_tag}.zip"
