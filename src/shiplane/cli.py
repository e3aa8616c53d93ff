"""Verbs only: parse, call one function, render its result, pick the exit code."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from shiplane import __version__
from shiplane.errors import ShiplaneError, UsageError
from shiplane.secret import Masker
from shiplane.verbs import CONNECTING_VERBS

if TYPE_CHECKING:
    from shiplane.commands.exec import ExecResult
    from shiplane.events import Emit
    from shiplane.ui import Reporter

JSON_VERSION = 1  # of every --json line: docs/json.md

F = TypeVar("F", bound=Callable[..., Any])


class Context:
    """What every verb gets: options common to all, and the masker that guards all output."""

    def __init__(self, file: str | None, verbose: bool) -> None:
        self.file = Path(file) if file else None
        self.verbose = verbose
        self.masker = Masker()
        self.as_json = False  # set as soon as a verb's --json is parsed: errors are JSON too


def stage_option(func: F) -> F:
    return click.option(
        "--stage", "-s", envvar="SHIPLANE_STAGE", help="Stage to act on (or $SHIPLANE_STAGE)."
    )(func)


def json_option(func: F) -> F:
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        callback=_json_flag,
        is_eager=True,
        help="Machine-readable output: one JSON object per line (docs/json.md).",
    )(func)


def _json_flag(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    root = ctx.find_root().obj
    if value and isinstance(root, Context):
        root.as_json = True
    return value


def override_options(func: F) -> F:
    func = click.option("--hosts", help="Override the stage's hosts for this run: a,b,c.")(func)
    return click.option(
        "--set",
        "sets",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override a stage key for this run.",
    )(func)


class ShiplaneGroup(click.Group):
    """Turns ShiplaneError into one clear paragraph and the right exit code; click's usage errors exit 2."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # -v/--verbose is the group's, but people type it after the verb too (`deploy -v`)
        end = args.index("--") if "--" in args else len(args)
        verbose = [a for a in args[:end] if a in ("-v", "--verbose")]
        rest = [a for a in args[:end] if a not in ("-v", "--verbose")] + args[end:]
        return super().parse_args(ctx, verbose[:1] + rest)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ShiplaneError as exc:
            masker = ctx.obj.masker if isinstance(ctx.obj, Context) else Masker()
            click.echo(masker(f"error: {exc}"), err=True)
            if isinstance(ctx.obj, Context) and ctx.obj.verbose:
                import traceback  # only for -v: not loaded by every command (issue 21)

                click.echo(masker(traceback.format_exc()), err=True)
            _json_error(ctx, masker, exc.kind, str(exc), exc.exit_code)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            _json_error(ctx, Masker(), "interrupted", "interrupted", 130)
            ctx.exit(130)


def _json_error(ctx: click.Context, masker: Masker, kind: str, message: str, code: int) -> None:
    """With --json, the error is also the last line on stdout (docs/json.md)."""
    if isinstance(ctx.obj, Context) and ctx.obj.as_json:
        error = {"kind": kind, "message": message, "exit_code": code}
        click.echo(masker(json.dumps({"error": error, "v": JSON_VERSION})))


def run_command(argv: list[str]) -> int:
    """The command ``argv`` in this process; its exit code. Everything it started is closed."""
    # The transports (~10 ms of imports) only for a verb that connects: `--help`, `check`,
    # `build`... never pre-warm anything (issue 21)
    connecting = any(word in CONNECTING_VERBS for word in argv)
    if connecting:
        from shiplane.transport import prewarm

        if prewarm.enabled(os.environ):  # the hosts' SSH handshakes overlap the imports below
            prewarm.start(argv, os.environ, Path.cwd())
    try:
        main.main(args=argv, prog_name="shiplane")  # standalone mode always ends in SystemExit
        code = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:
            print(exc.code, file=sys.stderr)
            code = 1
    finally:
        if connecting:
            from shiplane.transport import prewarm

            prewarm.stop_unused()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:  # a closed pipe (`shiplane releases | head`)
        code = code or 1
    return code


