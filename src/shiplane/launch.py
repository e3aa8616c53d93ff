"""The console entry point: the command in this process, or in the command server's fork.

Small on purpose: with ``SHIPLANE_SERVER=1`` and a server running (cliserver.py), this is all a
command's own process imports.
"""

from __future__ import annotations

import os
import sys


def entry() -> None:
    """Run the command, then exit without the interpreter's teardown.

    Tearing down the modules (pydantic's, rich's) costs ~0.08 s of CPU after the last line is
    printed, on every command. Nothing needs it: each command closes its own processes,
    connections and temp dirs before it returns.
    """
    argv = sys.argv[1:]
    server = None
    if os.environ.get("SHIPLANE_SERVER") == "1":
        from shiplane import cliserver

        if cliserver.wanted(argv, os.environ):
            server = cliserver.socket_path()
        if server is not None:
            try:
                code = cliserver.call(argv, server)
            except cliserver.Lost:
                from shiplane.cli import command_lost

                code = command_lost()
            except KeyboardInterrupt:  # before the fork's pid came: it ends on its own (EOF)
                from shiplane.cli import interrupted

                code = interrupted()
            if code is not None:
                os._exit(code)
    from shiplane.cli import run_command

    code = run_command(argv)
    if server is not None:
        cliserver.spawn(server)  # for the next command
    os._exit(code)
