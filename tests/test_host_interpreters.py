"""The hosts' interpreters, exactly (issue 19): each host's agent reports its implementation, full
version, ABI and platform; the wheelhouse is resolved per distinct interpreter with the lock's
markers evaluated for it, checked before anything is sent, and each host installs its own target.

These are the rules without processes (wheels made here, a few bytes each); the deploys over SSH
to hosts on other Pythons are in ``tests/test_host_interpreters_ssh.py``.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import pytest

from shiplane.agent.paths import Layout
from shiplane.agent.server import hello
from shiplane.artifact import Interpreter, target_index
from shiplane.artifact._interpreters import target_of
from shiplane.artifact._manifest import FileEntry, Manifest, TargetEntry
from shiplane.artifact._wheelcheck import check_wheelhouse, refuse_gaps
from shiplane.artifact._wheelhouse import Target, _for_target
from shiplane.config.schema import DeployFile
from shiplane.errors import UsageError
from shiplane.plan import manifest_blobs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

H1 = Interpreter("3.11.2", "cpython", "cp311", "linux_x86_64", "2.36")
H2 = Interpreter("3.12.1", "cpython", "cp312", "linux_x86_64", "2.36")


def wheel(folder: Path, name: str, version: str, *requires: str, tag: str = "py3-none-any") -> Path:
    """A wheel holding only its METADATA: what the check reads."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-{tag}.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires
    )
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}-{version}.dist-info/METADATA", meta)
    return path


def test_the_agent_reports_its_whole_interpreter(tmp_path: Path) -> None:
    said = hello(Layout(tmp_path))
    assert said["python"] == ".".join(map(str, sys.version_info[:3]))
    assert said["implementation"] == "cpython"
    assert said["abi"] == "cp{}{}".format(*sys.version_info[:2])
    assert said["platform"] == "linux_x86_64"
    assert said["glibc"] and said["glibc"].startswith("2.")
    assert Interpreter.from_hello(said) is not None


def test_markers_are_evaluated_for_the_hosts_full_version() -> None:
    lock = ['async-timeout==4.0.3 ; python_full_version <= "3.11.2"', "six==1.16.0"]
    assert _for_target(lock, target_of(H1)) == ["async-timeout==4.0.3", "six==1.16.0"]
    on_later_patch = target_of(Interpreter("3.11.7", "cpython", "cp311", "linux_x86_64"))
    assert _for_target(lock, on_later_patch) == ["six==1.16.0"]
    # no full version known (the deploy file's target): any patch release may need it
    assert _for_target(lock, Target("3.11", "linux_x86_64", native=True)) == [
        "async-timeout==4.0.3",
        "six==1.16.0",
    ]


def test_a_lock_without_a_package_a_host_needs_is_a_gap_naming_it_and_its_marker(
    tmp_path: Path,
) -> None:
    house = [
        wheel(tmp_path, "redis", "5.0.1", 'async-timeout>=4.0.2; python_full_version <= "3.11.2"'),
        wheel(tmp_path, "six", "1.16.0"),
    ]
    gaps = check_wheelhouse(house, target_of(H1).to_dict())
    assert [g.package for g in gaps] == ["async-timeout"]
    assert 'python_full_version <= "3.11.2"' in gaps[0].why and "redis 5.0.1" in gaps[0].why
    assert check_wheelhouse(house, target_of(H2).to_dict()) == []
    # a target without its full version is refused only what every patch release needs
    assert check_wheelhouse(house, {"python_version": "3.11", "platform": "linux_x86_64"}) == []
    with pytest.raises(UsageError) as refused:
        refuse_gaps(gaps, H1.label, ["shl-h1"], "requirements.txt")
    message = refused.value.message
    assert "async-timeout" in message and "shl-h1" in message and "3.11.2" in message, message
    assert refused.value.exit_code == 2


def test_the_check_follows_extras_versions_and_tags(tmp_path: Path) -> None:
    house = [
        wheel(tmp_path, "uvicorn", "0.30.0", 'httptools>=0.5; extra == "standard"'),
        wheel(tmp_path, "app", "1.0", "uvicorn[standard]", "six>=2"),
        wheel(tmp_path, "six", "1.16.0"),
        wheel(tmp_path, "fast", "1.0", tag="cp312-cp312-manylinux_2_17_x86_64"),
    ]
    found = {g.package: g.why for g in check_wheelhouse(house, target_of(H1).to_dict())}
    assert set(found) == {"httptools", "six", "fast"}, found
    assert "has six 1.16.0" in found["six"]
    assert "does not run there" in found["fast"]


def test_each_host_gets_the_target_of_its_interpreter() -> None:
    targets = [target_of(H1).to_dict(), target_of(H2).to_dict()]
    assert target_index(targets, {**_hello(H2)}) == 1
    assert target_index(targets, _hello(H1)) == 0
    assert (
        target_index(targets, _hello(Interpreter("3.11.9", "cpython", "cp311", "linux_x86_64")))
        is None
    )
    # the deploy file's target (no full version) fits every patch release of its minor version
    assert target_index([{"python_version": "3.11", "platform": "linux_x86_64"}], _hello(H1)) == 0
    older_glibc = Interpreter("3.11.2", "cpython", "cp311", "linux_x86_64", "2.31")
    assert target_index(targets, _hello(older_glibc)) is None


