"""Load ``shiplane.toml``: parse, validate, and turn every failure into one human message that
names the file, the line, the key path, what was expected and what was found."""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from shiplane.config.formats import utf8_text
from shiplane.config.paths import PLACEHOLDERS, normalized, system_dir
from shiplane.config.schema import SECONDS, DeployFile
from shiplane.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEPLOY_FILE = "shiplane.toml"
MAX_DEPTH = 16  # tables and arrays nested deeper than this are no deploy file's (its own nest 5)


@dataclass(frozen=True)
class Project:
    """A loaded project: where it is and its validated deploy file."""

    root: Path
    path: Path
    deploy: DeployFile
    text: str

    def stage_names(self) -> list[str]:
        return list(self.deploy.stages)


def find_deploy_file(start: Path) -> Path:
    """The deploy file in ``start`` or its nearest parent (as git finds its repository)."""
    start = start.resolve()
    for folder in (start, *start.parents):
        candidate = folder / DEPLOY_FILE
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"no {DEPLOY_FILE} in {start} or any parent folder",
        hint="Run shiplane in your app's checkout, or create one with `shiplane init`.",
    )


def load_project(path: Path | None = None, *, cwd: Path | None = None) -> Project:
    """Read and validate the deploy file; raises ConfigError (exit 2) with file:line on any problem."""
    file = path if path is not None else find_deploy_file(cwd or Path.cwd())
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the deploy file: {exc.strerror}") from None
    text = utf8_text(raw, file, "the deploy file")
    data = parse_toml(text, file)
    check_values(data, file, text)
    try:
        deploy = DeployFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, file, text, DeployFile)) from None
    except RecursionError:  # check_values bounds the nesting; this is a last line of defence
        raise ConfigError(f"{file}: the deploy file nests tables or arrays too deeply") from None
    project = Project(root=file.parent.resolve(), path=file, deploy=deploy, text=text)
    check_semantics(project)
    return project


