"""Shared fixtures: real OpenSSH test hosts (see ``tests/sshhosts.py``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest

from sshhosts import TestHosts, ssh_available, start_hosts


@pytest.fixture(scope="module")
def ssh_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestHosts]:
    """Three running test hosts ``shl-h1..3`` (``ssh -F ssh_hosts.ssh_config shl-h1``), shared
    by one test module and stopped after it; skipped where they cannot run."""
    reason = ssh_available()
    if reason is not None:
        pytest.skip(reason)
    hosts = start_hosts(3, tmp_path_factory.mktemp("sshhosts"))
    try:
        yield hosts
    finally:
        hosts.stop()


@pytest.fixture
def make_ssh_hosts(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[int], TestHosts]]:
    """A factory ``make_ssh_hosts(n)`` for a test's own set of ``n`` hosts (each call a new set,
    with its own ssh_config); all are stopped when the test ends."""
    reason = ssh_available()
    if reason is not None:
        pytest.skip(reason)
    # ExitStack stops every set even if stopping one of them raises, then re-raises
    with contextlib.ExitStack() as stack:

        def make(n: int) -> TestHosts:
            hosts = start_hosts(n, tmp_path_factory.mktemp(f"sshhosts{n}-"))
            stack.callback(hosts.stop)
            return hosts

        yield make
