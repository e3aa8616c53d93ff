"""``python -m shiplane.agent <cmd>`` (or ``python3 -S agent-<sha> <cmd>`` on a host).

serve <root>                              the session loop (JSON lines on stdin/stdout)
exec-env <root> <release_id> -- cmd ...   exec cmd in the release dir with its runtime env
after-switch <root> <release_id> [old...] after a switch: forget old servers, keep a spare
proxy ...                                 the builtin front proxy
jobs <root>                               the daemon backend's scheduler of jobs
run-job <root> <name> [minute]            one run of a scheduled job
"""

from __future__ import annotations

import sys

USAGE = (
    "usage: agent serve <root> | agent exec-env <root> <release_id> -- cmd... | agent proxy ...\n"
)


def main(argv: list[str]) -> int:
    """Dispatch a sub-command; returns the exit code (``exec-env`` does not return)."""
    if not argv:
        sys.stderr.write(USAGE)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "serve" and len(rest) == 1:
        import os

        from .server import serve

        code = serve(rest[0])
        # The session has ended and told the controller everything; its files are closed by
        # their with blocks, its lock is an flock the kernel frees, its background threads were
        # joined. Python's own teardown still took 50-110 ms after EOF, which the controller
        # waited out at the end of every command (transport/session.py close): skip it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if cmd == "exec-env" and len(rest) >= 4 and rest[2] == "--":
        from . import AgentError
        from .paths import Layout
        from .runtime import exec_in_release

        try:
            exec_in_release(Layout(rest[0]), rest[1], rest[3:])
        except AgentError as exc:
            sys.stderr.write(f"shiplane agent exec-env: {exc.message}\n")
            return 2
        except OSError as exc:
            sys.stderr.write(f"shiplane agent exec-env: cannot run {rest[3]!r}: {exc}\n")
            return 127
        return 0  # not reached: exec replaced this process
    if cmd == "after-switch" and len(rest) >= 2:
        from .paths import Layout
        from .runtime import valid_release_id
        from .services import after_switch

        after_switch(
            Layout(rest[0]),
            valid_release_id(rest[1]),
            [valid_release_id(r) for r in rest[2:]],
            lambda event: None,
        )
        return 0
    if cmd == "jobs":
        from . import scheduler

        return scheduler.main(rest)
    if cmd == "run-job":
        from . import jobs

        return jobs.main(rest)
    if cmd == "proxy":
        from . import proxy

        return int(proxy.main(rest) or 0)
    sys.stderr.write(USAGE)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
