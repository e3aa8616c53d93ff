"""Read and write the config formats apps use: ini (as in the article), toml, ``.env`` and json.

Inside shiplane a config is ``Sections``: section name -> key -> value. Top-level keys of toml,
json and ``.env`` files live in the section ``""``.
"""

from __future__ import annotations

import configparser
import json
import sys
from pathlib import Path
from typing import Any

from shiplane.errors import ConfigError
from shiplane.secret import Secret

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

Value = str | int | float | bool | Secret
Sections = dict[str, dict[str, Value]]
# a JSON/TOML document written from sections: tables of plain values and tables
Tree = dict[str, "str | int | float | bool | Tree"]

FORMATS = ("ini", "toml", "env", "json")


def format_of(path: str, explicit: str | None = None) -> str:
    """The format named explicitly, else the one the file name says (``.env`` files too)."""
    if explicit:
        return explicit
    name = Path(path).name
    if name == ".env" or name.endswith(".env"):
        return "env"
    suffix = Path(path).suffix.lstrip(".")
    if suffix in ("ini", "cfg", "conf"):
        return "ini"
    if suffix in FORMATS:
        return suffix
    raise ConfigError(
        f"{path}: cannot tell the config format from the file name; use .ini, .toml, .env or .json"
    )


def read_sections(path: Path) -> Sections:
    """Parse one config layer file into sections; errors name the file (and line when known)."""
    fmt = format_of(str(path))
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    text = utf8_text(raw, path, "config file")
    try:
        return _parse_sections(text, fmt, path)
    except RecursionError:
        raise ConfigError(f"{path}: config file nests tables or arrays too deeply") from None
    except ValueError as exc:  # e.g. an integer longer than Python converts (4300 digits)
        raise ConfigError(f"{path}: not a valid {fmt} file: {exc}") from None


def utf8_text(raw: bytes, path: Path | str, what: str) -> str:
    """``raw`` as UTF-8 text; otherwise a ConfigError naming the line and column of the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            f"{path}:{line}: {what} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {column})",
            hint="Save it as UTF-8.",
        ) from None


def _parse_sections(text: str, fmt: str, path: Path) -> Sections:
    if fmt == "ini":
        parser = configparser.ConfigParser(interpolation=None)
        parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep keys' case
        try:
            parser.read_string(text, source=str(path))
        except configparser.Error as exc:
            raise ConfigError(f"{path}: not a valid ini file: {exc}") from None
        sections: Sections = {}
        if parser.defaults():
            sections["DEFAULT"] = dict(parser.defaults())
        for name in parser.sections():
            sections[name] = {
                key: parser.get(name, key)
                for key in parser.options(name)
                if key not in parser.defaults() or parser.has_option(name, key)
            }
        return sections
    if fmt == "toml":
        try:
            return _from_tree(tomllib.loads(text), path)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    if fmt == "json":
        try:
            return _from_tree(json.loads(text), path)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    return {"": dict(parse_env(text, path))}


def parse_env(text: str, path: Path | str, *, echo: bool = True) -> dict[str, str]:
    """``KEY=VALUE`` lines (``export`` and quotes allowed, ``#`` comments); errors name the line
    (and quote its start unless ``echo`` is False: a secrets file's lines are secrets)."""
    out: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.replace("_", "a").isalnum() or not key.isascii() or key[0].isdigit():
            found = f", found {raw.strip()[:40]!r}" if echo else ""
            raise ConfigError(f"{path}:{number}: expected KEY=VALUE{found}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            try:
                value = json.loads(value) if value[0] == '"' else value[1:-1]
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"{path}:{number}: {key}: a double-quoted value is not valid: {exc.msg}"
                ) from None
        if not isinstance(value, str):  # json.loads of a quoted string is a string; kept for mypy
            value = str(value)
        if not _environ_safe(value):  # the host would fail starting the app with it
            raise ConfigError(
                f"{path}:{number}: {key}: a value cannot hold a NUL character or a lone "
                "surrogate (a \\u0000 or \\ud800-style escape)"
            )
        out[key] = value
    return out


def _environ_safe(value: str) -> bool:
    """Whether a process's environment can hold ``value``: no NUL, nothing UTF-8 cannot encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\0" not in value


def _from_tree(tree: Any, path: Path, prefix: str = "") -> Sections:
    if not isinstance(tree, dict):
        raise ConfigError(
            f"{path}: expected a table of sections at the top, found {type(tree).__name__}"
        )
    sections: Sections = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            name = f"{prefix}.{key}" if prefix else key
            for sub, items in _from_tree(value, path, name).items():
                sections.setdefault(sub, {}).update(items)
        elif isinstance(value, (str, int, float, bool)):
            sections.setdefault(prefix, {})[key] = value
        else:
            raise ConfigError(
                f"{path}: {prefix + '.' if prefix else ''}{key}: lists and dates are not supported in config layers"
            )
    return sections


def _plain(value: Value, reveal: bool) -> str | int | float | bool:
    if isinstance(value, Secret):
        return value.reveal() if reveal else str(value)
    return value


def _text(value: Value, reveal: bool) -> str:
    plain = _plain(value, reveal)
    if isinstance(plain, bool):
        return "true" if plain else "false"
    return str(plain)


def dump(sections: Sections, fmt: str, *, reveal: bool = False) -> str:
    """Serialise sections in a format. Secrets stay ``***`` unless ``reveal`` (host files only)."""
    if fmt == "ini":
        lines: list[str] = []
        for name, items in sections.items():
            if not items:
                continue
            lines.append(f"[{name or 'DEFAULT'}]")
            lines += [f"{key} = {_text(value, reveal)}" for key, value in items.items()]
            lines.append("")
        return "\n".join(lines)
    if fmt == "env":
        out = []
        for name, items in sections.items():
            for key, value in items.items():
                env_key = (
                    f"{name}__{key}".upper().replace(".", "__").replace("-", "_") if name else key
                )
                out.append(f"{env_key}={json.dumps(_text(value, reveal))}")
        return "\n".join(out) + "\n"
    tree: Tree = {}
    for name, items in sections.items():
        node = tree
        for part in name.split(".") if name else []:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):  # a section under a key that holds a value
                raise TypeError(f"{part!r} is a value, not a table")
            node = child
        for key, value in items.items():
            node[key] = _plain(value, reveal)
    if fmt == "json":
        return json.dumps(tree, indent=2) + "\n"
    return _dump_toml(tree)


def _dump_toml(tree: Tree, prefix: str = "") -> str:
    scalars = [
        f"{key} = {json.dumps(value) if not isinstance(value, bool) else str(value).lower()}"
        for key, value in tree.items()
        if not isinstance(value, dict)
    ]
    out = ""
    if scalars:
        out += (f"[{prefix}]\n" if prefix else "") + "\n".join(scalars) + "\n\n"
    for key, value in tree.items():
        if isinstance(value, dict):
            out += _dump_toml(value, f"{prefix}.{key}" if prefix else key)
    return out
