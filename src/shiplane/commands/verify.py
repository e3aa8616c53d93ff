"""``shiplane verify``: re-hash every blob in each host's store, as a deploy does for the blobs it
uses; a blob that no longer matches its sha256 is quarantined there (the next deploy that needs
it sends it again)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict, cast

from shiplane.agent.protocol import VerifyResult
from shiplane.commands.operate import connected
from shiplane.fleet import failures
from shiplane.secret import Masker


class VerifyReport(TypedDict):
    """``shiplane verify``: per host the blobs checked and those that did not match."""

    ok: bool
    stage: str
    hosts: dict[str, VerifyResult]
    lines: list[str]


def run_verify(
    file: Path | None, stage: str | None, masker: Masker, *, hosts: str | None, sets: Sequence[str]
) -> VerifyReport:
    """Per host: how many blobs were checked and which were bad. ``ok`` False when any was."""
    with connected(file, stage, masker, hosts=hosts, sets=sets) as (ctx, fleet):
        outcomes = fleet.each(
            "verify",
            lambda host, s: cast(VerifyResult, s.call("verify", {}, timeout=3600)),
            quiet=True,
        )
    per_host = {host: outcome.result for host, outcome in outcomes.items() if outcome.ok}
    lines = []
    for host, result in per_host.items():
        bad = result.get("bad") or []
        verdict = (
            f"{len(bad)} did not match their sha256 and were quarantined: {', '.join(b[:12] for b in bad)}"
            if bad
            else "all match their sha256"
        )
        lines.append(f"{host}: {result.get('blobs', 0)} stored blob(s), {verdict}")
    for host, error in failures(outcomes).items():
        lines.append(f"{host}: verify failed: {error.reason}")
    ok = not failures(outcomes) and not any(r.get("bad") for r in per_host.values())
    return {"ok": ok, "stage": ctx.stage, "hosts": per_host, "lines": lines}