def interrupted() -> int:
    """Ctrl-C before the command started (while it was handed to the command server)."""
    click.echo("interrupted", err=True)
    return 130


def command_lost() -> int:
    """The command server's fork running the command was killed: say so, as a failure."""
    click.echo(
        "error: the command ended without an exit code: the process of the command server "
        "(SHIPLANE_SERVER=1) that ran it was killed. `shiplane status` shows what the hosts "
        "run now.",
        err=True,
    )
    return 1


@click.group(cls=ShiplaneGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="shiplane")
@click.option(
    "--file",
    "-f",
    type=click.Path(dir_okay=False),
    help="The deploy file (default: ./shiplane.toml or a parent's).",
)
@click.option(
    "--verbose", "-v", is_flag=True, help="More detail (hook output, tracebacks of bugs)."
)
@click.pass_context
def main(ctx: click.Context, file: str | None, verbose: bool) -> None:
    """shiplane ships Python web apps from a checkout to servers, stage by stage."""
    ctx.obj = Context(file, verbose)


def _reporter(obj: Context, as_json: bool, verbose: bool | None = None) -> Reporter:
    """What renders a verb's events: JSON lines, a live view on a terminal, else plain lines."""
    from shiplane.ui import Reporter

    return Reporter.for_terminal(as_json, obj.masker, obj.verbose if verbose is None else verbose)


def emit_json(data: object, masker: Masker) -> None:
    """A verb's result with --json: one line, ``{"result": ..., "v": 1}`` (docs/json.md)."""
    click.echo(masker(json.dumps({"result": data, "v": JSON_VERSION}, default=str)))


# -- foundation verbs ---------------------------------------------------------------------------


@main.command()
@click.argument("directory", default=".", type=click.Path(file_okay=False))
@click.option("--name", help="Package name (default: from the directory name).")
@click.option("--force", is_flag=True, help="Overwrite an existing project's files.")
@json_option
@click.pass_obj
def init(obj: Context, directory: str, name: str | None, force: bool, as_json: bool) -> None:
    """Scaffold a working example app (Flask + SQLAlchemy + Alembic) with a shiplane.toml."""
    from shiplane.scaffold import write_project

    target = Path(directory)
    written = write_project(target, name=name, force=force)
    _finish(
        obj,
        {
            "ok": True,
            "directory": str(target.resolve()),
            "files": [str(p) for p in written],
            "lines": [
                f"wrote {len(written)} files into {target.resolve()}",
                f"next: cd {directory} && shiplane deploy --stage local",
            ],
        },
        as_json,
    )


@main.command()
@json_option
@click.pass_obj
def check(obj: Context, as_json: bool) -> None:
    """Validate shiplane.toml and every stage's config, offline."""
    from shiplane.commands.check import check_project
    from shiplane.ui import check_lines

    result = check_project(obj.file)
    lines = check_lines(result)
    if as_json:
        emit_json({**result.to_json(), "lines": lines}, obj.masker)
        return
    for line in lines:
        click.echo(obj.masker(line))


@main.group("config")
def config_group() -> None:
    """The app's layered config."""


@config_group.command("show")
@stage_option
@click.option(
    "--explain", is_flag=True, help="Show which layer set each key and which it overrode."
)
@json_option
@override_options
@click.pass_obj
def config_show(
    obj: Context,
    stage: str | None,
    explain: bool,
    as_json: bool,
    hosts: str | None,
    sets: tuple[str, ...],
) -> None:
    """The merged config of a stage; secrets masked."""
    from shiplane.commands.check import show_config

    result = show_config(obj.file, stage, obj.masker, hosts=hosts, sets=sets)
    if as_json:
        emit_json(result.explain() if explain else result.to_json(), obj.masker)
        return
    if explain:
        for row in result.explain():
            click.echo(
                obj.masker(f"{row['kind']:6} {row['key']} = {row['value']}    <- {row['layer']}")
            )
            for old in row["overrides"]:  # type: ignore[attr-defined]
                click.echo(obj.masker(f"{'':6}   overrode {old['value']!s} from {old['layer']}"))
        return
    from shiplane.config.formats import dump

    click.echo(obj.masker(dump(result.config, "ini")))
    if result.env:
        click.echo("# environment of services, hooks and tasks")
        click.echo(obj.masker(dump({"": result.env}, "env")))


