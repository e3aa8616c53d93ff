"""The deploy's copy step with a controller upload that does not grow with the fleet (docs/DESIGN.md,
"Blob transfer"): each blob the hosts lack leaves the controller once; the other hosts fetch it
from a host that has it (agent/peers.py), verified by its sha256 on arrival.

Hosts go lock -> copy -> install each at its own pace (fleet.chain). A host that lacks nothing
worth relaying (``transfer.peer_worthy``) is sent what it lacks at once, as before: a warm deploy
waits for nobody. A host that lacks more waits until every host that started the chain has said
what it lacks (at most ``GATHER_SECONDS``), then ``transfer.transfer_plan`` decides for all of
them together, in the stage's order, the plan ``shiplane plan`` shows. Hosts that come later (more
hosts than ``--parallel``) are planned against the sources already serving.

Whatever goes wrong between hosts costs time, never the deploy: a source that cannot serve, a peer
it cannot reach (``CONNECT_TIMEOUT``), or bytes of another sha256, and the controller sends those
blobs itself; the events say so. ``stop`` ends every source's server once the prepare phase ends
(each also stops on its own after its ttl, and with its session).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from shiplane.events import Emit, Event
from shiplane.transfer import HostTransfer, peer_worthy, transfer_plan
from shiplane.transport.session import AgentSession, HostError
from shiplane.ui import human_bytes

GATHER_SECONDS = 2.0
CONNECT_TIMEOUT = 3.0
FATAL = ("lost", "timeout", "connect", "disk")  # the host itself is in trouble, not its peers

# sends blobs from the controller to one host; returns the bytes sent
Send = Callable[[str, AgentSession, list[str]], int]


class Moved:
    """Where one host's blobs came from, in bytes."""

    def __init__(self) -> None:
        self.from_controller = 0
        self.from_peers: dict[str, int] = {}
        self.blobs_from_controller = 0
        self.blobs_from_peers = 0


