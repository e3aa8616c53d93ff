"""The deploy's blob relay (commands/relay.py), fast: the real ``run_deploy`` of the scaffold app
(its real wheelhouse) to four fake hosts (tests/fakehosts.py), whose fake ``serve_blobs`` and
``fetch_blobs`` hand blobs from one in-memory store to another. What each host received from the
controller and from its peers is read from the copy events, as ``--json`` prints them;
``test_relay_ssh.py`` moves the bytes between real hosts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import test_fleet_fast as fleet_fast
from fakehosts import FakeError, FakeHosts
from shiplane.commands.deploy import run_deploy
from shiplane.commands.deployment import DeployOptions
from shiplane.events import Event
from shiplane.secret import Masker
from shiplane.transfer import MIN_PEER_BLOB

FLEET = fleet_fast.FLEET
# its fixtures: the scaffold app built once, a test's own copy of it, the fake hosts
built, artifact, app, hosts = (
    fleet_fast.built,
    fleet_fast.artifact,
    fleet_fast.app,
    fleet_fast.hosts,
)

SERVE_FAILS = "cannot listen"


def deploy(root: Path, fakes: FakeHosts, **options: Any) -> tuple[bool, list[Event]]:
    events: list[Event] = []
    opts = DeployOptions(stage="fleet", skip_tests=True, as_json=True, **options)
    result = run_deploy(root / "shiplane.toml", opts, Masker(), events.append, transports=fakes)
    summary = result.to_json()
    for host, info in summary["hosts"].items():  # the result says what the events said
        copied = [e.data for e in events if e.host == host and "from_controller" in e.data]
        if copied:
            assert (info["bytes"], info["peer_bytes"]) == (
                copied[0]["from_controller"],
                copied[0]["from_peers"],
            )
    return summary["outcome"] == "ok", events


def moved(events: list[Event]) -> dict[str, dict[str, Any]]:
    return {
        e.host: dict(e.data) for e in events if e.phase == "copy" and "from_controller" in e.data
    }


def said(events: list[Event], host: str) -> str:
    return "\n".join(e.detail for e in events if e.phase == "copy" and e.host == host)


def sizes(root: Path) -> tuple[int, int]:
    """The bytes of the artifact's blobs worth relaying, and of the small ones."""
    blobs = [p.stat().st_size for p in (root / ".shiplane" / "build" / "blobs").iterdir()]
    return sum(s for s in blobs if s >= MIN_PEER_BLOB), sum(s for s in blobs if s < MIN_PEER_BLOB)


def test_each_blob_worth_relaying_leaves_the_controller_once(app: Path, hosts: FakeHosts) -> None:
    ok, events = deploy(app, hosts)
    assert ok
    got = moved(events)
    big, _ = sizes(app)
    assert got["h1"]["from_peers"] == 0 and got["h1"]["from_controller"] >= big
    for host in FLEET[1:]:
        assert got[host]["peers"] == {"h1": big}, got
        assert got[host]["from_controller"] < MIN_PEER_BLOB * 20  # the small blobs only


def test_hosts_beyond_parallel_fetch_from_the_sources_already_serving(
    app: Path, hosts: FakeHosts
) -> None:
    ok, events = deploy(app, hosts, parallel=1)  # one host after the other
    assert ok
    got = moved(events)
    big, _ = sizes(app)
    for host in FLEET[1:]:
        assert got[host]["peers"] == {"h1": big}, got


def test_a_source_that_cannot_serve_costs_its_peers_a_direct_copy(
    app: Path, hosts: FakeHosts
) -> None:
    hosts["h1"].fail("serve_blobs", "usage", SERVE_FAILS)
    ok, events = deploy(app, hosts)
    assert ok
    got = moved(events)
    assert SERVE_FAILS in said(events, "h1")
    for host in FLEET[1:]:
        assert got[host]["from_peers"] == 0
        assert got[host]["from_controller"] == got["h1"]["from_controller"]
        assert "h1 serves nothing" in said(events, host)


def test_a_fetch_that_fails_is_made_good_by_the_controller(app: Path, hosts: FakeHosts) -> None:
    def broken(op: str, args: dict[str, Any], payload: bytes) -> Any:
        raise FakeError("protocol", "the peer's answer made no sense")

    hosts["h3"].on("fetch_blobs", broken)
    ok, events = deploy(app, hosts)
    assert ok
    got = moved(events)
    assert (
        got["h3"]["from_peers"] == 0
        and got["h3"]["from_controller"] == got["h1"]["from_controller"]
    )
    assert "sent by the controller instead" in said(events, "h3")
    assert got["h2"]["peers"] and got["h4"]["peers"]  # the others still fetch


def test_a_stage_set_to_direct_relays_nothing(app: Path, hosts: FakeHosts) -> None:
    toml = app / "shiplane.toml"
    toml.write_text(
        toml.read_text().replace(
            'hosts = ["h1", "h2", "h3", "h4"]',
            'hosts = ["h1", "h2", "h3", "h4"]\ntransfer = "direct"',
        )
    )
    ok, events = deploy(app, hosts)
    assert ok
    got = moved(events)
    assert all(info["from_peers"] == 0 for info in got.values())
    assert len({info["from_controller"] for info in got.values()}) == 1


def test_a_source_whose_own_copy_fails_leaves_nobody_waiting(app: Path, hosts: FakeHosts) -> None:
    hosts["h1"].fail("receive", "disk", "no space left on the disk")
    ok, events = deploy(app, hosts)
    assert not ok  # h1 failed to prepare: nothing switches
    got = moved(events)
    assert "h1" not in got
    big, _ = sizes(app)
    for host in FLEET[1:]:  # from the controller, or from a host that took over from h1
        assert "h1" not in got[host]["peers"], got
        assert got[host]["from_controller"] + got[host]["from_peers"] >= big


def test_a_later_host_takes_over_from_a_source_that_could_not_serve(
    app: Path, hosts: FakeHosts
) -> None:
    hosts["h1"].fail("serve_blobs", "usage", SERVE_FAILS)
    ok, events = deploy(app, hosts, parallel=1)  # h2 is planned after h1 came to serve nothing
    assert ok
    got = moved(events)
    big, _ = sizes(app)
    assert got["h2"]["from_peers"] == 0 and got["h2"]["from_controller"] >= big
    for host in ("h3", "h4"):
        assert got[host]["peers"] == {"h2": big}, got


def test_the_deploys_token_reaches_the_hosts_only(app: Path, hosts: FakeHosts) -> None:
    tokens: list[str] = []

    def serve(op: str, args: dict[str, Any], payload: bytes) -> Any:
        tokens.append(args["token"])
        return hosts["h1"].default(op, args, payload)

    hosts["h1"].on("serve_blobs", serve)
    ok, events = deploy(app, hosts)
    assert ok and len(tokens) == 1 and len(tokens[0]) == 64
    printed = "\n".join(json.dumps(e.to_json()) for e in events)
    ledger = (app / ".shiplane" / "history" / "fleet.jsonl").read_text()
    assert tokens[0] not in printed and tokens[0] not in ledger
    assert all(tokens[0] not in json.dumps(entry) for host in hosts for entry in host.ledger)