@main.command()
@json_option
@click.pass_obj
def tasks(obj: Context, as_json: bool) -> None:
    """Show the task graph: pipeline steps and user tasks, with their dependencies."""
    from shiplane.commands.run import task_graph

    graph = task_graph(obj.file)
    if as_json:
        emit_json(graph.to_json(), obj.masker)
    else:
        click.echo(graph.render())


@main.command("run")
@click.argument("task")
@stage_option
@click.option("--force", is_flag=True, help="Rerun a once-only task (setup) deliberately.")
@override_options
@json_option
@click.pass_obj
def run_task(
    obj: Context,
    task: str,
    stage: str | None,
    force: bool,
    hosts: str | None,
    sets: tuple[str, ...],
    as_json: bool,
) -> None:
    """Run a user task with its dependencies (independent ones in parallel)."""
    from shiplane.commands.run import run_user_task

    # not entered: each task's output and outcome print as plain lines, --json or not
    run_user_task(
        obj.file,
        task,
        stage,
        obj.masker,
        _reporter(obj, False, verbose=True),
        verbose=obj.verbose,
        force=force,
        hosts=hosts,
        sets=sets,
    )
    if as_json:
        emit_json({"ok": True, "task": task}, obj.masker)


# -- build verbs --------------------------------------------------------------------------------


@main.command("test")
@json_option
@click.pass_obj
def test_gate(obj: Context, as_json: bool) -> None:
    """Run the test gate (build.test) in a venv made from the lock."""
    from shiplane.commands.build import run_test_gate

    with _reporter(obj, False, verbose=True) as reporter:
        run_test_gate(obj.file, reporter)
    _finish(obj, {"ok": True, "lines": ["test gate passed"]}, as_json)


def _build_verb(name: str, doc: str, step: str) -> None:
    @main.command(name, help=doc)
    @json_option
    @click.pass_obj
    def verb(obj: Context, as_json: bool) -> None:
        from shiplane.commands.build import build_artifact, compile_artifact

        with _reporter(obj, as_json) as reporter:
            if step == "compile":
                compiled = compile_artifact(obj.file, reporter)
            else:
                built = build_artifact(obj.file, reporter, step=step)
        if as_json:
            _finish(obj, compiled if step == "compile" else built, as_json)
        else:
            click.echo(built["digest"] if step != "compile" else compiled["summary"])


_build_verb(
    "build", "Build the artifact (app + wheelhouse + manifest); prints its digest.", "build"
)
_build_verb("compile", "The first half of build: the app's wheel or source tree.", "compile")
_build_verb("pack", "The second half of build: wheelhouse and manifest.", "pack")


@main.command()
@click.option(
    "--cache", is_flag=True, help="Also empty the per-user cache that every project shares."
)
@json_option
@click.pass_obj
def clean(obj: Context, cache: bool, as_json: bool) -> None:
    """Remove build output (.shiplane/build); with --cache also the per-user cache."""
    from shiplane.commands.build import clean_build

    removed = [str(path) for path in clean_build(obj.file, cache)]
    _finish(
        obj,
        {"ok": True, "removed": removed, "lines": [f"removed {path}" for path in removed]},
        as_json,
    )


# -- deploy verbs -------------------------------------------------------------------------------


