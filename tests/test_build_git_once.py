"""Issue 21: deploy's source check asks git about the working tree; when nothing ran since (no
gate, no task before the build) the build takes that answer rather than asking git again."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from shiplane.artifact import BuildSpec, GitInfo, _build, git_info


def _tree_app(root: Path) -> Path:
    (root / "mysite").mkdir(parents=True)
    (root / "manage.py").write_text("import mysite\n")
    (root / "mysite" / "__init__.py").write_text("")
    for argv in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "init"]):
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *argv], cwd=root, check=True
        )
    return root


def test_the_build_asks_git_itself_when_not_told(tmp_path: Path) -> None:
    root = _tree_app(tmp_path / "app")
    plan = _build._plan(BuildSpec(root, "app", None, ""), with_lock=False)
    assert plan.git_commit == git_info(root).commit
    assert plan.git_commit is not None and not plan.git_commit.endswith("-dirty")


def test_the_build_takes_what_git_said_just_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _tree_app(tmp_path / "app")
    told = git_info(root)

    def asked(project: Path) -> GitInfo:
        raise AssertionError("git was asked again")

    monkeypatch.setattr(_build, "git_info", asked)
    plan = _build._plan(BuildSpec(root, "app", None, "", git=told), with_lock=False)
    assert plan.git_commit == told.commit
