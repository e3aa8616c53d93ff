"""The direction of the house, checked: the agent is stdlib-only and imports nothing of the
controller; planning does no I/O; nothing below the CLI prints."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "shiplane"


def imports(path: Path) -> list[tuple[str, int]]:
    """(module, level) of every import in a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.module or "", node.level))
    return out


def test_agent_is_stdlib_only_and_self_contained() -> None:
    # supervisor: an optional fallback import, guarded, when tools/ holds no shipped copy
    stdlib = set(sys.stdlib_module_names) | {"__future__", "supervisor"}
    for path in (SRC / "agent").glob("*.py"):
        # preboot.py is the one file the release venv's Python runs: it is gunicorn's launcher
        allowed = stdlib | ({"gunicorn"} if path.name == "preboot.py" else set())
        for module, level in imports(path):
            if level:
                continue  # relative: inside the agent
            assert module.split(".")[0] in allowed, f"{path.name} imports {module}: the agent runs on the hosts' bare Python"


def test_plan_does_no_io() -> None:
    banned = {"subprocess", "socket", "shutil", "pathlib", "urllib", "http"}
    for module, _ in imports(SRC / "plan.py"):
        assert module.split(".")[0] not in banned, f"plan.py imports {module}"
        assert not module.startswith(("shiplane.transport", "shiplane.fleet", "shiplane.commands"))
    tree = ast.parse((SRC / "plan.py").read_text())
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert "open" not in calls and "print" not in calls


def test_nothing_below_the_cli_prints() -> None:
    for path in SRC.rglob("*.py"):
        if path.name == "cli.py" or "scaffold/template" in str(path):
            continue
        tree = ast.parse(path.read_text())
        prints = [n.lineno for n in ast.walk(tree)
                  if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"]
        assert not prints, f"{path.relative_to(SRC)} prints at lines {prints}; emit events instead"