def _deploy_options(func: F) -> F:
    func = click.option(
        "--artifact", help="Deploy this artifact digest (or unique prefix) instead of building."
    )(func)
    func = click.option(
        "--skip-tests", is_flag=True, help="Skip the test gate (recorded in the ledger)."
    )(func)
    func = click.option(
        "--parallel",
        type=click.IntRange(1, 256),
        default=16,
        show_default=True,
        help="Hosts worked on at once.",
    )(func)
    func = click.option(
        "--lock-wait",
        type=click.FloatRange(0),
        default=0.0,
        help="Wait this many seconds for a held deploy lock.",
    )(func)
    return func


def _retry_option(func: F) -> F:
    return click.option(
        "--retry-failed",
        is_flag=True,
        help="Finish the last failed deploy (same artifact, same release id) on the hosts that failed.",
    )(func)


@main.command()
@stage_option
@_deploy_options
@_retry_option
@click.option(
    "--ref",
    metavar="TAG|SHA|BRANCH",
    help="Build from that commit's files, not the working tree (the deploy file stays this checkout's).",
)
@click.option(
    "--require-clean",
    is_flag=True,
    help="Refuse (exit 2) to ship a working tree with uncommitted changes.",
)
@override_options
@json_option
@click.pass_obj
def deploy(
    obj: Context,
    stage: str | None,
    artifact: str | None,
    skip_tests: bool,
    parallel: int,
    lock_wait: float,
    retry_failed: bool,
    ref: str | None,
    require_clean: bool,
    hosts: str | None,
    sets: tuple[str, ...],
    as_json: bool,
) -> None:
    """The whole pipeline: gate, build, lock, copy, install, release, switch (each candidate verified), finalize."""
    _run_deploy(
        obj,
        as_json,
        stage=stage,
        artifact=artifact,
        skip_tests=skip_tests,
        parallel=parallel,
        lock_wait=lock_wait,
        hosts=hosts,
        sets=sets,
        retry_failed=retry_failed,
        ref=ref,
        require_clean=require_clean,
    )


def _run_deploy(obj: Context, as_json: bool, **options: Any) -> None:
    """``deploy`` and its partial verbs (``copy``, ``install``): the pipeline, shown live."""
    from shiplane.commands.deploy import run_deploy
    from shiplane.commands.deployment import DeployOptions
    from shiplane.ui import deploy_lines

    settings = DeployOptions(as_json=as_json, verbose=obj.verbose, **options)
    with _reporter(obj, as_json) as reporter:
        result = run_deploy(obj.file, settings, obj.masker, reporter)
    _finish(obj, {**result.to_json(), "lines": deploy_lines(result)}, as_json)


@main.command()
@stage_option
@override_options
@json_option
@click.pass_obj
def plan(
    obj: Context, stage: str | None, hosts: str | None, sets: tuple[str, ...], as_json: bool
) -> None:
    """Dry run: per host, what a deploy would change. Changes nothing anywhere."""
    from shiplane.commands.plan import run_plan
    from shiplane.ui import Reporter, plan_lines

    # not entered: on a terminal too, the build's events print as plain lines (only with -v)
    emit: Emit = (
        (lambda event: None) if as_json else Reporter.for_terminal(False, obj.masker, obj.verbose)
    )
    result = run_plan(obj.file, stage, obj.masker, emit, hosts=hosts, sets=sets)
    lines = plan_lines(result)
    if as_json:
        emit_json({**result.to_json(), "lines": lines}, obj.masker)
    else:
        for line in lines:
            click.echo(obj.masker(line))


