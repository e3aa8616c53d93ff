"""The direction of the house (README's Design section), checked: the agent is stdlib-only and
imports nothing of the controller; a package's private modules are its own; planning does no
I/O; nothing below the CLI prints."""

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
            assert module.split(".")[0] in allowed, (
                f"{path.name} imports {module}: the agent runs on the hosts' bare Python"
            )


def module_name(path: Path) -> str:
    """The dotted name of a file under src/ (a package's ``__init__.py`` is the package)."""
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolved_imports(path: Path) -> list[tuple[str, int]]:
    """(absolute dotted name, line) of everything a file imports: modules, and for ``from X import
    a`` also ``X.a`` (a submodule or a name, the same privacy either way)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            out.append((module, node.lineno))
            out += [(f"{module}.{alias.name}", node.lineno) for alias in node.names]
    return out


def test_the_agent_imports_nothing_of_the_controller() -> None:
    # the agent ships alone (a zipapp of agent/*.py): shiplane.* outside it does not exist on a host
    for path in (SRC / "agent").rglob("*.py"):
        for module, line in resolved_imports(path):
            if module.split(".")[0] == "shiplane":
                assert module.startswith("shiplane.agent"), (
                    f"agent/{path.relative_to(SRC / 'agent')}:{line} imports {module}: the agent is shipped alone"
                )


def test_no_module_imports_another_packages_private_module() -> None:
    for path in SRC.rglob("*.py"):
        if "scaffold/template" in path.as_posix():
            continue
        importer = module_name(path)
        for module, line in resolved_imports(path):
            parts = module.split(".")
            if parts[0] != "shiplane":
                continue
            private = next(
                (
                    i
                    for i, part in enumerate(parts)
                    if part.startswith("_") and not part.startswith("__")
                ),
                None,
            )
            if private is None:
                continue
            owner = parts[
                :private
            ]  # the package holding a private module, or a module's own package
            if not (SRC.parent.joinpath(*owner)).is_dir():
                owner = owner[:-1]
            owner_name = ".".join(owner)
            assert importer == owner_name or importer.startswith(owner_name + "."), (
                f"{path.relative_to(SRC)}:{line} imports {module}, private to {owner_name}"
            )


def test_plan_does_no_io() -> None:
    banned = {"subprocess", "socket", "shutil", "pathlib", "urllib", "http", "os", "io", "tempfile"}
    for module, _ in imports(SRC / "plan.py"):
        assert module.split(".")[0] not in banned, f"plan.py imports {module}"
        assert not module.startswith(("shiplane.transport", "shiplane.fleet", "shiplane.commands"))
    tree = ast.parse((SRC / "plan.py").read_text())
    calls = {
        n.func.id
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    }
    assert "open" not in calls and "print" not in calls
    # a Path or file handed in is still I/O: no .open(), .read_*(), .write_*() on anything
    methods = {
        (n.func.attr, n.lineno)
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
    }
    io_calls = sorted(
        (name, line)
        for name, line in methods
        if name in {"open", "mkdir", "unlink", "iterdir", "glob", "rglob", "exists"}
        or name.startswith(("read_", "write_"))
    )
    assert not io_calls, f"plan.py does I/O: {io_calls}"


def test_nothing_below_the_cli_prints() -> None:
    for path in SRC.rglob("*.py"):
        if path.name == "cli.py" or "scaffold/template" in str(path):
            continue
        tree = ast.parse(path.read_text())
        # a module's own `if __name__ == "__main__":` (a generator run by hand) may print
        body = [node for node in tree.body if not _is_main_guard(node)]
        prints = [
            n.lineno
            for top in body
            for n in ast.walk(top)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"
        ]
        assert not prints, f"{path.relative_to(SRC)} prints at lines {prints}; emit events instead"


def _is_main_guard(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )
