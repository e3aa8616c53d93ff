"""When the release hook may be skipped: the digest of what it depends on (release_inputs.py)."""

from __future__ import annotations

from pathlib import Path

from shiplane.config.layers import Layered
from shiplane.release_inputs import inputs_digest, last_inputs

PATTERNS = ["alembic.ini", "db/**"]


def _project(tmp_path: Path) -> Path:
    (tmp_path / "db" / "versions").mkdir(parents=True)
    (tmp_path / "db" / "versions" / "0001_init.py").write_text("revision = '0001'\n")
    (tmp_path / "alembic.ini").write_text("[alembic]\n")
    (tmp_path / "app.py").write_text("print('hi')\n")
    return tmp_path


def _layered(**config: str) -> Layered:
    layered = Layered(stage="prod")
    for key, value in config.items():
        layered.set("app", key, value, "test")
    return layered


def test_the_digest_moves_with_migrations_config_and_commands_but_not_with_code(
    tmp_path: Path,
) -> None:
    root = _project(tmp_path)
    commands = ["alembic upgrade head"]
    base = inputs_digest(root, PATTERNS, commands, _layered(db="sqlite:///a"))
    (root / "app.py").write_text("print('changed')\n")
    assert inputs_digest(root, PATTERNS, commands, _layered(db="sqlite:///a")) == base
    assert inputs_digest(root, PATTERNS, commands, _layered(db="sqlite:///b")) != base
    assert (
        inputs_digest(root, PATTERNS, ["alembic upgrade head", "seed"], _layered(db="sqlite:///a"))
        != base
    )
    (root / "db" / "versions" / "0002_more.py").write_text("revision = '0002'\n")
    assert inputs_digest(root, PATTERNS, commands, _layered(db="sqlite:///a")) != base


def test_a_renamed_migration_changes_the_digest(tmp_path: Path) -> None:
    root = _project(tmp_path)
    before = inputs_digest(root, PATTERNS, [], _layered())
    (root / "db" / "versions" / "0001_init.py").rename(root / "db" / "versions" / "0001_first.py")
    assert inputs_digest(root, PATTERNS, [], _layered()) != before


def test_the_newest_recorded_run_counts_and_a_failed_one_never_matches() -> None:
    assert last_inputs([]) is None
    entries = [
        {"release_inputs": "a"},
        {"event": "rollback"},
        {"release_inputs": "b"},
        {"outcome": "failed"},
    ]
    assert last_inputs(entries) == "b"
    assert last_inputs([*entries, {"release_inputs": None}]) is None  # a hook that failed part-way
