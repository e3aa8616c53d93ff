"""The daemon backend: every service is a program of this root's supervisord (supervisor.py).

Programs: ``web-<release_id>`` per release, ``front`` (the builtin proxy) and one per worker, each
a conf file in ``run/programs``; the ``; shiplane: {...}`` comment on its first line tells
``status`` which service and release it is.
"""

from __future__ import annotations

import time

from . import spare
from . import supervisor as sv
from .backend import (
    JOBS_PROGRAM,
    Killed,
    ManagerState,
    ServiceStatus,
    ShutdownResult,
    WorkersResult,
    builtin_front,
    check_worker,
    exec_form,
    front_argv,
    front_listen,
    front_ready,
    graceful_timeout,
    gunicorn_argv,
    job_specs,
    make_wake,
    mark_proxy_protocol,
    poke,
    preboot_argv,
    proxy_marker,
    scheduler_argv,
    unlink_quiet,
    web_argv,
    web_gave_up,
    web_go,
    web_wake,
    worker_argv,
)
from .errors import AgentError
from .health import tail_lines
from .paths import Layout
from .protocol import Emit, ServicesSpec, WebSpec, WorkerSpec
from .runtime import read_meta

# EXITED is not dead: autorestart starts it again (a crash, a kill -9)
DEAD_STATES = {"FATAL", "STOPPED", "UNKNOWN"}
# gunicorn's own exit codes for a release that cannot serve (gunicorn/arbiter.py): retrying
# the same code cannot help, so the switch fails now instead of after the health timeout
FRONT_START_TIMEOUT = 15.0
# past any worker's stop_timeout (at most 3600 s, config/schema.py): supervisord KILLs before
WORKER_STOP_DEADLINE = 3600.0 + 60.0
GUNICORN_GAVE_UP = {3: "a worker failed to boot", 4: "the app failed to load"}


def web_program(release_id: str) -> str:
    return f"web-{release_id}"


def _log_options(layout: Layout, name: str) -> dict[str, object]:
    return {
        "redirect_stderr": True,
        "stdout_logfile": layout.log / f"{name}.log",
        "stdout_logfile_maxbytes": "50MB",
        "stdout_logfile_backups": 5,
    }


def _kept_running(
    layout: Layout, log: str, stop_signal: str, stop_wait: int, *, stop_group: bool | None
) -> dict[str, object]:
    """A program supervisord starts and restarts, stopped with ``stop_signal`` (to its whole
    group unless ``stop_group`` is False; None: to it alone, nothing said of the group), then
    killed after ``stop_wait`` seconds, its output in ``log/<log>.log``."""
    options: dict[str, object] = {
        "autostart": True,
        "autorestart": True,
        "startsecs": 1,
        "startretries": 3,
        "stopsignal": stop_signal,
        "stopwaitsecs": stop_wait,
    }
    if stop_group is not None:
        options.update(stopasgroup=stop_group, killasgroup=True)
    return {**options, **_log_options(layout, log)}


def web_options(layout: Layout, web: WebSpec) -> dict[str, object]:
    return _kept_running(layout, "web", "TERM", graceful_timeout(web) + 5, stop_group=True)


def web_conf(layout: Layout, release_id: str, web: WebSpec) -> str:
    """``web-<id>``: the release's gunicorn (through preboot.py unless ``preboot`` is off);
    supervisord restarts it if it crashes."""
    argv = preboot_argv(layout, release_id, web)
    meta: sv.ProgramMeta = {"service": "web", "release_id": release_id}
    if argv:
        meta["preboot"] = True
    return sv.program_conf(
        web_program(release_id),
        argv or web_argv(layout, release_id, web),
        web_options(layout, web),
        meta,
    )


