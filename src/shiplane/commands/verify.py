"""``shiplane verify``: re-hash every blob in each host's store, as a deploy does for the blobs it
uses; a blob that no longer matches its sha256 is quarantined there (the next deploy that needs
it sends it again)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, cast

from shiplane.agent.protocol import VerifyResult
from shiplane.commands.operate import connected
from shiplane.fleet import failures
from shiplane.secret import Masker


class VerifyReport(TypedDict):
    """``shiplane verify --json``'s result, before the CLI adds its ``lines``: per host the blobs
    checked and those that did not match."""

    ok: bool
    stage: str
    hosts: dict[str, VerifyResult]


@dataclass(frozen=True)
class Verification:
    """What ``verify`` returns; the CLI renders it (``ui.verify_lines``) or prints
    ``to_json()``. ``failed``: the hosts that could not verify, and why."""

    report: VerifyReport
    failed: dict[str, str]

    def to_json(self) -> VerifyReport:
        return self.report


def run_verify(
    file: Path | None, stage: str | None, masker: Masker, *, hosts: str | None, sets: Sequence[str]
) -> Verification:
    """Per host: how many blobs were checked and which were bad. ``ok`` False when any was."""
    with connected(file, stage, masker, hosts=hosts, sets=sets) as (ctx, fleet):
        outcomes = fleet.each(
            "verify",
            lambda host, s: cast(VerifyResult, s.call("verify", {}, timeout=3600)),
            quiet=True,
        )
    per_host = {host: outcome.result for host, outcome in outcomes.items() if outcome.ok}
    failed = {host: error.reason for host, error in failures(outcomes).items()}
    ok = not failed and not any(r.get("bad") for r in per_host.values())
    return Verification({"ok": ok, "stage": ctx.stage, "hosts": per_host}, failed)