@main.command()
@click.option(
    "--from", "from_stage", required=True, help="The stage whose live artifact is promoted."
)
@click.option("--to", "to_stage", required=True, help="The stage to deploy it to.")
@_deploy_options
@override_options
@json_option
@click.pass_obj
def promote(
    obj: Context,
    from_stage: str,
    to_stage: str,
    artifact: str | None,
    skip_tests: bool,
    parallel: int,
    lock_wait: float,
    hosts: str | None,
    sets: tuple[str, ...],
    as_json: bool,
) -> None:
    """Deploy to a stage the exact artifact that is live and healthy on another."""
    from shiplane.commands.deployment import DeployOptions
    from shiplane.commands.promote import run_promote
    from shiplane.ui import promote_lines

    if artifact:
        raise UsageError(
            "promote takes the artifact live on --from; use `deploy --artifact` to pick one"
        )
    if skip_tests:
        raise UsageError(
            "promote runs no test gate (the artifact passed it where it was built): drop --skip-tests"
        )
    options = DeployOptions(
        stage=to_stage,
        skip_tests=True,
        parallel=parallel,
        lock_wait=lock_wait,
        hosts=hosts,
        sets=sets,
        as_json=as_json,
        verbose=obj.verbose,
    )
    with _reporter(obj, as_json) as reporter:
        result = run_promote(obj.file, from_stage, options, obj.masker, reporter)
    rendered = {
        **result.deploy.to_json(),
        "lines": promote_lines(result),
        "promoted_from": result.promoted_from,
    }
    _finish(obj, rendered, as_json)


def _first_steps_verb(name: str, doc: str) -> None:
    @main.command(name, help=doc)
    @stage_option
    @_deploy_options
    @override_options
    @json_option
    @click.pass_obj
    def verb(
        obj: Context,
        stage: str | None,
        artifact: str | None,
        skip_tests: bool,
        parallel: int,
        lock_wait: float,
        hosts: str | None,
        sets: tuple[str, ...],
        as_json: bool,
    ) -> None:
        _run_deploy(
            obj,
            as_json,
            stage=stage,
            artifact=artifact,
            skip_tests=skip_tests,
            parallel=parallel,
            lock_wait=lock_wait,
            hosts=hosts,
            sets=sets,
            until=name,
        )


_first_steps_verb(
    "copy", "The first pipeline steps alone: gate, build, lock, send each host the blobs it lacks."
)
_first_steps_verb(
    "install",
    "Up to install: copy, then build the venv and unpack the release on every host (no switch).",
)


@main.command()
@stage_option
@click.option(
    "--to", "to_release", help="Release id to go back to (default: the previous good one)."
)
@click.option("--yes", is_flag=True, help="Confirm a rollback across releases that ran migrations.")
@override_options
@json_option
@click.pass_obj
def rollback(
    obj: Context,
    stage: str | None,
    to_release: str | None,
    yes: bool,
    hosts: str | None,
    sets: tuple[str, ...],
    as_json: bool,
) -> None:
    """Switch back to an earlier release: no reinstall, health-checked, zero-downtime."""
    from shiplane.commands.operate import run_rollback
    from shiplane.ui import rollback_lines

    with _reporter(obj, as_json) as reporter:
        result = run_rollback(
            obj.file, stage, to_release, yes, obj.masker, reporter, hosts=hosts, sets=sets
        )
    _finish(obj, {**result.to_json(), "lines": rollback_lines(result)}, as_json)


def _finish(obj: Context, result: Mapping[str, object], as_json: bool) -> None:
    """Print a verb's result (its ``lines``, or the JSON with --json); exit 1 unless ``ok``."""
    if as_json:
        emit_json(result, obj.masker)
    else:
        lines = [obj.masker(str(line)) for line in _lines(result)]
        if (
            sys.stdout.isatty()
        ):  # folded to the terminal's width: a wrapped line would break mid-word
            import shutil

            from shiplane.ui import fit_lines

            lines = fit_lines(lines, shutil.get_terminal_size().columns)
        for line in lines:
            click.echo(line)
    if result.get("outcome") == "interrupted":
        sys.exit(130)  # Ctrl-C or SIGTERM, handled: as any interrupted command
    if not result.get("ok", True):
        sys.exit(1)


def _lines(result: Mapping[str, object]) -> list[object]:
    lines = result.get("lines", [])
    return lines if isinstance(lines, list) else []


