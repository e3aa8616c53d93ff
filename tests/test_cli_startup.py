"""The CLI's start-up loads only what the command needs (issue 21): the transports, for
pre-warming SSH connections, only for a verb that connects to hosts."""

from __future__ import annotations

import subprocess
import sys

from shiplane import cli
from shiplane.transport import prewarm

# runs the console entry point and reports, as it exits, whether the transports were imported
_PROBE = """
import os, sys
from shiplane import launch
exit_ = os._exit
def report(code):
    print("TRANSPORT", "shiplane.transport" in sys.modules, flush=True)
    exit_(code)
os._exit = report
sys.argv = ["shiplane", *sys.argv[1:]]
launch.entry()
"""


def _transport_loaded(*argv: str) -> bool:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("TRANSPORT ")][-1]
    return line.split()[1] == "True"


def test_the_cli_knows_every_verb_that_prewarms() -> None:
    assert cli.CONNECTING_VERBS == frozenset(prewarm.VERBS)


def test_help_and_offline_verbs_do_not_load_the_transports() -> None:
    assert not _transport_loaded("--help")
    assert not _transport_loaded("--version")


def test_a_connecting_verb_loads_them_to_prewarm() -> None:
    # the verb's help pre-warms nothing (prewarm's own parse says so), but it was asked
    assert _transport_loaded("status", "--help")
