"""What one SSH connection costs, by key exchange: the price of every host a deploy connects to.

    python bench/bench_ssh_kex.py [--connections N] [--out FILE]

Needs root (one host of ``tests/sshhosts.py``: a real ``sshd`` in its own network namespace). For
OpenSSH's default key exchange and for ``KexAlgorithms=curve25519-sha256``, it opens ``N`` plain
connections one after the other (``ssh <host> true``, no multiplexing: each is a full handshake,
as every host of a deploy pays once) and reports per connection the wall time, the CPU seconds
of the client (``ssh``) and of the host (``sshd`` and what it starts). OpenSSH 9.0 to 9.8 default
to ``sntrup761x25519-sha512``, a post-quantum hybrid whose reference code is slow; 9.9 and later
prefer ``mlkem768x25519-sha256``, which is not. shiplane keeps OpenSSH's default (it protects
today's sessions against decryption later); this bench shows what a stage's
``ssh_options = ["KexAlgorithms=curve25519-sha256"]`` would trade for it.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from _fleet_cpu import children_cpu, hosts_cpu
from _onehost import one_host, publish

from sshhosts import TestHosts

CHOICES = {"OpenSSH's default": [], "curve25519-sha256": ["-o", "KexAlgorithms=curve25519-sha256"]}


def negotiated(hosts: TestHosts, options: list[str]) -> str:
    """The key exchange ``ssh -v`` reports for these options."""
    done = subprocess.run(
        ["ssh", "-v", "-F", str(hosts.ssh_config), *options, hosts.hosts[0].name, "true"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    found = re.search(r"kex: algorithm: (\S+)", done.stderr)
    return found.group(1) if found else "?"


def measure(hosts: TestHosts, options: list[str], n: int) -> dict[str, float]:
    """Medians per connection: wall seconds, client and host CPU seconds (host CPU as a mean)."""
    walls, clients = [], []
    host0 = hosts_cpu(hosts)
    for _ in range(n):
        cpu0, t0 = children_cpu(), time.perf_counter()
        subprocess.run(
            [
                "ssh",
                "-F",
                str(hosts.ssh_config),
                "-o",
                "BatchMode=yes",
                *options,
                hosts.hosts[0].name,
                "true",
            ],
            check=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
        walls.append(time.perf_counter() - t0)
        clients.append(children_cpu() - cpu0)
    return {
        "wall": statistics.median(walls),
        "client": statistics.median(clients),
        "host": (hosts_cpu(hosts) - host0) / n,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--connections", type=int, default=20, help="connections per choice (default 20)"
    )
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    started = one_host("bench_ssh_kex")
    if started is None:
        return 2
    work, hosts = started
    try:
        version = subprocess.run(
            ["ssh", "-V"], capture_output=True, text=True, check=False
        ).stderr.strip()
        lines = [
            (
                f"`python bench/bench_ssh_kex.py --connections {args.connections}`; {version}; "
                f"medians of {args.connections} connections (host CPU: the mean)"
            ),
            "",
            "| key exchange | negotiated | wall per connection | client CPU | host CPU |",
            "|---|---|---|---|---|",
        ]
        for label, options in CHOICES.items():
            got = measure(hosts, options, args.connections)
            lines.append(
                f"| {label} | `{negotiated(hosts, options)}` | {got['wall'] * 1000:.0f} ms | "
                f"{got['client'] * 1000:.0f} ms | {got['host'] * 1000:.0f} ms |"
            )
    finally:
        hosts.stop()
        shutil.rmtree(work, ignore_errors=True)
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
