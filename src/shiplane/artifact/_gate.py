"""The test gate: the project's tests, run in a cached venv made from the lock (`shiplane test`)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import OperationError, UsageError
from ..secret import Secret
from ._backend import _uv
from ._index import PackageAccess
from ._wheelhouse import load_lock

_TAIL = 30


def _run(cmd: list[str], cwd: Path, what: str, access: PackageAccess | None = None) -> None:
    access = access or PackageAccess()
    result = subprocess.run(
        cmd,
        cwd=cwd,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        check=False,
        env=dict(access.uv_env(), UV_PYTHON_DOWNLOADS="never"),
    )
    if result.returncode != 0:
        tail = access.scrub("\n".join(result.stdout.splitlines()[-_TAIL:]))
        raise OperationError(f"{what} failed (exit {result.returncode})\n{tail}")


def gate_env(
    project: Path, requirements: str, extra: Sequence[str], secrets: Sequence[Secret] = ()
) -> Path:
    """The venv for the gate, made with uv once per (lock bytes + extra packages) and reused.
    ``requirements``: the lock ([build] requirements); "" finds it (``_locks.find_lock``).
    Its packages come from where the build's do (``_index``: an air-gapped build's find-links
    folder, a private index with ``secrets``)."""
    lock = load_lock(project, requirements)
    access = PackageAccess.of(lock.lines, secrets)
    key = hashlib.sha256(
        lock.data + b"\0" + "\0".join(sorted(extra)).encode() + f"\0{sys.version_info[:2]}".encode()
    ).hexdigest()
    venv = project / ".shiplane" / "build" / f"testenv-{key[:16]}"
    if (venv / ".complete").is_file():
        return venv
    # Venvs are not relocatable: build in place; a half-made one (crash) is made anew.
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    uv = _uv()
    _run(
        [uv, "venv", "--quiet", "--python", sys.executable, str(venv)],
        project,
        "creating the test environment",
    )
    reqs: list[str] = []
    if lock.lines and lock.format == "requirements":
        reqs = ["-r", str(lock.path)]  # as written: its `-e .` too, as ever
    elif lock.lines:  # another lock's requirements lines (artifact/_locks.py)
        exported = venv.parent / f"{venv.name}.requirements.txt"
        exported.write_text("".join(line + "\n" for line in lock.lines))
        reqs = ["-r", str(exported)]
    if reqs or extra:
        _run(
            [
                uv,
                "pip",
                "install",
                "--quiet",
                "--python",
                str(venv / "bin" / "python"),
                *access.uv_args(),
                *reqs,
                *extra,
            ],
            project,
            "installing the test environment",
            access,
        )
    (venv / ".complete").write_text("")
    return venv


def _gate_environ(project: Path, venv: Path) -> dict[str, str]:
    """The gate's environment: its venv first on PATH, ``src`` (else the project) on PYTHONPATH,
    so the app imports without being installed."""
    env = dict(os.environ)
    env["VIRTUAL_ENV"] = str(venv)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    src = project / "src"
    paths = [str(src if src.is_dir() else project)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.pop("PYTHONHOME", None)
    return env


# Imports the entry's module and looks its object up, as gunicorn/uvicorn will, without calling
# a factory (``module:create_app()``): exit 3 names a module that is not there, 4 an attribute.
_ENTRY_PROBE = """
import importlib, sys
module, _, attr = sys.argv[1].partition(":")
try:
    obj = importlib.import_module(module)
except ModuleNotFoundError as exc:
    if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
        print(exc.name)
        sys.exit(3)
    raise
for part in (attr.split("(", 1)[0].strip() or "application").split("."):
    if not hasattr(obj, part):
        print(part)
        sys.exit(4)
    obj = getattr(obj, part)
"""


def check_entry(
    project: Path, entry: str, key: str, requirements: str, extra: Sequence[str] = ("pytest",)
) -> None:
    """The app's entry (``app.wsgi``/``app.asgi``, named ``key``) imports in the gate's venv and
    has its object: a UsageError (exit 2) naming what is missing, an OperationError with the
    exception's line when importing it raises; before anything is built or sent."""
    project = Path(project).resolve()
    venv = gate_env(project, requirements, extra)
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", _ENTRY_PROBE, entry],
        cwd=project,
        env=_gate_environ(project, venv),
        capture_output=True,
        text=True,
        errors="replace",
        timeout=120,
        check=False,
    )
    module = entry.partition(":")[0]
    missing = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "?"
    if done.returncode == 3:
        raise UsageError(
            f"app.{key} = {entry!r}: there is no module {missing!r} (checked in the test "
            "gate's environment, with the project's src/ or root on the path)",
            hint=f"correct app.{key}, or add the module to the project",
        )
    if done.returncode == 4:
        raise UsageError(
            f"app.{key} = {entry!r}: module {module!r} has no {missing!r}",
            hint=f"correct app.{key} (module:object, or module:factory())",
        )
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise OperationError(
            f"app.{key} = {entry!r} does not import: {lines[-1] if lines else 'exit ' + str(done.returncode)}",
            hint="\n".join(lines[-8:]),
        )


def run_gate(
    project: Path,
    command: str,
    requirements: str,
    *,
    extra: Sequence[str] = ("pytest",),
    timeout: float = 600,
    output: Callable[[str], None],
    secrets: Sequence[Secret] = (),
) -> None:
    """Run the test gate ``command`` (a shell command) in the project; raise unless it passes.

    The venv (``.shiplane/build/testenv-<digest of lock+extra>``) comes first on PATH;
    ``PYTHONPATH`` is ``src`` when the project has one (else the project), so the app imports
    without being installed. Each output line goes to ``output``. A non-zero exit raises
    OperationError "test gate failed (exit N)" with the output's tail; so does the timeout.
    """
    project = Path(project).resolve()
    venv = gate_env(project, requirements, extra, secrets)
    env = _gate_environ(project, venv)
    tail: deque[str] = deque(maxlen=_TAIL)
    proc = subprocess.Popen(
        command,
        shell=True,
        cwd=project,
        env=env,
        text=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        errors="replace",
    )

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            output(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        # The command may have started children (pytest-xdist, servers): end its whole group.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        reader.join(timeout=5)
        raise OperationError(
            f"test gate timed out after {timeout:g} s: {command}\n" + "\n".join(tail)
        ) from None
    reader.join(timeout=5)
    if code != 0:
        raise OperationError(
            f"test gate failed (exit {code}): {command}\n" + "\n".join(tail),
            hint="fix the tests; deploy refuses to ship a red build",
        )
