"""Blobs relayed between hosts (docs/DESIGN.md, "Blob transfer"): on three real OpenSSH hosts, a
cold deploy sends each blob the hosts lack from the controller once and the others fetch it from
the host that has it; a host serving a blob whose bytes are wrong is caught by the fetching host
(sha256) and the controller sends that blob; hosts that cannot reach each other get everything
from the controller. Each test deploys the scaffold app to its own deploy root (a cold deploy).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deployhelp import Project, http_get, scaffold
from shiplane.transfer import MIN_PEER_BLOB
from sshhosts import TestHost, TestHosts

pytestmark = [pytest.mark.ssh, pytest.mark.slow]

STAGES = {"relay": 8400, "corrupt": 8410, "apart": 8420}


@pytest.fixture(scope="module")
def app(ssh_hosts: TestHosts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Project]:
    """The scaffold app with one stage per test, each on all three hosts in its own root."""
    project = scaffold(tmp_path_factory.mktemp("relay"))
    toml = project.root / "shiplane.toml"
    text = toml.read_text()
    hosts = ", ".join(f'"{h.name}"' for h in ssh_hosts.hosts)
    stages = "".join(
        f'[stages.{stage}]\nhosts = [{hosts}]\ndeploy_to = "/srv/{stage}"\nport = {port}\n'
        f'bind = "0.0.0.0"\nssh_config = "{ssh_hosts.ssh_config}"\n\n'
        for stage, port in STAGES.items()
    )
    toml.write_text(text[: text.index("[stages.staging]")] + stages)
    for stage in STAGES:
        secrets = project.root / ".secrets" / f"{stage}.env"
        secrets.write_text("SECRET_KEY=relay-test-secret-value\n")
        os.chmod(secrets, 0o600)
    project.commit("stages on the test hosts")
    try:
        yield project
    finally:
        for stage in STAGES:
            project.shiplane("stop", "--all", "--stage", stage, timeout=120)


def deploy(project: Project, stage: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Deploy ``stage`` with --json: its result and its events."""
    done = project.shiplane("deploy", "--stage", stage, "--skip-tests", "--json")
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"deploy failed ({done.returncode}):\n{output[-4000:]}"
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    result = next(line["result"] for line in lines if "result" in line)
    return result, [line for line in lines if "phase" in line]


