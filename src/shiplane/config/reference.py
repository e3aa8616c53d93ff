"""The deploy-file reference (``docs/reference.md``), generated from the schema.

Every key of ``shiplane.toml`` with its type, default, allowed values and description, read
from the pydantic models in ``schema.py`` (their docstrings and ``Field(description=...)``), so
the reference cannot drift from what ``shiplane check`` accepts. Regenerate it with::

    python -m shiplane.config.reference > docs/reference.md
"""

from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from shiplane.config.schema import ENV_NAME, NAME, PERCENT, DeployFile

COMMAND = "python -m shiplane.config.reference > docs/reference.md"

# patterns the schema uses often, in words (any other is shown as the regular expression)
PATTERN_WORDS = {
    NAME: "a name: a letter or `_`, then letters, digits, `_`, `-`",
    ENV_NAME: "an environment variable name: a letter or `_`, then letters, digits, `_`",
    PERCENT: "a percentage, `0%` to `100%`",
    r"^/": "a path starting with `/`",
    r"^3\.[0-9]{1,2}$": "`3.N`",
}


@dataclass(frozen=True)
class Section:
    """One table of the deploy file: its TOML header, its model, and whether it is an array."""

    path: str
    model: type[BaseModel]
    array: bool = False
    key_rule: str = ""  # what the NAME of a ``[x.NAME]`` table may be

    @property
    def header(self) -> str:
        return f"[[{self.path}]]" if self.array else f"[{self.path}]"


def reference_markdown() -> str:
    """The whole reference as Markdown: an index of the top-level tables, then one section per
    table (nested ones included), each key with its type, default, allowed values and description."""
    out = [
        "# shiplane.toml reference",
        "",
        f"Generated from `src/shiplane/config/schema.py` by `{COMMAND}`; do not edit by hand.",
        "",
        "Every key of the deploy file, table by table. Unknown keys are errors everywhere, and",
        "`shiplane check` validates a file offline, naming the file, line and key of each error.",
        '"unset" means the key may be left out, and the description says what happens then.',
        "",
        "## Top level",
        "",
        "| Table | Default | Description |",
        "|---|---|---|",
    ]
    for name, field in DeployFile.model_fields.items():
        target = _table_model(field.annotation)
        doc = _doc(target) if target is not None else ""
        described = _clean(field.description or doc)
        header = f"[{name}]" if not _is_dict_of_models(field.annotation) else f"[{name}.NAME]"
        out.append(f"| `{header}` | {_default(field)} | {_cell(described)} |")
    for section in _sections(DeployFile, ""):
        out += ["", f"## `{section.header}`", ""]
        doc = _doc(section.model)
        if doc:
            out += [_clean(doc), ""]
        if section.key_rule:
            out += [f"`NAME`: {section.key_rule}.", ""]
        out += ["| Key | Type | Default | Allowed | Description |", "|---|---|---|---|---|"]
        for name, field in section.model.model_fields.items():
            out.append(_row(section, name, field))
    return "\n".join(out) + "\n"


# --- walking the models ---------------------------------------------------------------------


def _sections(model: type[BaseModel], prefix: str) -> Iterator[Section]:
    """Each table below ``model``, depth first, in the order of the model's fields."""
    for name, field in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        annotation = field.annotation
        if _is_dict_of_models(annotation):
            key, value = typing.get_args(annotation)
            section = Section(f"{path}.NAME", value, key_rule=_rules(_constraints(key)))
        else:
            found = _table_model(annotation)
            if found is None:
                continue
            section = Section(path, found, array=_is_list_of_models(annotation))
        yield section
        yield from _sections(section.model, section.path)


def _members(tp: Any) -> list[Any]:
    """The types of a union (``X | None`` included), without None; ``[tp]`` for any other type."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [m for m in typing.get_args(tp) if m is not type(None)]
    return [tp]


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _is_dict_of_models(tp: Any) -> bool:
    return typing.get_origin(tp) is dict and _is_model(typing.get_args(tp)[1])


def _is_list_of_models(tp: Any) -> bool:
    return any(
        typing.get_origin(m) is list and _is_model(typing.get_args(m)[0]) for m in _members(tp)
    )


def _table_model(tp: Any) -> type[BaseModel] | None:
    """The model of a table-valued field: ``Model``, ``Model | None``, ``list[Model]`` (an array
    of tables), ``dict[str, Model]``; None for a plain value."""
    for member in _members(tp):
        if _is_model(member):
            return typing.cast("type[BaseModel]", member)
        if typing.get_origin(member) in (list, dict) and _is_model(typing.get_args(member)[-1]):
            return typing.cast("type[BaseModel]", typing.get_args(member)[-1])
    return None


def _doc(model: type[BaseModel]) -> str:
    """A model's docstring without a leading ``[table]``: (the heading already names it)."""
    doc = " ".join((model.__doc__ or "").split())
    stripped = re.sub(r"^``[^`]+``:\s*", "", doc)
    return stripped[:1].upper() + stripped[1:] if stripped != doc else doc


# --- one row --------------------------------------------------------------------------------


