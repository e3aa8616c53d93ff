"""Issue 19 item 8: ``deploy --ref`` builds from a commit's files, not the working tree; a dirty
tree is warned about (``--require-clean`` refuses it); the ledger records the ref and commit."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from deployhelp import edit, scaffold
from shiplane.artifact import BuildSpec, check_ref, export_ref, resolve_ref
from shiplane.artifact._build import _plan
from shiplane.artifact._gitref import extract
from shiplane.errors import UsageError

VIEWS = "src/demo/views.py"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t",
}


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **GIT_ENV},
    )
    return done.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository whose project lives in ``app/``: v1 tagged, then a second commit."""
    root = tmp_path / "repo"
    (root / "app" / "pkg").mkdir(parents=True)
    (root / "other").mkdir()
    (root / "other" / "x.txt").write_text("not the project's\n")
    (root / "app" / "pkg" / "mod.py").write_text("VERSION = 1\n")
    (root / "app" / "run.sh").write_text("#!/bin/sh\n")
    (root / "app" / "run.sh").chmod(0o755)
    os.symlink("pkg/mod.py", root / "app" / "alias.py")
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "v1")
    _git(root, "tag", "v1")
    (root / "app" / "pkg" / "mod.py").write_text("VERSION = 2\n")
    _git(root, "commit", "-qam", "v2")
    return root


def test_ref_resolution_and_refusals(repo: Path, tmp_path: Path) -> None:
    project = repo / "app"
    sha, prefix = resolve_ref(project, "v1")
    assert sha == _git(repo, "rev-parse", "v1^{commit}") and prefix == "app/"
    assert resolve_ref(project, sha[:10])[0] == sha
    assert resolve_ref(project, "HEAD~1")[0] == sha
    for bad in ("", "-v", "--output=/tmp/x", "v1\nx"):
        with pytest.raises(UsageError, match="not a git ref"):
            check_ref(bad)
    with pytest.raises(UsageError, match="no commit"):
        resolve_ref(project, "no-such-tag")
    _git(repo, "tag", "tree-tag", "HEAD^{tree}")  # a tag of a tree, not of a commit
    with pytest.raises(UsageError, match="no commit"):
        resolve_ref(project, "tree-tag")
    outside = tmp_path / "plain"
    outside.mkdir()
    with pytest.raises(UsageError, match="not in a git work tree"):
        resolve_ref(outside, "v1")


def test_export_is_the_commits_project_folder(repo: Path) -> None:
    project = repo / "app"
    (project / "pkg" / "mod.py").write_text("VERSION = 'dirty'\n")  # the working tree differs
    tree = export_ref(project, "v1", project / ".shiplane" / "build")
    assert tree.commit == _git(repo, "rev-parse", "v1")
    assert tree.files == ("alias.py", "pkg/mod.py", "run.sh")  # only the project's folder
    assert (tree.root / "pkg" / "mod.py").read_text() == "VERSION = 1\n"
    assert os.readlink(tree.root / "alias.py") == "pkg/mod.py"
    assert os.access(tree.root / "run.sh", os.X_OK)
    assert export_ref(project, "v1", project / ".shiplane" / "build") == tree  # reused
    # the build reads the app's files from the export; its commit is the ref's, clean
    spec = BuildSpec(project=project, app_name="demo", source=None, requirements="", ref_tree=tree)
    plan = _plan(spec, with_lock=False)
    assert (plan.project, plan.git_commit, plan.source) == (tree.root, tree.commit, "tree")
    assert plan.app_files == ["alias.py", "pkg/mod.py", "run.sh"]
    assert plan.file_shas["pkg/mod.py"] == hashlib.sha256(b"VERSION = 1\n").hexdigest()


def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for info, data in members:
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if info.isfile() else None)
    buffer.seek(0)
    return buffer


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, 0o644
    return info


@pytest.mark.parametrize(
    ("member", "why"),
    [
        (_member("/etc/passwd"), "not a plain relative path"),
        (_member("app/../../x"), "not a plain relative path"),
        (_member("app/./x"), "not a plain relative path"),
        (_member("elsewhere/x"), "outside app/"),
        (_member("app/dev", tarfile.CHRTYPE), "not a file, folder or symlink"),
        (_member("app/hard", tarfile.LNKTYPE, "app/x"), "not a file, folder or symlink"),
        (_member("app/fifo", tarfile.FIFOTYPE), "not a file, folder or symlink"),
        (_member("app/up", tarfile.SYMTYPE, "../../etc"), "leads out"),
        (_member("app/abs", tarfile.SYMTYPE, "/etc/passwd"), "leads out"),
        (_member("app/sub/up", tarfile.SYMTYPE, "../.."), "leads out"),
    ],
)
def test_every_archive_member_is_checked(member: tarfile.TarInfo, why: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=why):
        extract(_tar((member, b"x")), "app/", tmp_path / "out", what="test")
    assert not (tmp_path / "etc").exists()