def moved(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each host's copy summary: bytes from the controller, from peers, and by peer."""
    return {
        e["host"]: e["data"]
        for e in events
        if e["phase"] == "copy"
        and e["status"] == "progress"
        and "from_controller" in e.get("data", {})
    }


def notes(events: list[dict[str, Any]], host: str) -> str:
    return "\n".join(
        e.get("detail", "") for e in events if e["phase"] == "copy" and e.get("host") == host
    )


def store(host: TestHost, stage: str) -> dict[str, int]:
    """The host's stored blobs by sha256, each checked against its name; their sizes."""
    blobs = {}
    for path in (host.root / stage / "store").iterdir():
        if len(path.name) == 64:
            assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name, path
            blobs[path.name] = path.stat().st_size
    return blobs


def release_blobs(host: TestHost, stage: str) -> list[str]:
    meta = json.loads((host.root / stage / "current" / "release.json").read_text())
    return list(meta["blobs"])


def serves(host: TestHost, stage: str, release: str) -> None:
    status, body = http_get(host.url(STAGES[stage], "/"))
    assert status == 200 and f"release {release}" in body, body[:300]


def test_a_cold_deploy_sends_each_blob_once_and_hosts_fetch_the_rest_from_each_other(
    app: Project, ssh_hosts: TestHosts
) -> None:
    planned = app.shiplane("plan", "--stage", "relay", "--json")
    assert planned.returncode == 0, planned.stdout + planned.stderr
    plan = next(
        json.loads(line)["result"] for line in planned.stdout.splitlines() if '"result"' in line
    )
    first, *others = [h.name for h in ssh_hosts.hosts]
    assert "from the controller" in plan["hosts"][first]["transfer"]
    assert plan["hosts"][first]["transfer"].endswith("serves its blobs to the other hosts")
    for host in others:
        assert f"from {first}" in plan["hosts"][host]["transfer"], plan["hosts"][host]
    result, events = deploy(app, "relay")
    per_host = moved(events)
    assert set(per_host) == {h.name for h in ssh_hosts.hosts}
    stored = [store(h, "relay") for h in ssh_hosts.hosts]
    assert stored[0] == stored[1] == stored[2]  # every blob on every host, each verified
    blobs = stored[0]
    assert set(release_blobs(ssh_hosts.hosts[0], "relay")) <= set(blobs)
    small = sum(size for size in blobs.values() if size < MIN_PEER_BLOB)
    big = sum(size for size in blobs.values() if size >= MIN_PEER_BLOB)
    # the first host of the stage lacking them got every blob from the controller (uv's too,
    # pruned from the store once unpacked), the others only the small ones: each blob worth
    # relaying left the controller once
    seed = ssh_hosts.hosts[0].name
    relayed = per_host[seed]["from_controller"] - small
    assert relayed >= big and per_host[seed]["from_peers"] == 0, per_host
    for host in ssh_hosts.hosts[1:]:
        assert per_host[host.name]["from_controller"] == small, per_host
        assert per_host[host.name]["peers"] == {seed: relayed}, per_host
    served = [e for e in events if e.get("data", {}).get("served_to_peers")]
    assert [(e["host"], e["bytes"]) for e in served] == [(seed, 2 * relayed)]
    for host in ssh_hosts.hosts:
        serves(host, "relay", result["release"])


def test_a_blob_served_with_wrong_bytes_is_caught_and_sent_by_the_controller(
    app: Project, ssh_hosts: TestHosts
) -> None:
    first, second, third = ssh_hosts.hosts
    # the largest dependency wheel of the artifact the first test deployed (this one's too)
    (manifest,) = (app.root / ".shiplane" / "build" / "artifacts").glob("*.json")
    wheels = [
        w for w in json.loads(manifest.read_text())["dependencies"] if w["path"].endswith(".whl")
    ]
    largest = max(wheels, key=lambda w: w["size"])
    victim = largest["sha256"]
    # the first host holds the blob already, with other bytes (a disk that changed them): it
    # serves what it holds to the other hosts, as it serves the blobs it receives
    planted = first.root / "corrupt" / "store" / victim
    planted.parent.mkdir(parents=True)
    planted.write_bytes(b"\0" * largest["size"])  # its size, other bytes
    result, events = deploy(app, "corrupt")
    for host in (second, third):
        said = notes(events, host.name)
        assert "did not match their sha256" in said and victim[:12] in said, said
        assert "sent by the controller instead" in said
    for host in ssh_hosts.hosts:
        lacking = set(release_blobs(host, "corrupt")) - store(host, "corrupt").keys()
        assert not lacking, (host.name, lacking, victim, notes(events, host.name))
        serves(host, "corrupt", result["release"])
    assert (first.root / "corrupt" / "store" / ".quarantine").is_dir()  # its install caught it


def test_hosts_that_cannot_reach_each_other_get_every_blob_from_the_controller(
    app: Project, ssh_hosts: TestHosts
) -> None:
    # the hosts reach each other only through this machine's forwarding between their veths
    forwarding = [Path(f"/proc/sys/net/ipv4/conf/{h.veth}/forwarding") for h in ssh_hosts.hosts]
    for path in forwarding:
        path.write_text("0\n")
    try:
        result, events = deploy(app, "apart")
    finally:
        for path in forwarding:
            path.write_text("1\n")
    per_host = moved(events)
    blobs = store(ssh_hosts.hosts[0], "apart")
    for host in ssh_hosts.hosts[1:]:
        said = notes(events, host.name)
        assert "cannot reach" in said and "sent by the controller instead" in said, said
        assert per_host[host.name]["from_peers"] == 0
        assert store(host, "apart") == blobs
    # each host got all it lacked (uv's blob too, pruned once unpacked) from the controller
    (sent,) = {d["from_controller"] for d in per_host.values()}
    assert sent >= sum(blobs.values())
    for host in ssh_hosts.hosts:
        serves(host, "apart", result["release"])
