"""A release's gunicorn started in two steps: its libraries during the install, its app at the switch.

Run by the release venv's own Python, as the supervisor's program (so its pid is gunicorn's
master, signals and restarts work as for a plain gunicorn):

    <venv>/bin/python preboot.py <root> <release_id> -- gunicorn <args...>
    <venv>/bin/python preboot.py <root> --spare <program>     (spare.py: the release comes later)

1. It imports gunicorn and the libraries that this venv's last server imported (``run/preload-
   <venv>.txt``, written by that server's workers once they had loaded the app; for a new venv,
   another venv's list or the app's own requirements). Nothing of the
   app is imported and nothing listens yet, so this can run while the release is installed and
   while the release hook migrates the database.
2. It waits for ``run/web-<release_id>.go``, which the switch writes.
3. It takes the release's runtime env (as ``exec-env`` does), changes into the release dir and
   runs gunicorn in this process. The workers fork with the libraries already imported: the
   candidate answers its health check in the time it takes to import the app's own code.

Libraries that patch the standard library (gevent, eventlet) must come first, so their worker
classes get no preload. ``[services.web] preboot = false`` turns all of this off.
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import re
import select
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

WAKE_CHECK = 1.0  # seconds between checks when no poke came (a safety net: pokes are instant)
NO_PRELOAD_WORKERS = ("gevent", "eventlet")
GAVE_UP = (
    3,
    4,
)  # gunicorn's exit codes for a worker that failed to boot, an app that failed to load


def go_path(root: str, release_id: str) -> str:
    return os.path.join(root, "run", f"web-{release_id}.go")


def gave_up_path(root: str, release_id: str) -> str:
    return os.path.join(root, "run", f"web-{release_id}.gaveup")


def lock_path(root: str) -> str:
    """The deploy lock (``Layout.lock``): a deploy, rollback or restart holds it while it runs."""
    return os.path.join(root, ".lock")


def preload_path(root: str, venv: str) -> str:
    return os.path.join(root, "run", f"preload-{os.path.basename(venv)[:16]}.txt")


def _worker_class(argv: list[str]) -> str:
    for flag in ("-k", "--worker-class"):
        if flag in argv[:-1]:
            return argv[argv.index(flag) + 1]
    return next((a.split("=", 1)[1] for a in argv if a.startswith("--worker-class=")), "sync")


def _site_dirs() -> list[str]:
    import site

    return [d.rstrip(os.sep) + os.sep for d in site.getsitepackages() if d.startswith(sys.prefix)]


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            return [line.strip() for line in handle if line.strip()]
    except OSError:
        return []


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def required_modules(release: str, site_dirs: list[str]) -> list[str]:
    """The top-level modules of the app's own requirements (its wheel's ``Requires-Dist``, extras
    left out), for a venv no server has recorded yet (``RECORD`` says what each one installed)."""
    wanted: set[str] = set()
    for meta in glob.glob(os.path.join(release, "lib", "*.dist-info", "METADATA")):
        for line in _read_lines(meta):
            if line.startswith("Requires-Dist:") and "extra ==" not in line:
                wanted.add(_normal(re.split(r"[\s;<>=!~\[(]", line.split(":", 1)[1].strip())[0]))
    modules: list[str] = []
    for site_dir in site_dirs:
        for info in glob.glob(os.path.join(site_dir, "*.dist-info")):
            if (
                _normal(os.path.basename(info)[: -len(".dist-info")].rsplit("-", 1)[0])
                not in wanted
            ):
                continue
            for line in _read_lines(os.path.join(info, "RECORD")):
                top = line.split(",", 1)[0].split("/", 1)[0]
                name = top.removesuffix(".py")
                if (
                    name.isidentifier()
                    and name not in modules
                    and ("/" in line.split(",", 1)[0] or top.endswith(".py"))
                ):
                    modules.append(name)
    return modules


def preload_names(record: str, release: str) -> list[str]:
    """What to import: this venv's record, else the newest record of another venv (a dependency
    change: most modules are the same; missing ones fail harmlessly), else the app's
    requirements (a first deploy)."""
    names = _read_lines(record)
    if names:
        return names
    others = sorted(
        glob.glob(os.path.join(os.path.dirname(record), "preload-*.txt")),
        key=lambda p: os.stat(p).st_mtime,
        reverse=True,
    )
    for other in others:
        names = _read_lines(other)
        if names:
            return names
    return required_modules(release, _site_dirs())


def preload(names: list[str]) -> int:
    """Import the named modules (best effort: one that fails is the app's to import later)."""
    done = 0
    for name in ["gunicorn.app.wsgiapp", "gunicorn.arbiter", *names]:
        try:
            importlib.import_module(name)
            done += 1
        except Exception:  # noqa: BLE001, S112 - preloading is an optimisation only
            continue
    return done


def record_imports(path: str, site_dirs: list[str]) -> None:
    """Write the venv modules this process has imported (a worker, after loading the app)."""
    names = [
        name
        for name, module in list(sys.modules.items())
        if any(str(getattr(module, "__file__", None) or "").startswith(d) for d in site_dirs)
    ]
    text = "\n".join(names) + "\n"
    try:
        with open(path, encoding="utf-8") as handle:
            if handle.read() == text:
                return
    except OSError:
        pass
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only run dir: the next boot preloads less, nothing else changes


def _record_after_load(path: str) -> None:
    """Have each worker record its imports once it has loaded the app."""
    from gunicorn.app import wsgiapp

    site_dirs = _site_dirs()
    load = wsgiapp.WSGIApplication.load

    def load_and_record(self: object) -> object:
        app = load(self)
        record_imports(path, site_dirs)
        return app

    wsgiapp.WSGIApplication.load = load_and_record


def proxy_marker_path(root: str, release_id: str) -> str:
    """Beside the release's socket: the builtin front sends PROXY lines to a server so marked
    (``backend.proxy_marker``: the same path)."""
    return os.path.join(root, "run", f"web-{release_id}.sock.proxy")


def _proxy_client(line: bytes) -> tuple[str, int] | None:
    """The client of a PROXY protocol v1 line (``PROXY TCP4 src dst sport dport``), or None
    (``PROXY UNKNOWN``, or anything malformed: the connection then has no address, as before)."""
    words = line.decode("ascii", "replace").split()
    if len(words) != 6 or words[1] not in ("TCP4", "TCP6") or not words[4].isdigit():
        return None
    return words[2], int(words[4])


PROXY_LINE_MAX = 107  # the v1 line's longest form, CRLF included (the PROXY protocol spec)


def read_proxy_lines(protocol_classes: list[type]) -> bool:
    """Teach uvicorn's HTTP protocols the PROXY line the builtin front starts each connection
    with: its client becomes the connection's ``scope["client"]`` and the line is not parsed as
    HTTP. A connection without one (a health check on the socket) is taken as it is. False when
    a class lacks what is patched (another uvicorn): the server is then not marked."""
    if not protocol_classes or not all(
        callable(getattr(cls, "data_received", None)) for cls in protocol_classes
    ):
        return False
    for cls in protocol_classes:
        _teach(cls)
    return True


def _teach(cls: type) -> None:
    original: Callable[[object, bytes], None] = cls.data_received  # type: ignore[attr-defined]

    def data_received(self: object, data: bytes) -> None:
        head: bytes | None = getattr(self, "_shiplane_proxy_head", b"")
        if head is None:  # this connection's first bytes are past
            original(self, data)
            return
        data = head + data
        if b"PROXY "[: len(data)] != data[:6]:  # no PROXY line: plain HTTP
            self._shiplane_proxy_head = None  # type: ignore[attr-defined]
            original(self, data)
            return
        end = data.find(b"\r\n")
        if end < 0 and len(data) < PROXY_LINE_MAX:
            self._shiplane_proxy_head = data  # type: ignore[attr-defined]  # the rest follows
            return
        self._shiplane_proxy_head = None  # type: ignore[attr-defined]
        client = _proxy_client(data[:end]) if end >= 0 else None
        if client is not None:
            self.client = client  # type: ignore[attr-defined]  # what uvicorn's scope reports
        rest = data[end + 2 :] if end >= 0 else data
        if rest:  # h11 takes empty data for the end of the stream: the request comes later
            original(self, rest)

    cls.data_received = data_received  # type: ignore[attr-defined]


def _uvicorn_protocols() -> list[type]:
    """uvicorn's HTTP protocol classes this venv has (httptools' only when it is installed)."""
    classes: list[type] = []
    for module, name in (
        ("uvicorn.protocols.http.h11_impl", "H11Protocol"),
        ("uvicorn.protocols.http.httptools_impl", "HttpToolsProtocol"),
    ):
        try:
            classes.append(getattr(importlib.import_module(module), name))
        except Exception:  # noqa: BLE001, S112 - h11 or httptools not installed
            continue
    return classes


def _runtime_env(root: str, release_id: str) -> dict[str, str]:
    """The release's env, computed by the agent's own ``runtime`` module, which is then dropped
    from ``sys.modules`` and ``sys.path`` so it can shadow none of the app's modules."""
    here = os.path.dirname(os.path.abspath(__file__))
    package = os.path.basename(here)
    sys.path.insert(0, os.path.dirname(here))
    try:
        runtime = importlib.import_module(f"{package}.runtime")
        paths = importlib.import_module(f"{package}.paths")
        env: dict[str, str] = runtime.runtime_env(paths.Layout(root), release_id)
        return env
    finally:
        sys.path.pop(0)
        for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
            del sys.modules[name]


def wake_path(root: str, program: str) -> str:
    """The FIFO a waiting server sleeps on; the agent pokes it after writing a claim or go file."""
    return os.path.join(root, "run", f"{program}.wake")


def wait_for(check: Callable[[], T | None], fifo: str) -> T:
    """Sleep until ``check()`` returns something, woken by a write to ``fifo`` (no CPU while
    idle: a spare may wait for days). Opened read-write, so it never reads as closed."""
    try:
        os.mkfifo(fifo, 0o600)
    except FileExistsError:
        pass
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        while True:
            found = check()
            if found is not None:
                return found
            select.select([fd], [], [], WAKE_CHECK)
            try:
                os.read(fd, 4096)
            except BlockingIOError:
                pass
    finally:
        os.close(fd)


def _read_claim(path: str) -> tuple[str, list[str]] | None:
    """A spare's release and gunicorn arguments, once an install has adopted it (spare.py)."""
    try:
        with open(path, encoding="utf-8") as handle:
            claim = json.load(handle)
        return str(claim["release_id"]), [str(a) for a in claim["argv"]][1:]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def main(argv: list[str]) -> int:
    spare = len(argv) == 3 and argv[1] == "--spare"
    if not spare and (len(argv) < 4 or argv[2] != "--" or argv[3] != "gunicorn"):
        sys.stderr.write(
            "usage: preboot.py <root> <release_id> -- gunicorn <args...> | "
            "preboot.py <root> --spare <program>\n"
        )
        return 2
    root = argv[0]
    # Python put this script's dir first on sys.path: the agent's modules must not shadow the
    # app's (a module named health or store), so it goes before anything is imported.
    script_dir = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != script_dir]
    record = preload_path(root, sys.prefix)
    if spare:  # spare.py only makes spares for workers that need no stdlib patching
        program = argv[2]
        claim = os.path.join(root, "run", f"{program}.claim")
        fifo = wake_path(root, program)
        # The deploy that made this spare comes first: its imports (the spare's whole cost, ~0.5
        # CPU-s for a Flask + SQLAlchemy app) wait until the deploy lock is released, unless the
        # next deploy claims it sooner (they are needed then). The release wakes this FIFO.
        wait_for(
            lambda: True if _read_claim(claim) or not os.path.exists(lock_path(root)) else None,
            fifo,
        )
        preload(preload_names(record, ""))
        release_id, args = wait_for(lambda: _read_claim(claim), fifo)
    else:
        release_id, args = argv[1], argv[4:]
        program = f"web-{release_id}"
        if not any(w in _worker_class(args).lower() for w in NO_PRELOAD_WORKERS):
            preload(preload_names(record, os.path.join(root, "releases", release_id)))
    go = go_path(root, release_id)
    wait_for(lambda: True if os.path.exists(go) else None, wake_path(root, program))
    env = _runtime_env(root, release_id)
    os.environ.clear()
    os.environ.update(env)
    release = os.path.join(root, "releases", release_id)
    os.chdir(release)
    # gunicorn took the cwd as its --chdir default when the preload imported its config module
    args = ["--chdir", release, *args]
    # what PYTHONPATH would have put first, had gunicorn been started with this env
    code = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:0] = [p for p in code if p not in sys.path]
    _record_after_load(record)
    marker = proxy_marker_path(root, release_id)
    if "uvicorn" in _worker_class(args).lower() and "--proxy-protocol" in args:
        # backend.uvicorn_reads_proxy_protocol: uvicorn ignores the flag; this process reads it
        args = [a for a in args if a != "--proxy-protocol"]
        if read_proxy_lines(_uvicorn_protocols()):
            with open(marker, "w", encoding="utf-8"):
                pass  # before gunicorn listens: the front finds it from the first connection
    # a USR2 re-exec runs sys.executable with these: the venv's own gunicorn script
    sys.argv = [os.path.join(sys.prefix, "bin", "gunicorn"), *args]
    from gunicorn.app.wsgiapp import run

    try:
        return int(run() or 0)
    except SystemExit as exc:
        if exc.code in GAVE_UP:  # the switch fails now: the supervisor's restarts cannot help
            with open(gave_up_path(root, release_id), "w", encoding="utf-8") as out:
                out.write(f"{exc.code}\n")
        raise


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