def _read_verb(name: str, doc: str) -> None:
    @main.command(name, help=doc)
    @stage_option
    @override_options
    @json_option
    @click.option("--limit", type=int, default=20, show_default=True, hidden=name != "history")
    @click.pass_obj
    def verb(
        obj: Context,
        stage: str | None,
        hosts: str | None,
        sets: tuple[str, ...],
        as_json: bool,
        limit: int,
    ) -> None:
        from shiplane.commands.operate import read_verb
        from shiplane.ui import read_lines

        result = read_verb(name, obj.file, stage, obj.masker, hosts=hosts, sets=sets, limit=limit)
        lines = read_lines(name, result)
        if as_json:
            emit_json({**result, "lines": lines}, obj.masker)
        else:
            for line in lines:
                click.echo(obj.masker(line))
        if not result.get("ok", True):
            sys.exit(1)


_read_verb(
    "status", "Services on every host of a stage: pid, state, uptime, release; drift flagged."
)
_read_verb("releases", "Releases on each host, with their state (live, previous, good, bad).")
_read_verb("history", "The deploy ledger: release, artifact, commit, who, when, outcome, duration.")


@main.command()
@stage_option
@override_options
@json_option
@click.pass_obj
def verify(
    obj: Context, stage: str | None, hosts: str | None, sets: tuple[str, ...], as_json: bool
) -> None:
    """Re-hash every blob in each host's store; quarantine any that no longer match (exit 1)."""
    from shiplane.commands.verify import run_verify
    from shiplane.ui import verify_lines

    result = run_verify(obj.file, stage, obj.masker, hosts=hosts, sets=sets)
    _finish(obj, {**result.to_json(), "lines": verify_lines(result)}, as_json)


def _service_verb(name: str, doc: str) -> None:
    @main.command(name, help=doc)
    @stage_option
    @click.option("--service", "services", multiple=True, help="Only this service (repeatable).")
    @click.option(
        "--all",
        "everything",
        is_flag=True,
        hidden=name != "stop",
        help="Also stop the supervisor and the front.",
    )
    @override_options
    @json_option
    @click.pass_obj
    def verb(
        obj: Context,
        stage: str | None,
        services: tuple[str, ...],
        everything: bool,
        hosts: str | None,
        sets: tuple[str, ...],
        as_json: bool,
    ) -> None:
        from shiplane.commands.operate import service_verb
        from shiplane.ui import service_lines

        result = service_verb(
            name,
            obj.file,
            stage,
            list(services),
            obj.masker,
            everything=everything,
            hosts=hosts,
            sets=sets,
        )
        _finish(obj, {**result, "lines": service_lines(name, result)}, as_json)


_service_verb("start", "Start the services of the live release on every host.")
_service_verb(
    "stop",
    "Stop the app's services on every host: the front, web and workers (--all: also the "
    "supervisor, and a private nginx).",
)
_service_verb("restart", "Restart the services on every host (the web service zero-downtime).")
_service_verb("reload", "Reload the services on every host.")


@main.command()
@stage_option
@click.option(
    "--keep", type=click.IntRange(2), help="Releases to keep (default: app.keep_releases)."
)
@override_options
@json_option
@click.pass_obj
def prune(
    obj: Context,
    stage: str | None,
    keep: int | None,
    hosts: str | None,
    sets: tuple[str, ...],
    as_json: bool,
) -> None:
    """Remove old releases (never the live, previous or newest good one)."""
    from shiplane.commands.operate import run_prune
    from shiplane.ui import prune_lines

    result = run_prune(obj.file, stage, keep, obj.masker, hosts=hosts, sets=sets)
    _finish(obj, {**result, "lines": prune_lines(result)}, as_json)


