"""The agent's blob server and fetcher (agent/peers.py) between two stores on this machine: what a
peer is given, what it is refused, and that a fetch never stores bytes of another sha256."""

from __future__ import annotations

import hashlib
import http.client
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from shiplane.agent import AgentError, peers
from shiplane.agent.paths import Layout

TOKEN = "t" * 64


def blob(layout: Layout, data: bytes) -> str:
    sha = hashlib.sha256(data).hexdigest()
    layout.store.mkdir(parents=True, exist_ok=True)
    layout.blob(sha).write_bytes(data)
    return sha


@pytest.fixture
def source(tmp_path: Path) -> Layout:
    return Layout(tmp_path / "source")


@pytest.fixture
def fetcher(tmp_path: Path) -> Layout:
    return Layout(tmp_path / "fetcher")


@pytest.fixture
def served(source: Layout) -> Iterator[tuple[peers.BlobServer, list[str], list[bytes]]]:
    data = [os.urandom(3 << 20), b"small", b""]
    shas = [blob(source, d) for d in data]
    server, _ = peers.serve(source, shas, TOKEN, "127.0.0.1", 0, 60)
    try:
        yield server, shas, data
    finally:
        server.stop()


def refs(shas: list[str], data: list[bytes]) -> list[dict[str, object]]:
    return [{"sha256": s, "size": len(d)} for s, d in zip(shas, data)]


def test_a_peer_with_the_token_gets_every_named_blob_verified(
    served: tuple[peers.BlobServer, list[str], list[bytes]], fetcher: Layout
) -> None:
    server, shas, data = served
    events: list[object] = []
    got = peers.fetch(fetcher, "127.0.0.1", server.port, TOKEN, refs(shas, data), 3, events.append)  # type: ignore[arg-type]
    assert got == {
        "received": 3,
        "bytes": sum(map(len, data)),
        "failed": [],
        "bad": [],
        "error": None,
    }
    assert [fetcher.blob(s).read_bytes() for s in shas] == data
    assert server.stop() == {"served": 3, "bytes": sum(map(len, data)), "refused": 0}


def test_bytes_of_another_sha256_are_never_stored(
    served: tuple[peers.BlobServer, list[str], list[bytes]], source: Layout, fetcher: Layout
) -> None:
    server, shas, data = served
    source.blob(shas[1]).write_bytes(b"smalX")  # the source's disk changed it: same size
    got = peers.fetch(fetcher, "127.0.0.1", server.port, TOKEN, refs(shas, data), 3, lambda e: None)
    assert got["bad"] == [shas[1]] and got["received"] == 2
    assert not fetcher.blob(shas[1]).exists()
    assert not list(fetcher.store.glob(".tmp-*"))


def test_a_request_without_the_deploys_proof_or_for_an_unnamed_blob_gets_nothing(
    served: tuple[peers.BlobServer, list[str], list[bytes]], source: Layout, fetcher: Layout
) -> None:
    server, shas, data = served
    wrong = peers.fetch(
        fetcher, "127.0.0.1", server.port, "x" * 64, refs(shas, data), 3, lambda e: None
    )
    assert wrong["failed"] == shas and "403" in str(wrong["error"])
    other = blob(source, b"not named for this deploy")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    conn.request("GET", f"/blob/{other}", headers={peers.AUTH_HEADER: peers.sign(TOKEN, other)})
    response = conn.getresponse()
    assert (response.status, response.read()) == (404, b"")
    conn.request("GET", "/blob/../../etc/passwd", headers={peers.AUTH_HEADER: "x"})
    assert conn.getresponse().status == 403
    conn.close()
    assert server.stop()["refused"] == 3 + 1  # each blob asked with the wrong token, the path


def test_a_connection_kept_alive_gets_nothing_once_the_server_stopped(
    served: tuple[peers.BlobServer, list[str], list[bytes]],
) -> None:
    server, shas, _ = served
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    headers = {peers.AUTH_HEADER: peers.sign(TOKEN, shas[1])}
    conn.request("GET", f"/blob/{shas[1]}", headers=headers)
    assert conn.getresponse().read() == b"small"
    server.stop()
    conn.request("GET", f"/blob/{shas[1]}", headers=headers)
    assert conn.getresponse().status == 410
    conn.close()


def test_a_source_that_cannot_be_reached_fails_nothing_but_says_why(
    served: tuple[peers.BlobServer, list[str], list[bytes]], fetcher: Layout
) -> None:
    server, shas, data = served
    server.stop()
    got = peers.fetch(fetcher, "127.0.0.1", server.port, TOKEN, refs(shas, data), 3, lambda e: None)
    assert got["failed"] == shas and got["received"] == 0
    assert "cannot reach 127.0.0.1" in str(got["error"])


def test_a_server_needs_an_address_and_a_real_token(source: Layout) -> None:
    os.environ.pop("SSH_CONNECTION", None)
    with pytest.raises(AgentError, match="no address"):
        peers.serve(source, [], TOKEN, None, 0, 60)
    with pytest.raises(AgentError, match="token"):
        peers.serve(source, [], "short", "127.0.0.1", 0, 60)


def test_the_address_is_the_one_ssh_reached_the_host_at(
    monkeypatch: pytest.MonkeyPatch, source: Layout
) -> None:
    monkeypatch.setenv("SSH_CONNECTION", "10.0.0.1 51234 10.0.0.5 22")
    assert peers.ssh_address() == "10.0.0.5"
    # reached through a tunnel: the other hosts cannot come to this host's loopback
    monkeypatch.setenv("SSH_CONNECTION", "127.0.0.1 51234 127.0.0.1 2222")
    with pytest.raises(AgentError, match="no other host can reach"):
        peers.serve(source, [], TOKEN, None, 0, 60)
