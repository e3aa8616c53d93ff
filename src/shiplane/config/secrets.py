"""Where secrets come from: the deploying environment, a stage secrets file outside version
control (refused when others may read it), or ``secrets_command``. Values become ``Secret``."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Mapping
from pathlib import Path

from shiplane.config.formats import parse_env, utf8_text
from shiplane.config.schema import DeployFile
from shiplane.errors import ConfigError
from shiplane.secret import Secret


def secrets_file_of(deploy: DeployFile, stage: str, root: Path) -> Path | None:
    pattern = deploy.stages[stage].secrets_file or deploy.config.secrets_file
    return (
        (root / pattern.replace("{stage}", stage)) if pattern else None
    )  # the schema allows no other placeholder


def resolve_secrets(
    deploy: DeployFile, stage: str, root: Path, environ: Mapping[str, str] | None = None
) -> dict[str, Secret]:
    """Every secret the deploy file names, for one stage; all missing ones listed in one error.

    Order of precedence: the environment (CI sets them there), then the stage's secrets file,
    then ``secrets_command``. The file and the command are only read when something is missing.
    """
    return _resolve(deploy, stage, root, environ, list(deploy.config.secrets), "secret")


def resolve_build_secrets(
    deploy: DeployFile, stage: str | None, root: Path, environ: Mapping[str, str] | None = None
) -> dict[str, Secret]:
    """``[build] secrets`` (a private index's token), looked for as a stage's secrets are; a
    build without a stage (``shiplane build``) looks in the environment only. They go to the
    build's pip alone, never to a host (docs/dependencies.md, "Private indexes")."""
    return _resolve(deploy, stage, root, environ, list(deploy.build.secrets), "build secret")


def _resolve(
    deploy: DeployFile,
    stage: str | None,
    root: Path,
    environ: Mapping[str, str] | None,
    wanted: list[str],
    what: str,
) -> dict[str, Secret]:
    environ = os.environ if environ is None else environ
    found: dict[str, Secret] = {
        name: Secret(environ[name], name) for name in wanted if environ.get(name)
    }
    if stage is None:  # no stage: the environment alone
        return _complete(wanted, found, stage, what, ["the environment"])
    if len(found) < len(wanted):
        path = secrets_file_of(deploy, stage, root)
        if path is not None and path.exists():
            for name, value in _read_secrets_file(path).items():
                if name in wanted and name not in found and value:
                    found[name] = Secret(value, name)
    command = deploy.stages[stage].secrets_command or deploy.config.secrets_command
    if len(found) < len(wanted) and command:
        for name, value in _run_secrets_command(command, stage, root).items():
            if name in wanted and name not in found and value:
                found[name] = Secret(value, name)
    sources = ["the environment"]
    path = secrets_file_of(deploy, stage, root)
    if path is not None:
        sources.append(str(path))
    if command:
        sources.append("secrets_command")
    return _complete(wanted, found, stage, what, sources)


def _complete(
    wanted: list[str], found: dict[str, Secret], stage: str | None, what: str, sources: list[str]
) -> dict[str, Secret]:
    """``found`` in ``wanted``'s order, or one error listing every missing one."""
    missing = [name for name in wanted if name not in found]
    if missing:
        who = f"stage {stage!r}" if stage else "the build (no stage given)"
        raise ConfigError(
            f"{who} is missing {what}{'s' if len(missing) > 1 else ''}: {', '.join(missing)}",
            hint=f"Looked in {', '.join(sources)}. Set them there; nothing was sent to any host.",
        )
    return {name: found[name] for name in wanted}


def _read_secrets_file(path: Path) -> dict[str, str]:
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"{path}: secrets file is readable by others (mode {stat.S_IMODE(mode):04o})",
                hint=f"Make it private first: chmod 600 {path}",
            )
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the secrets file: {exc.strerror}") from None
    return parse_env(utf8_text(raw, path, "secrets file"), path, echo=False)


def _run_secrets_command(command: str, stage: str, root: Path) -> dict[str, str]:
    env = {**os.environ, "SHIPLANE_STAGE": stage}
    try:
        done = subprocess.run(
            command,
            shell=True,
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ConfigError(f"secrets_command did not finish within 60 s: {command}") from None
    if done.returncode != 0:
        # its stderr may hold secrets, so only its exit code is reported
        raise ConfigError(f"secrets_command failed with exit code {done.returncode}: {command}")
    return parse_env(done.stdout, "secrets_command output", echo=False)