@main.command()
@stage_option
@click.option("--service", default=None, help="Only this service's log (web, front, or a worker).")
@click.option("--lines", "-n", type=int, default=50, show_default=True)
@click.option("--follow", is_flag=True, help="Keep printing new lines.")
@override_options
@json_option
@click.pass_obj
def logs(
    obj: Context,
    stage: str | None,
    service: str | None,
    lines: int,
    follow: bool,
    hosts: str | None,
    sets: tuple[str, ...],
    as_json: bool,
) -> None:
    """Service logs from every host, each line prefixed by its host."""
    from shiplane.commands.operate import show_logs

    def line(host: str, text: str) -> None:  # already masked
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "phase": "logs",
                        "status": "line",
                        "host": host,
                        "detail": text,
                        "v": JSON_VERSION,
                    }
                )
            )
        else:
            click.echo(f"[{host}] {text}")

    show_logs(obj.file, stage, service, lines, follow, obj.masker, line, hosts=hosts, sets=sets)
    if as_json:
        emit_json({"ok": True, "service": service or "web"}, obj.masker)


@main.command()
@click.argument("action", required=False, type=click.Choice(["status"]))
@stage_option
@click.option("--reason", help="Why the stage is held (shown to whoever tries to deploy).")
@override_options
@json_option
@click.pass_obj
def lock(
    obj: Context,
    action: str | None,
    stage: str | None,
    reason: str | None,
    hosts: str | None,
    sets: tuple[str, ...],
    as_json: bool,
) -> None:
    """Hold a stage for maintenance: every host's deploy lock, until `shiplane unlock`.
    `shiplane lock status` shows each host's lock: who, since when, why."""
    from shiplane.commands.operate import lock_stage, lock_status
    from shiplane.ui import lock_lines, lock_status_lines

    if action == "status":
        if reason:
            raise click.UsageError("--reason is for taking the lock, not for `lock status`")
        held = lock_status(obj.file, stage, obj.masker, hosts=hosts, sets=sets)
        _finish(obj, {**held, "lines": lock_status_lines(held)}, as_json)
        return
    taken = lock_stage(obj.file, stage, obj.masker, hosts=hosts, sets=sets, reason=reason)
    _finish(obj, {**taken, "lines": lock_lines(taken, reason)}, as_json)


@main.command()
@stage_option
@click.option(
    "--force", is_flag=True, help="Break a lock held by someone else (recorded in the ledger)."
)
@override_options
@json_option
@click.pass_obj
def unlock(
    obj: Context,
    stage: str | None,
    force: bool,
    hosts: str | None,
    sets: tuple[str, ...],
    as_json: bool,
) -> None:
    """Release your own `shiplane lock` on every host of a stage (--force: anyone's)."""
    from shiplane.commands.operate import unlock_stage
    from shiplane.ui import unlock_lines

    result = unlock_stage(obj.file, stage, force, obj.masker, hosts=hosts, sets=sets)
    _finish(obj, {**result, "lines": unlock_lines(result)}, as_json)


# -- host verbs ---------------------------------------------------------------------------------


@main.command()
@stage_option
@click.option(
    "--as",
    "as_user",
    metavar="USER",
    help="Log in as USER (root, or passwordless sudo) instead of the stage's setup_user.",
)
@override_options
@json_option
@click.pass_obj
def setup(
    obj: Context,
    stage: str | None,
    as_user: str | None,
    hosts: str | None,
    sets: tuple[str, ...],
    as_json: bool,
) -> None:
    """Prepare each host of a stage, idempotently: packages, the deploy user with your key, the
    deploy root it owns (logs in as root or a sudoer; deploys then need no root)."""
    from shiplane.commands.setup import run_setup
    from shiplane.ui import setup_lines

    result = run_setup(obj.file, stage, obj.masker, as_user=as_user, hosts=hosts, sets=sets)
    _finish(obj, {**result, "lines": setup_lines(result)}, as_json)