def _hello(interp: Interpreter) -> dict[str, object]:
    return {
        "python": interp.python,
        "python_version": interp.python_version,
        "implementation": interp.implementation,
        "abi": interp.abi,
        "platform": interp.platform,
        "glibc": interp.glibc,
    }


def test_a_host_is_sent_the_wheels_of_its_own_python_only() -> None:
    def entry(name: str, sha: str) -> FileEntry:
        return FileEntry(name, sha * 64, 10)

    first = TargetEntry(target_of(H1).to_dict(), (entry("a-1-cp311-cp311-x.whl", "1"),), "d1")
    second = TargetEntry(target_of(H2).to_dict(), (entry("a-1-cp312-cp312-x.whl", "2"),), "d2")
    manifest = Manifest(
        app_name="app",
        app_version=None,
        source="tree",
        app_files=(entry("app.py", "a"),),
        dependencies=first.dependencies,
        dependency_digest="d1",
        tools=(),
        config_files=(),
        git_commit=None,
        built_at="2026-12-07T00:00:00Z",
        target=first.target,
        targets=(first, second),
    ).to_dict()
    assert {sha[0] for sha, _ in manifest_blobs(manifest, 1)} == {"a", "2"}
    assert {sha[0] for sha, _ in manifest_blobs(manifest, 0)} == {"a", "1"}
    assert Manifest.from_dict(manifest).to_dict() == manifest


BASE = """[app]
name = "x"
[stages.prod]
deploy_to = "/srv/x"
"""


def test_a_host_given_as_a_table_has_its_own_python() -> None:
    deploy = DeployFile.model_validate(
        tomllib.loads(
            BASE + 'hosts = ["h1", { host = "root@h2:2222", python = "/opt/py312/bin/python3" }]\n'
        )
    )
    stage = deploy.stages["prod"]
    assert stage.hosts == ["h1", "root@h2:2222"]
    assert stage.python_of("root@h2:2222", "python3") == "/opt/py312/bin/python3"
    assert stage.python_of("h1", "python3") == "python3"
    with pytest.raises(ValueError, match="host given as a table"):
        DeployFile.model_validate(tomllib.loads(BASE + 'hosts = [{ name = "h2" }]\n'))
    with pytest.raises(ValueError, match="not one of this stage's hosts"):
        DeployFile.model_validate(
            tomllib.loads(BASE + 'hosts = ["h1"]\nhost_python = { h9 = "python3.12" }\n')
        )


def test_hosts_given_on_the_command_line_keep_their_own_python(tmp_path: Path) -> None:
    from shiplane.config import load_project
    from shiplane.config.loader import with_overrides

    toml = tmp_path / "shiplane.toml"
    toml.write_text(
        BASE.replace('[app]\nname = "x"\n', '[app]\nname = "x"\nsource = "none"\n')
        + 'hosts = ["h1", { host = "h2", python = "/opt/py312/bin/python3" }]\n'
    )
    project = load_project(toml)
    only_h2 = with_overrides(project, "prod", "h2", ()).deploy.stages["prod"]
    assert (
        only_h2.hosts == ["h2"] and only_h2.python_of("h2", "python3") == "/opt/py312/bin/python3"
    )
    only_h1 = with_overrides(project, "prod", "h1", ()).deploy.stages["prod"]
    assert only_h1.hosts == ["h1"] and only_h1.host_python == {}


def test_an_artifact_shipped_as_it_is_is_checked_against_its_lock(tmp_path: Path) -> None:
    from packaging.requirements import Requirement

    from shiplane.artifact._wheelcheck import lock_requirements
    from shiplane.artifact._wheelhouse import read_lock

    lock = tmp_path / "requirements.txt"
    lock.write_text(
        "six==1.16.0 --hash=sha256:" + "a" * 64 + "\n"
        'async-timeout==4.0.3 ; python_full_version <= "3.11.2"\n'
        "private @ https://user:token@example.com/private-1.0.tar.gz\n"
    )
    recorded = lock_requirements(read_lock(lock))
    assert recorded == ['async-timeout==4.0.3; python_full_version <= "3.11.2"', "six==1.16.0"]
    # built on 3.11.7: no async-timeout; a 3.11.2 host needs it, by the lock's own line
    house = [wheel(tmp_path / "house", "six", "1.16.0")]
    wanted = [Requirement(r) for r in recorded]
    gaps = check_wheelhouse(house, target_of(H1).to_dict(), wanted, "the artifact")
    assert [g.why for g in gaps] == [
        (
            'the lock requires `async-timeout==4.0.3; python_full_version <= "3.11.2"`, which '
            "holds there, and the artifact has no async-timeout"
        )
    ]
    assert check_wheelhouse(house, target_of(H2).to_dict(), wanted, "the artifact") == []


def test_check_lists_each_hosts_python_when_they_differ(tmp_path: Path) -> None:
    from shiplane.commands.check import check_project
    from shiplane.ui import check_lines

    (tmp_path / "requirements.txt").write_text("six==1.16.0\n")
    toml = tmp_path / "shiplane.toml"
    toml.write_text(
        BASE.replace('[app]\nname = "x"\n', '[app]\nname = "x"\nsource = "none"\n')
        + 'hosts = ["h1", { host = "h2", python = "/opt/py312/bin/python3" }]\n'
    )
    checked = check_project(toml)
    assert checked.report["stages"]["prod"]["python"] == {
        "h1": "python3",
        "h2": "/opt/py312/bin/python3",
    }
    assert "  python: h1 python3; h2 /opt/py312/bin/python3" in check_lines(checked)
