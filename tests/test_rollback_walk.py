"""Repeated rollbacks walk back in time, as Capistrano's do: each marks the release it leaves
``rolled-back`` on every host, and a later plain ``rollback`` skips it (``--to`` may still pick it).

On the ``local`` stage, and on three real OpenSSH hosts (stage ``fleet`` of the scaffold app).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from deployhelp import Project, edit, scaffold
from shiplane.commands.operate import _pick_target
from shiplane.errors import UsageError
from sshhosts import TestHosts
from test_fleet_ssh import MIGRATE, _stages, current, deploy, page

VIEWS = "src/demo/views.py"


A, B, C, D = (f"20260101T00000{n}000Z-0000000{n}" for n in range(1, 5))


def hosts_with(current: dict[str, str | None], **states: str) -> dict[str, Any]:
    """``releases`` results: every host has A..D in the given states, live where ``current`` says."""
    ids = {"a": A, "b": B, "c": C, "d": D}
    releases = [
        {
            "release_id": ids[k],
            "state": v,
            **({"rolled_back_at": "2026-01-02T03:04:05Z"} if v == "rolled-back" else {}),
        }
        for k, v in sorted(states.items())
    ]
    return {host: {"current": rid, "releases": releases} for host, rid in current.items()}


def test_a_plain_rollback_skips_releases_rolled_back_from_and_says_when() -> None:
    per_host = hosts_with({"h1": D, "h2": D}, a="good", b="bad", c="rolled-back", d="live")
    target, live, skipped = _pick_target(per_host, None)
    assert (target, live) == (A, {"h1": D, "h2": D})
    assert skipped == [
        (C, "rolled back from at 2026-01-02T03:04:05Z"),
        (B, "marked bad (its deploy failed or was undone)"),
    ]
    assert _pick_target(per_host, C)[0] == C  # named explicitly, it may still be chosen


def test_a_rollback_never_goes_forward_past_the_live_release() -> None:
    per_host = hosts_with({"h1": B, "h2": B}, a="good", b="live", c="good", d="good")
    assert _pick_target(per_host, None)[0] == A


def test_hosts_serving_different_releases_need_to() -> None:
    # a rollback that failed on h2: h1 serves B, h2 still C; "the live release" is not one release
    per_host = hosts_with({"h1": B, "h2": C}, a="good", b="live", c="rolled-back")
    with pytest.raises(UsageError) as refused:
        _pick_target(per_host, None)
    assert "h1 " + B in str(refused.value) and "h2 " + C in str(refused.value)
    assert refused.value.exit_code == 2 and "--to" in str(refused.value.hint)
    assert _pick_target(per_host, B)[:2] == (B, {"h1": B, "h2": C})


def rollback(project: Project, stage: str, *extra: str) -> dict[str, Any]:
    done = project.shiplane("rollback", "--stage", stage, "--yes", "--json", *extra)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])["result"]
    return result


def read(project: Project, verb: str, stage: str) -> dict[str, Any]:
    done = project.shiplane(verb, "--stage", stage, "--json", check=True)
    result: dict[str, Any] = json.loads(done.stdout)["result"]
    return result


def states(project: Project, stage: str) -> dict[str, dict[str, str]]:
    """Per host: release id -> its state, as ``shiplane releases`` reports them."""
    hosts = read(project, "releases", stage)["hosts"]
    return {
        host: {r["release_id"]: r.get("state") for r in result["releases"]}
        for host, result in hosts.items()
    }


def web_pids(project: Project, stage: str) -> dict[str, dict[str, int]]:
    """Per host: release id -> the pid of its running web server (live or standby)."""
    hosts = read(project, "status", stage)["hosts"]
    return {
        host: {
            s["release"]: s["pid"]
            for s in result["services"]
            if s.get("name") == "web"
            and s.get("release")
            and s.get("state") == "RUNNING"
            and not s.get("preboot")
        }
        for host, result in hosts.items()
    }


def three_releases(project: Project, stage: str) -> list[str]:
    ids = []
    for label in ("walk-a", "walk-b", "walk-c"):
        edit(project, VIEWS, "<footer>", f"<footer>{label} ")
        ids.append(deploy(project, stage)["release"])
    return ids


def walk(project: Project, stage: str) -> tuple[str, str, str]:
    """Three releases A, B, C; ``rollback`` twice walks C -> B -> A, each leaving a mark."""
    a, b, c = three_releases(project, stage)
    standby = web_pids(project, stage)
    first = rollback(project, stage)
    assert (first["release"], first["from"]) == (b, c)
    # B's server was C's standby: the rollback switched to it, it did not start another
    after = web_pids(project, stage)
    for host, pids in standby.items():
        assert after[host].get(b) == pids[b], (host, standby, after)
    second = rollback(project, stage)
    assert (second["release"], second["from"]) == (a, b), second  # back in time, not forth to C
    marks = states(project, stage)
    for host, seen in marks.items():
        assert seen[a] == "live", (host, seen)
        assert seen[b] == seen[c] == "rolled-back", (host, seen)
    text = project.shiplane("releases", "--stage", stage, check=True).stdout
    assert sum("rolled-back" in line for line in text.splitlines()) == 2 * len(marks), text
    return a, b, c


@pytest.mark.slow
def test_rollbacks_walk_back_on_the_local_stage(tmp_path_factory: pytest.TempPathFactory) -> None:
    project = scaffold(tmp_path_factory.mktemp("walk"))
    try:
        a, b, c = walk(project, "local")
        assert project.current() == a
        # nothing older is left: a third plain rollback says so (and never goes forth to B or C)
        refused = project.shiplane("rollback", "--stage", "local", "--yes")
        assert refused.returncode == 2 and "no earlier good release" in refused.stderr, (
            refused.stdout + refused.stderr
        )
        assert project.current() == a
        # --to may still choose a release rolled back from; going forward marks nothing
        forward = rollback(project, "local", "--to", c)
        assert (forward["release"], project.current()) == (c, c)
        assert f"release {c}" in project.get("/")[1]
        seen = states(project, "local")["local"]
        assert (seen[a], seen[b], seen[c]) == ("previous", "rolled-back", "live"), seen
        # from C, a plain rollback skips B (rolled back from) and says why; A, C's standby since
        # the switch to C, takes the traffic again without a new server
        standby = web_pids(project, "local")["local"][a]
        back = rollback(project, "local")
        assert back["release"] == a and web_pids(project, "local")["local"][a] == standby
        skipped = dict(back["skipped"])
        assert list(skipped) == [b] and skipped[b].startswith("rolled back from at 20"), skipped
        text = project.shiplane("rollback", "--stage", "local", "--to", c, "--yes").stdout
        assert f"rolled back stage local to {c}" in text
        text = project.shiplane("rollback", "--stage", "local", "--yes").stdout
        assert f"skipped {b}: rolled back from at " in text, text
    finally:
        project.stop()


# --- three SSH hosts ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fleet(ssh_hosts: TestHosts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    """The scaffold app with stage ``fleet`` on the three test hosts (as tests/test_fleet_ssh.py's)."""
    project = scaffold(tmp_path_factory.mktemp("walkfleet"))
    toml = project.root / "shiplane.toml"
    text = toml.read_text().replace(
        'release = "alembic upgrade head"', f'release = "alembic upgrade head"\n{MIGRATE}'
    )
    toml.write_text(text[: text.index("[stages.staging]")] + _stages(ssh_hosts.ssh_config))
    secrets = project.root / ".secrets" / "fleet.env"
    secrets.write_text("SECRET_KEY=walk-test-secret-value\n")
    secrets.chmod(0o600)
    project.commit("stage fleet on the test hosts")
    try:
        yield project
    finally:
        project.shiplane("stop", "--all", "--stage", "fleet", timeout=120)


@pytest.mark.slow
@pytest.mark.ssh
def test_rollbacks_walk_back_on_three_ssh_hosts(fleet: Project, ssh_hosts: TestHosts) -> None:
    a, b, c = walk(fleet, "fleet")
    for host in ssh_hosts.hosts:
        assert current(host) == a and f"release {a}" in page(host)
    forward = rollback(fleet, "fleet", "--to", c)
    assert forward["release"] == c
    for host in ssh_hosts.hosts:
        assert current(host) == c and f"release {c}" in page(host)
    standby = web_pids(fleet, "fleet")
    back = rollback(fleet, "fleet")
    assert back["release"] == a and [rid for rid, _ in back["skipped"]] == [b]
    after = web_pids(fleet, "fleet")
    for host in ssh_hosts.hosts:
        assert current(host) == a and after[host.name][a] == standby[host.name][a]