@main.command()
@stage_option
@override_options
@json_option
@click.pass_obj
def doctor(
    obj: Context, stage: str | None, hosts: str | None, sets: tuple[str, ...], as_json: bool
) -> None:
    """Check, read-only, that each host is ready for a deploy; say what is missing and the
    command that fixes it (exit 1)."""
    from shiplane.commands.setup import run_doctor
    from shiplane.ui import doctor_lines

    result = run_doctor(obj.file, stage, obj.masker, hosts=hosts, sets=sets)
    _finish(obj, {**result, "lines": doctor_lines(result)}, as_json)


# -- exec verbs ---------------------------------------------------------------------------------


def _exec_output(as_json: bool, masker: Masker) -> Callable[[str, str, str], None]:
    """Where a captured command's lines go: prefixed by their host, or as --json events; the
    stage's secrets masked, as in every output (a command attached to the terminal is not ours
    to read, so not masked)."""

    def out(host: str, stream: str, raw: str) -> None:
        text = masker(raw)
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "phase": "exec",
                        "status": "line",
                        "host": host,
                        "stream": stream,
                        "detail": text,
                        "v": JSON_VERSION,
                    }
                )
            )
        else:
            click.echo(f"{host}: {text}", err=stream == "stderr")

    return out


def _exec_finish(obj: Context, result: ExecResult, as_json: bool) -> None:
    """The command's exit code is ours; what exec itself says goes to stderr."""
    from shiplane.ui import exec_lines

    lines = exec_lines(result)
    if as_json:
        emit_json({**result.to_json(), "lines": lines}, obj.masker)
    for line in lines:
        click.echo(obj.masker(line), err=True)
    sys.exit(int(result.report["exit_code"]))


def _has_terminal() -> bool:
    return sys.stdin.isatty() and sys.stdout.isatty()


@main.command(
    "exec", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}
)
@stage_option
@click.option(
    "--host",
    "names",
    multiple=True,
    metavar="NAME",
    help="This host of the stage (repeatable; default: the primary).",
)
@click.option(
    "--all",
    "every",
    is_flag=True,
    help="Every host of the stage, at once (output prefixed by host).",
)
@override_options
@json_option
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def exec_verb(
    obj: Context,
    stage: str | None,
    names: tuple[str, ...],
    every: bool,
    hosts: str | None,
    sets: tuple[str, ...],
    as_json: bool,
    command: tuple[str, ...],
) -> None:
    """Run `-- COMMAND ARGS...` in the live release, as hooks run: its venv first on PATH, the stage's
    env and secrets, the release as working directory; interactive on a terminal; its exit code is
    shiplane's. Recorded in each host's ledger."""
    from shiplane.commands.exec import run_exec

    result = run_exec(
        obj.file,
        stage,
        command,
        obj.masker,
        out=_exec_output(as_json, obj.masker),
        names=names,
        every=every,
        tty=_has_terminal(),
        capture=as_json,
        hosts=hosts,
        sets=sets,
    )
    _exec_finish(obj, result, as_json)


@main.command()
@stage_option
@click.option(
    "--host", "name", metavar="NAME", help="This host of the stage (default: the primary)."
)
@override_options
@json_option
@click.pass_obj
def console(
    obj: Context,
    stage: str | None,
    name: str | None,
    hosts: str | None,
    sets: tuple[str, ...],
    as_json: bool,
) -> None:
    """The app's framework shell in the live release (Django's manage.py shell, Flask's flask shell), as exec runs it."""
    from shiplane.commands.exec import run_console

    result = run_console(
        obj.file,
        stage,
        obj.masker,
        out=_exec_output(as_json, obj.masker),
        names=(name,) if name else (),
        tty=_has_terminal(),
        capture=as_json,
        hosts=hosts,
        sets=sets,
    )
    _exec_finish(obj, result, as_json)


def run() -> None:  # pragma: no cover - console entry for `python -m shiplane`
    main(prog_name="shiplane")


if os.environ.get("SHIPLANE_NO_COLOR"):
    os.environ.setdefault("NO_COLOR", "1")