def worker_conf(layout: Layout, name: str, worker: WorkerSpec | None, release_id: str) -> str:
    """A worker program with its stop signal and grace period (then supervisord KILLs it)."""
    stop_signal, stop_timeout = check_worker(name, worker)
    # the stop signal to the worker alone when it is exec-ed (it drains its own children: RQ's
    # work horse, Celery's pool), else to its whole group (the shell would not pass it on);
    # whatever is left at the end of the grace period is killed, group and all
    shell = exec_form(worker["command"] if worker else "") is None
    options = _kept_running(
        layout, name, stop_signal, max(1, round(stop_timeout)), stop_group=shell
    )
    meta: sv.ProgramMeta = {"service": name, "kind": "worker", "release_id": release_id}
    return sv.program_conf(
        sv.check_name(name), worker_argv(layout, name, worker, release_id), options, meta
    )


def scheduler_conf(layout: Layout) -> str:
    """The scheduler of the root's jobs (scheduler.py). Its runs are sessions of their own: a
    restart of the scheduler leaves them to finish (services.stop ends them)."""
    options = _kept_running(layout, JOBS_PROGRAM, "TERM", 10, stop_group=True)
    meta: sv.ProgramMeta = {"service": "jobs", "kind": "scheduler"}
    return sv.program_conf(JOBS_PROGRAM, scheduler_argv(layout), options, meta)


def front_conf(layout: Layout, spec: ServicesSpec) -> str | None:
    """The builtin front proxy program, or None when the spec asks for another front."""
    if not builtin_front(spec):
        return None
    options = _kept_running(layout, "front", "TERM", 15, stop_group=None)
    return sv.program_conf(
        "front", front_argv(layout, spec), options, {"service": "front", "kind": "front"}
    )