class Relay:
    """One deploy's blob transfer across its hosts; thread-safe (one copy step per host)."""

    def __init__(
        self,
        order: Sequence[str],
        sizes: dict[str, int],
        send: Send,
        emit: Emit,
        *,
        enabled: bool,
        ttl: float = 600,
        port: int = 0,
        first: Sequence[str] = (),
    ) -> None:
        self.order = list(order)
        self.sizes = sizes  # the deploy's blobs (the caller adds uv's when it ships it)
        self.send = send
        self.emit = emit
        self.enabled = enabled
        self.ttl, self.port = ttl, port
        self.token = os.urandom(32).hex()  # this deploy's only: given to the hosts, never shown
        self._cond = threading.Condition()
        # hosts that started their chain, the first wave (``first``: as many as run at once)
        # from the start, so the first plan waits for all of them whatever thread runs first
        self._arrived: set[str] = set(first)
        self._gone: set[str] = set()  # left the chain before saying what they lack
        self._lacking: dict[str, list[str]] = {}  # every host that reported
        self._holding: dict[str, set[str]] = {}
        self._plans: dict[str, HostTransfer] = {}
        self._endpoints: dict[str, tuple[str, int] | None] = {}  # None: serves nothing
        self.serving: list[str] = []

    # --- the chain around the copy step ------------------------------------------------------

    def arrive(self, host: str) -> None:
        """``host`` started its chain: hosts that lack blobs wait for what it lacks."""
        with self._cond:
            self._arrived.add(host)

    def leave(self, host: str) -> None:
        """``host`` failed before or during its copy: nobody waits for it or fetches from it."""
        with self._cond:
            self._gone.add(host)
            if self._plans.get(host, HostTransfer()).serves and host not in self._endpoints:
                self._endpoints[host] = None
            self._cond.notify_all()

    # --- one host's copy -----------------------------------------------------------------------

    def transfer(
        self, host: str, session: AgentSession, wanted: list[str], missing: list[str]
    ) -> Moved:
        """Bring ``missing`` (of the deploy's ``wanted`` blobs) to ``host``."""
        moved = Moved()
        if not self.enabled or not any(peer_worthy(s, self.sizes) for s in missing):
            with self._cond:
                self._lacking[host], self._holding[host] = [], set()
                self._cond.notify_all()
            self._direct(host, session, missing, moved)
            return moved
        plan = self._plan_for(host, missing, set(wanted) - set(missing))
        try:
            self._direct(host, session, plan.controller, moved)
            if plan.serves:
                self._serve(host, session, plan)
        finally:
            with self._cond:  # whatever happened, nobody waits for this source any longer
                self._endpoints.setdefault(host, None)
                self._cond.notify_all()
        for source, shas in plan.peers.items():
            self._fetch(host, session, source, shas, moved)
        return moved

    def _plan_for(self, host: str, missing: list[str], holding: set[str]) -> HostTransfer:
        end = time.monotonic() + GATHER_SECONDS
        with self._cond:
            self._lacking[host], self._holding[host] = missing, holding
            self._cond.notify_all()
            while host not in self._plans:
                pending = self._arrived - set(self._lacking) - self._gone
                left = end - time.monotonic()
                if not pending or left <= 0:
                    self._decide()
                    break
                self._cond.wait(left)
            return self._plans[host]

    def _decide(self) -> None:
        """Plan every host that reported blobs worth relaying and has no plan yet (lock held)."""
        lacking = {
            h: m
            for h, m in self._lacking.items()
            if h not in self._plans and any(peer_worthy(s, self.sizes) for s in m)
        }
        # sources already planned, but not one that came to serve nothing (failed, no address)
        sources = {
            h: p.holds
            for h, p in self._plans.items()
            if p.serves and h not in self._gone and self._endpoints.get(h, ("", 0)) is not None
        }
        later = set(self.order) - self._arrived - self._gone
        plans = transfer_plan(
            self.order,
            lacking,
            self._holding,
            self.sizes,
            sources=sources,
            more_may_come=bool(later),
        )
        self._plans.update(plans)
        self._cond.notify_all()

    def _direct(self, host: str, session: AgentSession, shas: list[str], moved: Moved) -> None:
        if shas:
            moved.from_controller += self.send(host, session, shas)
            moved.blobs_from_controller += len(shas)

    def _serve(self, host: str, session: AgentSession, plan: HostTransfer) -> None:
        try:
            answer = session.call(
                "serve_blobs",
                {
                    "blobs": sorted(plan.holds),
                    "token": self.token,
                    "ttl": self.ttl,
                    "port": self.port,
                },
                timeout=60,
            )
        except HostError as exc:
            if exc.kind in FATAL:
                raise
            self._note(host, f"serves no blobs to the other hosts ({exc.reason})")
            return
        with self._cond:
            self._endpoints[host] = (str(answer["address"]), int(answer["port"]))
            self.serving.append(host)
            self._cond.notify_all()

    def _endpoint(self, source: str) -> tuple[str, int] | None:
        """The source's address once it serves; None when it will not (it failed, or could not)."""
        with self._cond:
            while source not in self._endpoints and source not in self._gone:
                self._cond.wait(1.0)
            return self._endpoints.get(source)

    def _fetch(
        self, host: str, session: AgentSession, source: str, shas: list[str], moved: Moved
    ) -> None:
        endpoint = self._endpoint(source)
        if endpoint is None:
            self._note(
                host, f"{source} serves nothing: {len(shas)} blob(s) sent by the controller instead"
            )
            self._direct(host, session, shas, moved)
            return
        try:
            result = session.call(
                "fetch_blobs",
                {
                    "address": endpoint[0],
                    "port": endpoint[1],
                    "token": self.token,
                    "blobs": [{"sha256": s, "size": self.sizes[s]} for s in shas],
                    "connect_timeout": CONNECT_TIMEOUT,
                },
                timeout=120,
            )
        except HostError as exc:
            if exc.kind in FATAL:
                raise
            result = {"received": 0, "bytes": 0, "failed": shas, "bad": [], "error": exc.reason}
        got = int(result.get("bytes") or 0)
        if got:
            moved.from_peers[source] = moved.from_peers.get(source, 0) + got
            moved.blobs_from_peers += int(result.get("received") or 0)
        bad, failed = list(result.get("bad") or []), list(result.get("failed") or [])
        if bad:
            self._note(
                host,
                f"{len(bad)} blob(s) from {source} did not match their sha256 (discarded): "
                f"sent by the controller instead ({', '.join(s[:12] for s in bad)})",
            )
        if failed:
            self._note(
                host,
                f"{len(failed)} blob(s) not had from {source} ({result.get('error')}): "
                "sent by the controller instead",
            )
        self._direct(host, session, [s for s in shas if s in set(bad) | set(failed)], moved)

    def _note(self, host: str, text: str) -> None:
        self.emit(Event("copy", "info", host=host, detail=text))

    # --- after the prepare phase -------------------------------------------------------------

    def stop(self, each: Callable[..., Any]) -> None:
        """End every source's server (``each`` is ``Fleet.each``); say what each served."""
        if not self.serving:
            return
        outcomes = each(
            "copy",
            lambda host, session: session.call("stop_serving", {}, timeout=60),
            hosts=list(self.serving),
            quiet=True,
        )
        for host, outcome in outcomes.items():
            if outcome.ok and outcome.result:
                served = outcome.result
                self.emit(
                    Event(
                        "copy",
                        "info",
                        host=host,
                        detail=f"served {served.get('served', 0)} blob(s), "
                        f"{human_bytes(int(served.get('bytes') or 0))} to the other hosts"
                        + (
                            f"; refused {served['refused']} request(s) without this deploy's proof"
                            if served.get("refused")
                            else ""
                        ),
                        bytes=int(served.get("bytes") or 0),
                        data={"served_to_peers": int(served.get("bytes") or 0)},
                    )
                )
        self.serving.clear()