def test_no_member_is_written_through_a_symlink(tmp_path: Path) -> None:
    archive = _tar(
        (_member("app/sub", tarfile.DIRTYPE), b""),
        (_member("app/link", tarfile.SYMTYPE, "sub"), b""),
        (_member("app/link/x"), b"x"),
    )
    with pytest.raises(UsageError, match="through a symlink"):
        extract(archive, "app/", tmp_path / "out", what="test")


def test_secrets_and_output_are_left_out(tmp_path: Path) -> None:
    archive = _tar(
        (_member("a.py"), b"A"),
        (_member(".secrets/prod"), b"S"),
        (_member(".shiplane/x"), b"O"),
        (_member("pkg/__pycache__/m.pyc"), b"C"),
        (_member("inside", tarfile.SYMTYPE, "a.py"), b""),
    )
    files = extract(archive, "", tmp_path / "out", what="test")
    assert files == ["a.py", "inside"]
    assert not (tmp_path / "out" / ".secrets").exists()


# -- end to end, on the local stage ----------------------------------------------------------------


@pytest.mark.slow
def test_deploy_ref_serves_the_tag_while_the_tree_has_other_changes(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    app = scaffold(tmp_path_factory.mktemp("ref"))  # short: supervisord's socket path has a limit
    try:
        _git(app.root, "tag", "v1")
        v1 = _git(app.root, "rev-parse", "v1")
        edit(app, VIEWS, "<footer>", "<footer>later-commit ")
        views = app.root / VIEWS
        views.write_text(views.read_text().replace("<footer>", "<footer>dirty-change ", 1))

        # a plain deploy of the dirty tree: --require-clean refuses it before anything runs
        refused = app.deploy("--require-clean", check=False)
        assert refused["exit"] == 2, refused["output"][-2000:]
        assert "uncommitted changes" in refused["output"]
        assert not app.deploy_root.joinpath("current").exists()  # nothing was sent
        assert not (app.root / ".shiplane" / "history" / "local.jsonl").exists()

        shipped = app.deploy("--ref", "v1")
        status, body = app.get("/")
        assert status == 200
        assert "later-commit" not in body and "dirty-change" not in body
        assert f"release {shipped['release']}" in body
        assert shipped["git_commit"] == v1 and shipped["ref"] == "v1"
        assert "uncommitted changes" not in shipped["output"]  # --ref ignores the tree
        ledger = (app.root / ".shiplane" / "history" / "local.jsonl").read_text().splitlines()
        last = json.loads(ledger[-1])
        assert (last["ref"], last["git_commit"], last["outcome"]) == ("v1", v1, "ok")
        hosts = app.shiplane("history", "--stage", "local", "--json", check=True).stdout
        assert '"ref": "v1"' in hosts

        # a plain deploy ships the dirty tree, and says so (without -v)
        plain = app.shiplane("deploy", "--stage", "local", "--skip-tests", check=True)
        assert "the working tree has uncommitted changes" in plain.stdout + plain.stderr
        status, body = app.get("/")
        assert "dirty-change" in body and "later-commit" in body

        # the test gate runs the commit's tests: a failing test left in the tree is not v1's
        broken = app.root / "tests" / "test_broken_in_tree.py"
        broken.write_text("def test_not_committed():\n    assert False\n")
        gated = app.shiplane("deploy", "--stage", "local", "--ref", "v1")
        assert gated.returncode == 0, (gated.stdout + gated.stderr)[-2000:]
        broken.unlink()

        bad = app.deploy("--ref", "no-such-tag", check=False)
        assert bad["exit"] == 2 and "no commit" in bad["output"]

        # a commit builds one artifact, from --ref or from a clean checkout of it
        _git(app.root, "checkout", "--", VIEWS)
        head = app.deploy("--ref", "HEAD")
        built = json.loads(app.shiplane("build", "--json", check=True).stdout.splitlines()[-1])
        assert built["result"]["digest"] == head["artifact"]
        assert head["git_commit"] == _git(app.root, "rev-parse", "HEAD")
    finally:
        app.stop()