class DaemonBackend:
    """supervisord, started on demand (``prepare``) and driven over its socket."""

    name = "daemon"

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._sup: sv.Supervisor | None = None
        self._front_starting = False  # started by ensure_front(wait=False), not yet listening

    @property
    def sup(self) -> sv.Supervisor:
        if self._sup is None:
            self._sup = sv.ensure_running(self.layout)
        return self._sup

    def connected(self) -> sv.Supervisor | None:
        """A client when supervisord answers, without starting it."""
        if self._sup is None:
            self._sup = sv.connect(self.layout)
        return self._sup

    def prepare(self, spec: ServicesSpec | None, emit: Emit) -> None:
        self._sup = sv.ensure_running(self.layout, emit)

    def web_releases(self) -> set[str]:
        names = {n for n in sv.configured_programs(self.layout) if n.startswith("web-")}
        sup = self.connected()
        if sup is not None:
            names |= {str(i["name"]) for i in sup.all_info() if str(i["name"]).startswith("web-")}
        releases = {self._release_of(n) for n in names}
        return {r for r in releases if r}

    def _release_of(self, program: str) -> str | None:
        """The release a web program serves (None: a spare nobody adopted yet)."""
        if spare.is_spare(program):
            return sv.program_meta(self.layout, program).get("release_id") or None
        return program[len("web-") :]

    def _program(self, release_id: str) -> str:
        """The program serving ``release_id``: ``web-<id>``, or the spare it adopted."""
        own = web_program(release_id)
        if sv.program_conf_path(self.layout, own).exists():
            return own
        for name in sv.configured_programs(self.layout):
            if spare.is_spare(name) and self._release_of(name) == release_id:
                return name
        return own

    def web_state(self, release_id: str) -> tuple[bool, str | None]:
        info = self.sup.info(self._program(release_id))
        if info is None:
            return False, "not configured"
        if info["statename"] in DEAD_STATES:
            why = info.get("spawnerr") or f"exit status {info.get('exitstatus')}"
            return False, f"{info['statename']}: {why}"
        status = int(info.get("exitstatus") or 0)
        try:  # supervisord forgets the status of an exit before startsecs; preboot.py does not
            status = int(web_gave_up(self.layout, release_id).read_text())
        except (OSError, ValueError):
            pass
        gave_up = GUNICORN_GAVE_UP.get(status)
        if info["statename"] in ("BACKOFF", "EXITED", "STARTING") and gave_up:
            return False, f"gunicorn exited with status {status}: {gave_up}"
        return info["statename"] == "RUNNING", None

    def start_web(self, release_id: str, web: WebSpec, emit: Emit) -> None:
        mark_proxy_protocol(self.layout, release_id, web)
        go = web_go(self.layout, release_id)
        unlink_quiet(web_gave_up(self.layout, release_id))  # a verdict on an earlier start
        if not go.exists():
            go.parent.mkdir(parents=True, exist_ok=True)
            go.write_bytes(b"")
        poke(web_wake(self.layout, self._start(release_id, web, emit)))

    def preboot_web(self, release_id: str, web: WebSpec, emit: Emit) -> None:
        """Start the release's server (or have it adopt the spare); without its go file it
        loads only its libraries."""
        self._start(release_id, web, emit)

    def _start(self, release_id: str, web: WebSpec, emit: Emit) -> str:
        """Configure and start the release's program; returns its name."""
        name = self._program(release_id)
        if name == web_program(release_id) and not sv.program_conf_path(self.layout, name).exists():
            name = self._adopt(release_id, web, emit) or name
        if spare.is_spare(name):
            text = spare.conf(
                self.layout,
                name,
                str(sv.program_meta(self.layout, name).get("venv")),
                web_options(self.layout, web),
                release_id,
            )
        else:
            text = web_conf(self.layout, release_id, web)
        make_wake(web_wake(self.layout, name))
        if sv.write_program(self.layout, name, text):  # web settings changed since: restart it
            self.sup.update()
        self.sup.start(name, wait=False)
        return name

    def _adopt(self, release_id: str, web: WebSpec, emit: Emit) -> str | None:
        """Hand the spare of the release's venv to the release (None: there is none)."""
        digest = (read_meta(self.layout, release_id) or {}).get("dependency_digest")
        if not digest or not spare.wanted(web):
            return None
        for name in sv.configured_programs(self.layout):
            meta = sv.program_meta(self.layout, name)
            if not spare.is_spare(name) or meta.get("release_id") or meta.get("venv") != digest:
                continue
            info = self.sup.info(name)
            if info is None or info["statename"] not in ("RUNNING", "STARTING"):
                continue
            spare.claim(self.layout, name, release_id, gunicorn_argv(self.layout, release_id, web))
            sv.write_program(
                self.layout,
                name,
                spare.conf(self.layout, name, digest, web_options(self.layout, web), release_id),
            )
            poke(web_wake(self.layout, name))
            emit(
                {
                    "phase": "install",
                    "status": "spare",
                    "detail": f"{name} (libraries loaded) becomes {web_program(release_id)}",
                }
            )
            return name
        return None

    def keep_spare(self, release_id: str, web: WebSpec, emit: Emit) -> None:
        """After a switch: one spare nobody adopted, from the live release's venv (or none)."""
        digest = str((read_meta(self.layout, release_id) or {}).get("dependency_digest") or "")
        want = (
            spare.wanted(web)
            and bool(digest)
            and (self.layout.venv(digest) / "bin" / "python").exists()
        )
        kept = None
        for name in sv.configured_programs(self.layout):
            meta = sv.program_meta(self.layout, name)
            if not spare.is_spare(name) or meta.get("release_id"):
                continue
            if want and kept is None and meta.get("venv") == digest:
                kept = name
            else:  # another venv's (a dependency change), or preboot turned off
                self.sup.remove(name)
                unlink_quiet(web_wake(self.layout, name))
        if want and kept is None:
            name = spare.new_name()
            make_wake(web_wake(self.layout, name))  # before it starts: its files are all there
            sv.write_program(
                self.layout,
                name,
                spare.conf(self.layout, name, digest, web_options(self.layout, web)),
            )
            self.sup.update()
            self.sup.start(name, wait=False)

    def web_booted(self, release_id: str) -> bool:
        """Whether the server was let load the app (not a preboot still waiting for the switch)."""
        return self._booted(self._program(release_id))

    def _booted(self, program: str) -> bool:
        if not sv.program_meta(self.layout, program).get("preboot"):
            return True
        release = self._release_of(program)
        if not release:
            return False
        return web_go(self.layout, release).exists()

    def stop_web(self, release_id: str, emit: Emit, wait: bool = True) -> None:
        name = self._program(release_id)
        if not wait:
            self.sup.stop_nowait(name)
            return
        # removing the program stops it first: TERM, gunicorn's graceful shutdown, KILL after
        # stopwaitsecs
        self.sup.remove(name)
        unlink_quiet(web_go(self.layout, release_id))
        unlink_quiet(web_gave_up(self.layout, release_id))
        unlink_quiet(proxy_marker(self.layout, release_id))
        unlink_quiet(spare.claim_path(self.layout, name))
        unlink_quiet(web_wake(self.layout, name))

    def ensure_front(self, spec: ServicesSpec, emit: Emit, wait: bool = True) -> None:
        self._front_starting = False
        text = front_conf(self.layout, spec)
        if text is None:
            self.sup.remove("front")
            return
        changed = sv.write_program(self.layout, "front", text)
        if changed:
            self.sup.update()  # restarts it with the new conf
        info = self.sup.info("front")
        if info is None or info["statename"] not in ("RUNNING", "STARTING"):
            emit({"phase": "switch", "status": "front", "detail": "starting the front proxy"})
            self.sup.start("front", wait=False)
        elif not changed:
            return
        self._front_starting = True
        if wait:
            self.wait_front(spec)

    def wait_front(self, spec: ServicesSpec) -> None:
        if self._front_starting:
            self._wait_front_listening(spec)
            self._front_starting = False

    def _wait_front_listening(self, spec: ServicesSpec) -> None:
        """Return once the front just started listens; its port may be held by another program
        (which would then answer in its place), so that is an error naming the port."""
        deadline = time.monotonic() + FRONT_START_TIMEOUT
        while True:
            info = self.sup.info("front")
            try:
                listening = int(front_ready(self.layout).read_text())
            except (OSError, ValueError):
                listening = None
            if info is not None and info["pid"] and listening == info["pid"]:
                return
            gone = info is None or info["statename"] not in ("RUNNING", "STARTING")
            if gone or time.monotonic() > deadline:
                why = (tail_lines(self.layout.log / "front.log", 1) or ["no output"])[-1]
                raise AgentError(
                    f"the front proxy cannot serve {front_listen(spec)}: {why}", kind="front"
                )
            time.sleep(0.02)  # poll interval while the proxy starts

    def _stop_worker(self, name: str, emit: Emit) -> Killed | None:
        """Stop a running worker; a dict describing the kill when it outlived its grace."""
        info = self.sup.info(name)
        if info is None or not info.get("pid"):
            return None
        pid = int(info["pid"])
        started = time.monotonic()
        # polled, not one blocking RPC: a stop_timeout may be longer than the RPC's timeout
        self.sup.stop_nowait(name)
        deadline = started + WORKER_STOP_DEADLINE
        while time.monotonic() < deadline:
            info = self.sup.info(name)
            if info is None or info["statename"] not in ("STOPPING", "RUNNING", "STARTING"):
                break
            time.sleep(0.1)  # poll interval while the worker drains
        seconds = round(time.monotonic() - started, 3)
        # supervisord logs exactly this line when stopwaitsecs ran out (supervisor/process.py)
        mark = f"killing '{name}' ({pid}) with SIGKILL"
        if any(mark in line for line in tail_lines(self.layout.log / "supervisord.log", 200)):
            emit(
                {
                    "phase": "switch",
                    "status": "killed",
                    "detail": f"{name} (pid {pid}) did not stop within its grace period: killed",
                }
            )
            return {"service": name, "pid": pid, "seconds": seconds}
        return None

    def restart_workers(
        self, spec: ServicesSpec, release_id: str, emit: Emit, only: set[str] | None = None
    ) -> WorkersResult:
        workers = spec.get("workers") or {}
        killed: list[Killed] = []
        confs = {name: worker_conf(self.layout, name, w, release_id) for name, w in workers.items()}
        for name in sv.configured_programs(self.layout):
            if sv.program_meta(self.layout, name).get("kind") == "worker" and name not in workers:
                emit({"phase": "switch", "status": "worker", "detail": f"removing {name}"})
                gone = self._stop_worker(name, emit)
                killed += [gone] if gone else []
                self.sup.remove(name)
        changed = False
        for name, text in confs.items():
            if sv.write_program(self.layout, name, text):
                changed = True
                # stopped here, not inside update(), so a kill after the grace period is seen
                emit({"phase": "switch", "status": "worker", "detail": f"{name} on {release_id}"})
                gone = self._stop_worker(name, emit)
                killed += [gone] if gone else []
        # supervisord re-reads every program's file (its CPU, while the deploy waits): only
        # when a worker's changed or it does not run one yet
        if changed or any(self.sup.info(name) is None for name in workers):
            self.sup.update()
        for name in workers:
            if only is not None and name not in only:
                continue
            info = self.sup.info(name)
            if info is not None and info["statename"] not in ("RUNNING", "STARTING", "BACKOFF"):
                self.sup.start(name, wait=False)
        return {"workers": sorted(workers), "killed": killed}

    def ensure_jobs(self, spec: ServicesSpec, emit: Emit) -> list[str]:
        """The scheduler runs while the spec has jobs (it reads them from the saved spec each
        minute, so a change of jobs or of release needs no restart); removed when it has none."""
        jobs = job_specs(spec)
        if not jobs:
            if JOBS_PROGRAM in sv.configured_programs(self.layout):
                emit({"phase": "switch", "status": "jobs", "detail": "no jobs: scheduler removed"})
                self.sup.remove(JOBS_PROGRAM)
            return []
        if sv.write_program(self.layout, JOBS_PROGRAM, scheduler_conf(self.layout)):
            emit({"phase": "switch", "status": "jobs", "detail": f"scheduling {', '.join(jobs)}"})
            self.sup.update()
        info = self.sup.info(JOBS_PROGRAM)
        if info is not None and info["statename"] not in ("RUNNING", "STARTING", "BACKOFF"):
            self.sup.start(JOBS_PROGRAM, wait=False)
        return sorted(jobs)

    def stop(self, service: str, emit: Emit) -> list[str]:
        sup = self.connected()
        if sup is None:
            return []
        if service == "web":
            programs = sorted(
                {self._program(r) for r in self.web_releases()}
                | {n for n in sv.configured_programs(self.layout) if spare.is_spare(n)}
            )
        else:
            programs = [service]
        stopped = []
        for program in programs:
            if sup.info(program) is not None:
                emit({"phase": "services", "status": "stop", "detail": program})
                sup.stop(program)
                stopped.append(program)
        return stopped

    def signal_web(self, release_id: str, signame: str) -> None:
        self.sup.signal(self._program(release_id), signame)

    def status(self) -> list[ServiceStatus]:
        sup = self.connected()
        if sup is None:
            return []
        services: list[ServiceStatus] = []
        for info in sup.all_info():
            program = str(info["name"])
            meta = sv.program_meta(self.layout, program)
            running = info["statename"] == "RUNNING"
            services.append(
                {
                    "name": meta.get("service")
                    or ("web" if program.startswith("web-") else program),
                    "program": program,
                    "pid": info["pid"] or None,
                    "state": info["statename"],
                    "uptime": max(0, int(info["now"]) - int(info["start"])) if running else 0,
                    "release": meta.get("release_id")
                    or (self._release_of(program) if program.startswith("web-") else None),
                }
            )
            if program.startswith("web-"):  # started during an install, waiting for its switch?
                services[-1]["preboot"] = not self._booted(program)
        return services

    def running(self) -> ManagerState:
        sup = self.connected()
        return {
            "running": sup is not None,
            "pid": sv.read_pid(self.layout) if sup is not None else None,
        }

    def shutdown(self) -> ShutdownResult:
        """``stopped`` is for services.shutdown to name: supervisord stopped every program."""
        down = sv.shutdown(self.layout)
        return {"supervisord_pid": down["supervisord_pid"], "stopped": []}

    def log_command(self, service: str) -> list[str] | None:
        return None
