"""Which host gets which blob from where (shiplane/transfer.py, pure): each blob worth relaying
leaves the controller once, the first host of the stage lacking it serves the others."""

from __future__ import annotations

from shiplane.transfer import MIN_PEER_BLOB, describe, transfer_plan

BIG, SMALL = MIN_PEER_BLOB, MIN_PEER_BLOB - 1
SIZES = {"a": BIG, "b": 3 * BIG, "c": SMALL, "d": BIG}
HOSTS = ["h1", "h2", "h3"]


def test_a_cold_stage_gets_each_big_blob_once_and_the_small_ones_everywhere() -> None:
    lacking = {h: ["a", "b", "c"] for h in reversed(HOSTS)}  # the order hosts reported in
    plans = transfer_plan(HOSTS, lacking, {h: set() for h in HOSTS}, SIZES)
    assert plans["h1"].controller == ["a", "b", "c"] and plans["h1"].peers == {}
    assert plans["h1"].serves and plans["h1"].holds == {"a", "b"}
    for host in ("h2", "h3"):
        assert plans[host].controller == ["c"]
        assert plans[host].peers == {"h1": ["a", "b"]}
        assert not plans[host].serves
    said = describe(plans, SIZES)
    assert said["h2"] == "1 blob(s), 64.0 KiB from the controller; 2 blob(s), 256.0 KiB from h1"
    assert said["h1"].endswith("; serves its blobs to the other hosts")


def test_a_source_serves_the_blobs_it_held_before_the_deploy() -> None:
    lacking = {"h1": ["b"], "h2": ["a", "b"], "h3": ["a", "b"]}
    plans = transfer_plan(HOSTS, lacking, {"h1": {"a", "c"}, "h2": set(), "h3": set()}, SIZES)
    assert plans["h1"].controller == ["b"] and plans["h1"].holds == {"a", "b"}
    assert plans["h2"].peers == plans["h3"].peers == {"h1": ["a", "b"]}
    assert plans["h2"].controller == plans["h3"].controller == []


def test_a_host_that_lacks_only_small_blobs_serves_nobody() -> None:
    plans = transfer_plan(HOSTS, {"h2": ["c"]}, {"h2": {"a"}}, SIZES)
    assert plans["h2"].controller == ["c"] and not plans["h2"].serves


def test_a_lone_host_serves_only_when_more_hosts_may_come() -> None:
    alone = transfer_plan(HOSTS, {"h3": ["a"]}, {"h3": set()}, SIZES)
    assert alone["h3"].controller == ["a"] and not alone["h3"].serves
    later = transfer_plan(HOSTS, {"h3": ["a"]}, {"h3": set()}, SIZES, more_may_come=True)
    assert later["h3"].serves


def test_later_hosts_fetch_from_the_sources_already_serving_the_least_busy_first() -> None:
    sources = {"h1": {"a", "b"}, "h2": {"a"}}
    plans = transfer_plan(
        ["h1", "h2", "h3", "h4"],
        {"h3": ["a", "b", "d"], "h4": ["a"]},
        {"h3": set(), "h4": set()},
        SIZES,
        sources=sources,
    )
    assert plans["h3"].peers == {"h1": ["a", "b"]}
    assert plans["h3"].controller == ["d"] and plans["h3"].serves is False
    assert plans["h4"].peers == {"h2": ["a"]}  # h1 has a fetcher already