def parse_toml(text: str, file: Path) -> dict[str, object]:
    """tomllib's parse, every failure a ConfigError with file:line."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(toml_error(file, exc)) from None
    except RecursionError:
        line = _too_deep_line(text)
        raise ConfigError(
            f"{file}{':' + str(line) if line else ''}: not valid TOML: arrays or inline tables "
            f"nested too deeply (a deploy file nests at most {MAX_DEPTH} levels)"
        ) from None
    except ValueError as exc:  # e.g. an integer longer than Python converts (4300 digits)
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None


def _too_deep_line(text: str) -> int:
    """The line where brackets first nest deeper than MAX_DEPTH (strings skipped roughly), or 0."""
    depth = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = re.sub(r'"(?:[^"\\]|\\.)*"|\'[^\']*\'', "", raw)
        for char in line.split("#")[0]:
            depth += char in "[{"
            depth -= char in "]}"
            if depth > MAX_DEPTH:
                return number
    return 0


def check_values(data: Any, file: Path, text: str) -> None:
    """Checks every value of the parsed file needs, whatever its key: nesting at most MAX_DEPTH,
    numbers finite (TOML's inf and nan are never a timeout, a port or a count), no NUL characters
    or undecodable text (no path or command can hold them). A ConfigError names the first
    offender's key and line."""
    stack: list[tuple[Any, list[str | int]]] = [(data, [])]
    while stack:
        value, loc = stack.pop()
        problem = None
        if len(loc) > MAX_DEPTH:
            problem = f"nested {len(loc)} levels deep; a deploy file nests at most {MAX_DEPTH}"
        elif isinstance(value, float) and not math.isfinite(value):
            problem = f"expected a finite number, found {value!r}"
        elif isinstance(value, str) and _bad_text(value):
            problem = f"{_bad_text(value)} is not allowed in a value, found {value!r}"
        elif isinstance(value, dict):
            for key, item in value.items():
                if _bad_text(key):
                    problem = f"{_bad_text(key)} is not allowed in a key, found {key!r}"
                    break
                stack.append((item, [*loc, key]))
        elif isinstance(value, list):
            stack.extend((item, [*loc, i]) for i, item in enumerate(value))
        if problem is not None:
            line = locate(text, loc)
            raise ConfigError(
                f"{file}{':' + str(line) if line else ''}: {_dotted(loc[:MAX_DEPTH]) or '(top level)'}: {problem}"
            )


def toml_error(file: Path, exc: Exception) -> str:
    """``file:LINE: not valid TOML: <what>`` from tomllib's "(at line L, column C)" message."""
    text = str(exc)
    match = re.search(r"\(at line (\d+), column (\d+)\)", text)
    if not match:
        return f"{file}: not valid TOML: {text}"
    what = text[: match.start()].strip()
    return f"{file}:{match[1]}: not valid TOML (column {match[2]}): {what}"


def describe_validation_error(
    exc: ValidationError,
    file: Path,
    text: str,
    model: type[BaseModel],
    prefix: Sequence[str | int] = (),
) -> str:
    """All of pydantic's errors, each as ``file:line: key.path: message``, first the earliest line."""
    errors = [
        (error, [*prefix, *(part for part in error["loc"] if not _is_union_tag(part))])
        for error in exc.errors(include_url=False)
    ]
    lines = []
    for error, loc in errors:
        if str(error["type"]).endswith("_type") and any(
            len(other) > len(loc) and other[: len(loc)] == loc for _, other in errors
        ):
            continue  # a union's "not a string" beside the real problem inside its other member
        message = _message(error, model, loc[len(prefix) :])
        lines.append((locate(text, loc), _dotted(loc), message))
    lines.sort(key=lambda item: item[0])
    seen: set[tuple[str, str]] = set()
    out = []
    for line, key, message in lines:
        if (key, message) in seen:
            continue
        seen.add((key, message))
        where = f"{file}:{line}" if line else f"{file}"
        out.append(f"{where}: {key or '(top level)'}: {message}")
    return "\n".join(out)


def _is_union_tag(part: str | int) -> bool:
    # pydantic inserts the member type name ("str", "list[RenderedFile]", "int") into locations
    return isinstance(part, str) and (
        part in {"str", "int", "float", "bool"} or "[" in part or "constrained" in part
    )


def _message(error: Any, model: type[BaseModel], loc: Sequence[str | int]) -> str:
    kind = error["type"]
    found = error.get("input")
    if kind == "extra_forbidden":
        key = str(loc[-1]) if loc else "?"
        known = _known_keys(model, loc[:-1])
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        hint = (
            f"; did you mean {close[0]!r}?"
            if close
            else (f"; expected one of: {', '.join(sorted(known))}" if known else "")
        )
        return f"unknown key {key!r}{hint}"
    if kind == "missing":
        return "required key is missing"
    message = str(error["msg"]).removeprefix("Value error, ")
    if found is not None and not isinstance(found, (dict, list)) and repr(found) not in message:
        return f"{message} (found {found!r})"
    return message


def _known_keys(model: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    """The keys the table at ``loc`` accepts, for "did you mean"."""
    current: Any = model
    for part in loc:
        if isinstance(current, _DictOf):
            current = current.model  # the free name of a stage or service
        elif isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            current = _model_in(field.annotation) if field is not None else None
        if current is None:
            return []
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _model_in(annotation: Any) -> Any:
    """The model inside an annotation such as ``dict[str, Stage]`` or ``Stage | None``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return _DictOf(found) if getattr(annotation, "__origin__", None) is dict else found
    metadata_origin = getattr(annotation, "__origin__", None)
    if metadata_origin is not None and metadata_origin is not dict:
        return _model_in(metadata_origin)
    return None


class _DictOf:
    """Marks a ``dict[str, Model]`` level, so the free name in the path is skipped."""

    def __init__(self, model: type[BaseModel]) -> None:
        self.model = model


def _bad_text(text: str) -> str | None:
    """What no value may hold: a NUL (no path or command can), or a lone surrogate (a command
    line's undecodable bytes, which no file name or UTF-8 file can take)."""
    if "\0" in text:
        return "a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "text that is not valid UTF-8"
    return None


def _dotted(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-\"'.]+)\s*=")


def locate(text: str, loc: Sequence[str | int]) -> int:
    """Best line number for a key path in TOML text (0 when unknown).

    tomllib keeps no positions, so this walks the text tracking table headers and picks the line
    whose key path (a header, or a ``key =`` inside its table, or an inline table holding the rest)
    is the longest prefix of ``loc``; the first such line wins.
    """
    path = [str(p) for p in loc if not isinstance(p, int)]
    best, best_depth = 0, 0
    table: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(raw)
        if header:
            table = [_unquote(p) for p in header.group(1).split(".")]
            full = table
        else:
            key = _KEY.match(raw)
            if not key:
                continue
            full = table + [_unquote(p) for p in key.group(1).split(".")]
        if full == path[: len(full)] and len(full) > best_depth:
            best, best_depth = number, len(full)
    return best


def _common(a: Sequence[str], b: Sequence[str]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _unquote(part: str) -> str:
    return part.strip().strip('"').strip("'")


def check_semantics(project: Project) -> None:
    """Checks that need more than one key or the disk: port clashes, where each stage's deploy_to
    lies against the checkout, project files that are symlinks out of the project, hooks.timeout."""
    deploy = project.deploy
    problems: list[tuple[int, str, str]] = [
        *_deploy_to_problems(project),
        *_escaping_files(project),
    ]
    if deploy.hooks.timeout > SECONDS:
        problems.append(
            (
                locate(project.text, ["hooks", "timeout"]),
                "hooks.timeout",
                f"expected at most {SECONDS:.0f} seconds, found {deploy.hooks.timeout!r}",
            )
        )
    claimed: dict[tuple[str, int], str] = {}
    for name, stage in deploy.stages.items():
        port = deploy.web_port(name)
        if port is None:
            continue
        for host in stage.hosts:
            key = (host.split(":")[0], port)
            other = claimed.get(key)
            if other is not None and deploy.stages[other].deploy_to != stage.deploy_to:
                problems.append(
                    (
                        locate(project.text, ["stages", name, "port"])
                        or locate(project.text, ["stages", name]),
                        f"stages.{name}.port",
                        f"port {port} on host {host!r} is already used by stage {other!r}; give each stage on a host its own port",
                    )
                )
            claimed.setdefault(key, name)
    if problems:
        raise ConfigError(
            "\n".join(f"{project.path}:{line}: {key}: {msg}" for line, key, msg in problems)
        )


def _deploy_to_problems(project: Project) -> list[tuple[int, str, str]]:
    """A local stage deploys into a folder of the project (or elsewhere on this machine), never
    into the project itself nor a folder holding it; a remote stage never into this checkout."""
    problems = []
    root = project.root
    for name, stage in project.deploy.stages.items():
        value = stage.deploy_to
        target = Path(os.path.expanduser(value)) if stage.is_local else Path(normalized(value))
        if not target.is_absolute():
            target = root / target
        try:
            resolved = target.resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop
            problem: str | None = f"deploy_to {value!r} cannot be resolved: {exc}"
        else:
            problem = _deploy_to_problem(value, resolved, root, local=stage.is_local)
        if problem:
            line = locate(project.text, ["stages", name, "deploy_to"]) or locate(
                project.text, ["stages", name]
            )
            problems.append((line, f"stages.{name}.deploy_to", problem))
    return problems


def _deploy_to_problem(value: str, resolved: Path, root: Path, *, local: bool) -> str | None:
    if not local:
        if resolved == root or resolved.is_relative_to(root):
            return (
                f"deploy_to {value!r} is inside this checkout ({root}); a stage with SSH hosts deploys into "
                "a directory of its own, e.g. /srv/<app>"
            )
        return None
    if resolved == root or resolved in root.parents:
        what = "the project itself" if resolved == root else "a folder holding the project"
        return f"deploy_to {value!r} is {what} ({resolved}); use a folder of its own, e.g. .shiplane/local"
    if not value.startswith(("/", "~")) and not resolved.is_relative_to(root):
        return (
            f"deploy_to {value!r} leads out of the project (to {resolved}, through a symlink); "
            "a relative deploy_to is a folder inside the project"
        )
    hit = system_dir(str(resolved))
    if hit is not None and normalized(value) != str(resolved):
        return (
            f"deploy_to {value!r} leads to {resolved}, {'a system directory' if hit == str(resolved) else 'inside ' + hit}; "
            "use a directory of the app's own"
        )
    return None


def _escaping_files(project: Project) -> list[tuple[int, str, str]]:
    """Files of the project named in the deploy file that are (or lie below) a symlink leading out
    of the project: shiplane would read, render or ship a file of this machine instead."""
    deploy = project.deploy
    named: list[tuple[list[str | int], str]] = [
        (["build", "requirements"], deploy.build.requirements)
    ]
    named += [
        (["build", "include", i], _literal_prefix(g)) for i, g in enumerate(deploy.build.include)
    ]
    named += [
        (["hooks", "release_if_changed", i], _literal_prefix(g))
        for i, g in enumerate(deploy.hooks.release_if_changed)
    ]
    named += [(["config", "files", i], f) for i, f in enumerate(deploy.config.files)]
    if deploy.config.secrets_file:
        named.append((["config", "secrets_file"], deploy.config.secrets_file))
    if isinstance(deploy.config.render, list):
        named += [
            (["config", "render", i, "template"], spec.template)
            for i, spec in enumerate(deploy.config.render)
            if spec.template
        ]
    for name, stage in deploy.stages.items():
        if stage.secrets_file:
            named.append((["stages", name, "secrets_file"], stage.secrets_file))
    problems = []
    root = project.root
    for loc, pattern in named:
        stage_names = (
            list(deploy.stages) if any(f"{{{p}}}" in pattern for p in PLACEHOLDERS) else [""]
        )
        for stage_name in stage_names:
            rel = pattern.replace("{stage}", stage_name)
            if not rel:
                continue
            try:
                resolved = (root / rel).resolve()
            except (OSError, RuntimeError) as exc:  # a symlink loop
                problems.append(
                    (locate(project.text, loc), _dotted(loc), f"{rel!r} cannot be resolved: {exc}")
                )
                break
            if loc[-1] == "template" and not resolved.is_file():
                problems.append(
                    (
                        locate(project.text, loc),
                        _dotted(loc),
                        f"template {rel!r} is not a file of the project",
                    )
                )
                break
            if resolved != root and not resolved.is_relative_to(root):
                problems.append(
                    (
                        locate(project.text, loc),
                        _dotted(loc),
                        (
                            f"{rel!r} leads out of the project (to {resolved}, through a symlink); the "
                            "deploy file names only files of the project: copy the file into it instead"
                        ),
                    )
                )
                break
    return problems


def _literal_prefix(glob: str) -> str:
    """The folders of a glob before its first wildcard (``static/**/*.css`` -> ``static``)."""
    parts = []
    for part in glob.strip().removeprefix("./").strip("/").split("/"):
        if any(c in part for c in "*?["):
            break
        parts.append(part)
    return "/".join(parts)


def stage_of(project: Project, name: str | None) -> str:
    """The stage to act on: validated against the deploy file, with "did you mean"."""
    stages = project.stage_names()
    if not name:
        raise ConfigError(
            "no stage given: pass --stage NAME or set SHIPLANE_STAGE",
            hint=f"Stages in {project.path.name}: {', '.join(stages)}.",
        )
    if name not in project.deploy.stages:
        close = difflib.get_close_matches(name, stages, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"{project.path}: unknown stage {name!r}; {hint}stages are: {', '.join(stages)}"
        )
    return name


def _python_entry(entry: object) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("host"), str) and "python" in entry


def with_overrides(project: Project, stage: str, hosts: str | None, sets: Sequence[str]) -> Project:
    """The project with one stage's keys overridden for this run (``--hosts``, ``--set k=v``),
    validated like the file; a bad value is a ConfigError naming the option and the key."""
    if not hosts and not sets:
        return project
    data = tomllib.loads(project.text)
    table = data.setdefault("stages", {}).setdefault(stage, {})
    if hosts:
        chosen = [h.strip() for h in hosts.split(",") if h.strip()]
        # a host's own Python (a table in hosts, or host_python) goes with it; others drop out
        pythons = {
            **{e["host"]: e["python"] for e in table.get("hosts", []) if _python_entry(e)},
            **(table.get("host_python") or {}),
        }
        table["hosts"] = chosen
        table["host_python"] = {h: p for h, p in pythons.items() if h in chosen}
    for item in sets:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set port=5000")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = table
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(
                    f"--set {item!r}: stages.{stage}.{part} is not a table, so it has no key {parts[-1]!r}"
                )
        node[parts[-1]] = value
    check_values(data, Path("--set/--hosts"), "")
    try:
        deploy = DeployFile.model_validate(data)
    except ValidationError as exc:
        message = describe_validation_error(exc, Path("--set/--hosts"), "", DeployFile)
        raise ConfigError(f"bad override for stage {stage!r}:\n{message}") from None
    overridden = Project(root=project.root, path=project.path, deploy=deploy, text=project.text)
    check_semantics(overridden)
    return overridden
