"""The user guide in docs/: the deploy-file reference is the generator's output for today's
schema (regenerate it when the schema changes), every key says what it is, and the guide's
links between its pages lead somewhere."""

from __future__ import annotations

import re
import typing
from pathlib import Path

from pydantic import BaseModel

from shiplane.config.reference import COMMAND, reference_markdown
from shiplane.config.schema import DeployFile

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_reference_is_up_to_date() -> None:
    on_disk = (DOCS / "reference.md").read_text()
    assert on_disk == reference_markdown(), (
        f"docs/reference.md is stale: the schema changed. Regenerate it from the repository root with:\n"
        f"    {COMMAND}"
    )


def _models(model: type[BaseModel], seen: set[type[BaseModel]]) -> None:
    seen.add(model)
    for field in model.model_fields.values():
        stack = [field.annotation]
        while stack:
            tp = stack.pop()
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                if tp not in seen:
                    _models(tp, seen)
            else:
                stack += typing.get_args(tp)


def test_every_key_says_what_it_is() -> None:
    """A new key of the deploy file comes with its one-sentence description, or its table with a
    docstring, so the reference never shows an empty cell."""
    models: set[type[BaseModel]] = set()
    _models(DeployFile, models)
    missing = [
        f"{m.__name__}.{name}"
        for m in models
        for name, field in m.model_fields.items()
        if not field.description and not (m is DeployFile and name != "env")
    ]
    undocumented = [m.__name__ for m in models if not m.__doc__]
    assert not missing, (
        f"add Field(description=...) in src/shiplane/config/schema.py to: {', '.join(sorted(missing))}"
    )
    assert not undocumented, f"add a docstring to: {', '.join(sorted(undocumented))}"
    text = reference_markdown()
    for m in models - {DeployFile}:
        for name in m.model_fields:
            assert f"| `{name}` |" in text, name


def test_guide_links_lead_somewhere() -> None:
    """Links between the guide's pages (and to files of the repository) resolve, and the guide
    stands alone: it links to no document outside the repository."""
    broken = []
    for page in DOCS.glob("*.md"):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or not (page.parent / target).exists():
                broken.append(f"{page.name} -> {target}")
    assert not broken, broken