def _row(section: Section, name: str, field: FieldInfo) -> str:
    annotation = field.annotation
    allowed = [_rules(field.metadata)] if field.metadata else []
    table = _table_model(annotation)
    if table is not None:
        kind = _type(annotation)
        under = f"{section.path}.{name}" + (".NAME" if _is_dict_of_models(annotation) else "")
        header = f"[[{under}]]" if _is_list_of_models(annotation) else f"[{under}]"
        allowed.append(f"see `{header}`")
    else:
        kind = _type(annotation)
    allowed += _allowed(annotation)
    description = _clean(field.description or "")
    return (
        f"| `{name}` | {_cell(kind)} | {_default(field)} | {_cell('; '.join(a for a in allowed if a))} "
        f"| {_cell(description)} |"
    )


def _strip(tp: Any) -> tuple[Any, list[Any]]:
    """``Annotated[T, Field(...)]`` -> (T, its constraints); any other type -> (tp, [])."""
    if typing.get_origin(tp) is Annotated:
        inner, *extra = typing.get_args(tp)
        return inner, _constraints(tp) if extra else []
    return tp, []


def _constraints(tp: Any) -> list[Any]:
    """The constraint objects of an ``Annotated`` type's ``Field``s."""
    found: list[Any] = []
    if typing.get_origin(tp) is Annotated:
        for extra in typing.get_args(tp)[1:]:
            found += extra.metadata if isinstance(extra, FieldInfo) else [extra]
    return found


def _type(tp: Any) -> str:
    """A type in TOML's words: string, integer, number, boolean, array of ..., table."""
    names = []
    for member in _members(tp):
        inner, _ = _strip(member)
        origin = typing.get_origin(inner)
        if _is_model(inner):
            names.append("table")
        elif origin is Literal:
            kinds = {type(v) for v in typing.get_args(inner)}
            names.append("string" if kinds == {str} else "value")
        elif origin is list:
            item = typing.get_args(inner)[0]
            names.append(f"array of {'tables' if _is_model(item) else _plural(_type(item))}")
        elif origin is dict:
            value = typing.get_args(inner)[1]
            names.append(
                "table of tables"
                if _is_model(value) or typing.get_origin(value) is dict
                else f"table of {_plural(_type(value))}"
            )
        else:
            names.append(
                {str: "string", int: "integer", float: "number", bool: "boolean"}.get(
                    inner, str(inner)
                )
            )
    unique = list(dict.fromkeys(names))
    return " or ".join(unique)


def _plural(kind: str) -> str:
    """``string`` -> ``strings``, ``array of strings`` -> ``arrays of strings``."""
    head, sep, rest = kind.partition(" of ")
    return f"{head}s{sep}{rest}" if sep else " or ".join(k + "s" for k in kind.split(" or "))


def _allowed(tp: Any) -> list[str]:
    """Allowed values and ranges that live inside the type (literals, per-member constraints,
    constraints on array items and table keys)."""
    out: list[str] = []
    members = _members(tp)
    for member in members:
        inner, constraints = _strip(member)
        origin = typing.get_origin(inner)
        words = _rules(constraints)
        if origin is Literal:
            out.append("one of " + ", ".join(f"`{_toml(v)}`" for v in typing.get_args(inner)))
        elif words and len(members) > 1:
            out.append(f"{_type(inner)}: {words}")
        elif words:
            out.append(words)
        if origin is list:
            item_rules = _rules(_constraints(typing.get_args(inner)[0]))
            if item_rules:
                out.append(f"each: {item_rules}")
        if origin is dict:
            key_rules = _rules(_constraints(typing.get_args(inner)[0]))
            if key_rules:
                out.append(f"keys: {key_rules}")
    return out


def _rules(constraints: list[Any]) -> str:
    """Constraints in words: ``1 to 256``, ``> 0, at most 600``, a pattern, a minimum length."""
    low = high = ""
    words: list[str] = []
    for c in constraints:
        if isinstance(c, annotated_types.Ge):
            low = f"{_num(c.ge)}"
        elif isinstance(c, annotated_types.Gt):
            low = f"> {_num(c.gt)}"
        elif isinstance(c, annotated_types.Le):
            high = f"{_num(c.le)}"
        elif isinstance(c, annotated_types.Lt):
            high = f"< {_num(c.lt)}"
        elif isinstance(c, annotated_types.MinLen):
            words.append(f"at least {c.min_length} entr{'y' if c.min_length == 1 else 'ies'}")
        elif getattr(c, "pattern", None):
            words.append(PATTERN_WORDS.get(c.pattern, f"matching `{c.pattern}`"))
    if low and high:
        words.insert(0, f"{low} to {high}" if not low.startswith(">") else f"{low}, at most {high}")
    elif low:
        words.insert(0, low if low.startswith(">") else f"at least {low}")
    elif high:
        words.insert(0, f"at most {high}")
    return ", ".join(words)


# --- values as they are written in TOML -----------------------------------------------------


def _num(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return _num(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
            if value
            else "{}"
        )
    return str(value)


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None or value is PydanticUndefined:
        return "unset"
    if isinstance(value, BaseModel):
        return "its keys' defaults"
    return f"`{_toml(value)}`"


def _clean(text: str) -> str:
    """reST literals (````x````) as Markdown code, on one line."""
    return " ".join(text.replace("``", "`").split())


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|")


if __name__ == "__main__":
    print(reference_markdown(), end="")
