"""The controller <-> agent contract (``shiplane.agent.protocol``): the requests the controller
builds are pinned in golden files (as Kamal's command tests pin each command without a server),
every one of them passes the agent's own check, and docs/DESIGN.md's op table is current.

Regenerate after an intended change: ``SHIPLANE_GOLDEN=write python -m pytest tests/test_protocol.py``
(then read the diff: it is the wire change every agent sees), and
``python -m shiplane.agent.protocol`` for the DESIGN table."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from shiplane.agent import AgentError, protocol
from shiplane.config.layers import Layered, Rendered
from shiplane.plan import install_request, services_spec
from test_plan import deploy_file

GOLDEN = Path(__file__).parent / "golden"
DESIGN = Path(__file__).parent.parent / "docs" / "DESIGN.md"
RID = "20261204T120000000Z-0123abcd"
MANIFEST = {
    "digest": "ab" * 32,
    "dependency_digest": "cd" * 32,
    "app": {"name": "shop", "source": "package"},
    "app_files": [],
    "wheels": [],
    "tools": [],
}


def requests() -> dict[str, tuple[str, dict[str, Any]]]:
    """What the controller sends, for the test deploy file's prod stage."""
    deploy = deploy_file()
    layered = Layered("prod", config={"app": {"title": "Shop"}}, env={"LOG_LEVEL": "info"})
    rendered = [Rendered("config/app.ini", "[app]\ntitle = Shop\n", 0o644, False)]
    return {
        "install": ("install", install_request(deploy, "prod", RID, MANIFEST, layered, rendered)),
        "switch": ("switch", {"release_id": RID, "services": services_spec(deploy, "prod")}),
    }


@pytest.mark.parametrize("name", sorted(requests()))
def test_the_wire_form_of_each_request_is_pinned(name: str) -> None:
    op, args = requests()[name]
    path = GOLDEN / f"{name}.json"
    text = json.dumps({"op": op, "args": args}, indent=2, sort_keys=True) + "\n"
    if os.environ.get("SHIPLANE_GOLDEN") == "write":
        path.write_text(text)
    assert path.read_text() == text, (
        f"{path.name} changed: the agent sees another request (see the module doc)"
    )
    protocol.decode(op, args)  # and the agent accepts it


def test_the_agent_refuses_what_the_protocol_does_not_know() -> None:
    with pytest.raises(AgentError, match="unknown op 'instal'"):
        protocol.decode("instal", {})
    with pytest.raises(AgentError, match=r"install: unknown field\(s\) relase_id"):
        protocol.decode("install", {"relase_id": RID, "manifest": {}})
    with pytest.raises(AgentError, match="lock: field wait must be number, found str"):
        protocol.decode("lock", {"holder": {}, "wait": "10"})
    with pytest.raises(AgentError, match="prune: field keep must be integer, found bool"):
        protocol.decode("prune", {"keep": True})
    assert protocol.decode("prune", {}) == {"keep": 5}  # defaults filled in


def test_design_doc_op_table_is_current() -> None:
    text = DESIGN.read_text()
    found = re.search(r"<!-- ops:begin -->\n(.*?)<!-- ops:end -->", text, re.DOTALL)
    assert found, "docs/DESIGN.md lacks the <!-- ops:begin --> ... <!-- ops:end --> table"
    assert found.group(1) == protocol.markdown(), (
        "docs/DESIGN.md's op table is stale: paste `python -m shiplane.agent.protocol` between its markers"
    )


# JSON type of a field -> what its TypedDict annotation must name (a string: the agent's modules
# keep ``from __future__ import annotations``)
_ANNOTATION = {
    "string": "str",
    "integer": "int",
    "number": "float",
    "boolean": "bool",
    "array": "list",
    "object": "",  # a TypedDict or dict[...]: any name
}


@pytest.mark.parametrize("name", sorted(protocol.OPS))
def test_each_op_has_a_request_typeddict_with_exactly_its_fields(name: str) -> None:
    assert set(protocol.REQUESTS) == set(protocol.OPS), "REQUESTS and OPS list other ops"
    request = protocol.REQUESTS[name]
    fields = {f.name: f for f in protocol.OPS[name].fields}
    assert set(request.__annotations__) == set(fields), (
        f"{request.__name__} has keys {sorted(request.__annotations__)}, "
        f"the op {name} the fields {sorted(fields)}"
    )
    # decoded, every field is there (defaults filled in): no key may be left out
    assert request.__required_keys__ == frozenset(fields)  # type: ignore[attr-defined]
    for field in fields.values():
        annotation = str(request.__annotations__[field.name])
        for kind in field.type.split("|"):
            wanted = "None" if kind == "null" else _ANNOTATION[kind]
            assert wanted in annotation, (
                f"{request.__name__}.{field.name} is {annotation}: the field is {field.type}"
            )
        if "null" not in field.type:
            assert "None" not in annotation, f"{request.__name__}.{field.name} may not be None"


@pytest.mark.parametrize("name", sorted(protocol.OPS))
def test_each_op_has_a_handler_taking_its_request(name: str) -> None:
    from shiplane.agent import server

    assert set(server.HANDLERS) == set(protocol.OPS), "the agent serves other ops than OPS"
    handler = server.HANDLERS[name]
    # annotations are strings (``from __future__ import annotations``): compare by name
    assert handler.__annotations__["args"] == protocol.REQUESTS[name].__name__, (
        f"the {name} handler takes {handler.__annotations__['args']}, "
        f"not {protocol.REQUESTS[name].__name__}"
    )
