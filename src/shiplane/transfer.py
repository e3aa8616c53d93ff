"""Which host gets which blob from where (pure; docs/DESIGN.md, "Blob transfer").

Each blob leaves the controller once per deploy, whatever the number of hosts: the first host (in
the stage's order) that lacks a blob gets it from the controller, and becomes a *source*: it
serves the deploy's blobs it holds to the other hosts, which fetch from it over their own network.
A small blob (under ``MIN_PEER_BLOB``) always comes from the controller: a round trip to a peer
costs more than its bytes. ``shiplane plan`` shows this plan; a deploy runs it (commands/relay.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# 64 KiB: about 5 ms at 100 Mbit/s, less than waiting for a source and asking it
MIN_PEER_BLOB = 64 << 10


class HostTransfer:
    """One host's part: blobs from the controller, blobs from each source host, and whether it
    serves the deploy's blobs it holds to others. (A plain class: a dataclass costs the CLI's
    start-up a millisecond.)"""

    def __init__(
        self,
        controller: list[str] | None = None,
        peers: dict[str, list[str]] | None = None,
        serves: bool = False,
        holds: set[str] | None = None,
    ) -> None:
        self.controller = controller if controller is not None else []
        self.peers = peers if peers is not None else {}
        self.serves = serves
        self.holds = holds if holds is not None else set()  # what it serves, when it serves


def peer_worthy(sha: str, sizes: Mapping[str, int]) -> bool:
    return sizes.get(sha, 0) >= MIN_PEER_BLOB


def transfer_plan(
    order: Sequence[str],
    lacking: Mapping[str, Sequence[str]],
    holding: Mapping[str, set[str]],
    sizes: Mapping[str, int],
    *,
    sources: Mapping[str, set[str]] | None = None,
    more_may_come: bool = False,
) -> dict[str, HostTransfer]:
    """The plan for the hosts of ``lacking`` (host -> blobs it lacks), in ``order``.

    ``holding``: the deploy's blobs each of them already has (a source serves those too);
    ``sources``: hosts already serving from an earlier decision, and what they hold;
    ``more_may_come``: hosts not yet asked may still need blobs, so every source serves even when
    nobody in this plan fetches from it. A source is picked per blob among its holders, the one
    fewest hosts fetch from first, then the stage's order."""
    held: dict[str, set[str]] = {h: set(s) for h, s in (sources or {}).items()}
    fetchers: dict[str, int] = {h: 0 for h in held}
    rank = {host: index for index, host in enumerate(order)}
    plans: dict[str, HostTransfer] = {}
    for host in sorted(lacking, key=lambda h: rank.get(h, len(rank))):
        plan = HostTransfer()
        seeded: set[str] = set()
        for sha in dict.fromkeys(lacking[host]):
            holders = [h for h, blobs in held.items() if sha in blobs and h != host]
            if not peer_worthy(sha, sizes) or not holders:
                plan.controller.append(sha)
                if peer_worthy(sha, sizes):
                    seeded.add(sha)
                continue
            source = min(holders, key=lambda h: (fetchers[h], rank.get(h, len(rank))))
            plan.peers.setdefault(source, []).append(sha)
        for source in plan.peers:
            fetchers[source] += 1
        if seeded:
            plan.holds = {s for s in holding.get(host, set()) if peer_worthy(s, sizes)} | seeded
            held[host] = plan.holds
            fetchers.setdefault(host, 0)
        plans[host] = plan
    for host, plan in plans.items():
        plan.serves = bool(plan.holds) and (more_may_come or fetchers.get(host, 0) > 0)
    return plans


def describe(plans: Mapping[str, HostTransfer], sizes: Mapping[str, int]) -> dict[str, str]:
    """Each host's part in words (``shiplane plan``, the deploy's events)."""
    out: dict[str, str] = {}
    for host, plan in plans.items():
        parts = []
        if plan.controller:
            size = sum(sizes.get(s, 0) for s in plan.controller)
            parts.append(f"{len(plan.controller)} blob(s), {_human(size)} from the controller")
        for source, shas in plan.peers.items():
            size = sum(sizes.get(s, 0) for s in shas)
            parts.append(f"{len(shas)} blob(s), {_human(size)} from {source}")
        if plan.serves:
            parts.append("serves its blobs to the other hosts")
        out[host] = "; ".join(parts) or "nothing to send"
    return out


def _human(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    if size < 1 << 20:
        return f"{size / 1024:.1f} KiB"
    return f"{size / (1 << 20):.1f} MiB"
