"""The controller's uplink, as a laptop's: one shared, rate-limited link to every test host.

The test hosts of ``tests/sshhosts.py`` each hang off their own veth, so a ``tc`` limit per veth
would give the controller N links, not one. Instead every packet the controller itself sends to a
host (source address: the controller's end of that host's veth) is redirected through one IFB
device, shaped there with a token bucket (``tbf``) when a rate is given, and then goes on to its
host. Traffic between hosts (a host fetching a blob from another) is routed through the same veths
but has a host's source address, so it is neither shaped nor counted: hosts share a fast LAN, as
in a data centre, and only the controller's own upload is bound.

The IFB device's transmit counter is then exactly the bytes the controller sent, and each veth's
transmit counter what its host received from anyone (controller and peers).
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

from sshhosts import TestHosts


def _tc(*argv: str, check: bool = True) -> None:
    subprocess.run(argv, check=check, capture_output=True, text=True)


def _counter(device: str, name: str) -> int:
    try:
        return int(Path(f"/sys/class/net/{device}/statistics/{name}").read_text())
    except (OSError, ValueError):
        return 0


class Uplink:
    """``up = Uplink(testhosts, mbit=100); up.start()`` ... ``up.sent()``, ``up.received()``,
    then ``up.stop()``."""

    def __init__(self, testhosts: TestHosts, mbit: float | None, name: str = "shl-uplink") -> None:
        self.testhosts, self.mbit, self.device = testhosts, mbit, name

    def start(self) -> None:
        _tc("ip", "link", "del", self.device, check=False)  # a crashed earlier run's
        _tc("ip", "link", "add", self.device, "type", "ifb")
        _tc("ip", "link", "set", self.device, "up")
        if self.mbit:
            # burst: at least rate/HZ; 64 KiB keeps tbf accurate at 100 Mbit/s without a CPU-bound
            # timer; latency bounds the queue (packets beyond it are dropped: TCP backs off)
            _tc(
                "tc", "qdisc", "add", "dev", self.device, "root", "tbf",
                "rate", f"{self.mbit}mbit", "burst", "64kb", "latency", "100ms",
            )  # fmt: skip
        for host in self.testhosts.hosts:
            controller = host.address.rsplit(".", 1)[0] + ".1"  # sshhosts: <net>.1 is ours
            _tc("tc", "qdisc", "add", "dev", host.veth, "clsact")
            _tc(
                "tc", "filter", "add", "dev", host.veth, "egress", "protocol", "ip", "prio", "1",
                "u32", "match", "ip", "src", f"{controller}/32",
                "action", "mirred", "egress", "redirect", "dev", self.device,
            )  # fmt: skip

    def stop(self) -> None:
        for host in self.testhosts.hosts:
            with contextlib.suppress(Exception):
                _tc("tc", "qdisc", "del", "dev", host.veth, "clsact", check=False)
        _tc("ip", "link", "del", self.device, check=False)

    def sent(self) -> int:
        """Bytes the controller has sent to the hosts so far (IP packets, headers included)."""
        return _counter(self.device, "tx_bytes")

    def received(self) -> dict[str, int]:
        """Bytes each host has received so far, from the controller and from other hosts."""
        return {h.name: _counter(h.veth, "tx_bytes") for h in self.testhosts.hosts}
