"""The launch path every command shares: guard -> sweep -> spawn -> verify -> supervise.

`run` serves `tlrun worker`, `tlrun dev` (with reload, beat, a managed broker) and `tlrun beat`; debug mode
hands over to debug.py after the same guard and sweep.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlrun import redact
from tlrun.config import Role, Settings
from tlrun.deploy.restart import RestartPolicy, RestartSettings
from tlrun.dev import brokerd
from tlrun.dev.reload import Watcher
from tlrun.dev.worker_entry import DEV_POLL_ENV
from tlrun.errors import (
    AppImportError,
    BrokerError,
    DuplicateNodeError,
    LockHeldError,
    RestartGiveUpError,
    StopError,
    UsageError,
    WorkerStartError,
)
from tlrun.events import Exited, Notice, Ready, Reloaded, Reporter, Spawned, StrayFound, WorkerOutput
from tlrun.launch import drain, guard, logfiles, pid1, procs, signals, spawn, sweep, verify
from tlrun.launch.broker import Broker, check_reachable, resolve_broker
from tlrun.launch.hold import Hold
from tlrun.launch.outputs import Outputs
from tlrun.launch.supervise import Supervisor, requeue_margin
from tlrun.ops import consuming

if TYPE_CHECKING:
    from tlrun.cluster.lease import BeatLease
    from tlrun.ops import metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchOptions:
    worker: bool = True
    beat: bool = False
    reload: bool = False
    managed_broker: bool = False  # start a private redis-server when nothing answers (dev)
    debug: bool = False  # run the worker inside this process (dev --debug)
    restart: RestartSettings | None = None  # restart a crashed worker with backoff (worker --restart)
    fast_stop: bool = False  # stop an idle worker by draining it, then SIGKILL (dev's default; worker --fast-stop)
    dev_poll: bool = False  # 0.1 s transport poll on Redis, where the app sets none (dev)
    init: bool = False  # --init: reap orphans and (Linux) be a subreaper, as PID 1 does
    consume_check: bool = False  # check periodically that the workers consume their queues (tlrun worker)
    metrics_port: int | None = None  # serve Prometheus metrics here (tlrun worker --metrics-port)
    metrics_addr: str = "0.0.0.0"
    is_pid1: bool = field(default_factory=pid1.is_pid1)  # a container's PID 1: also logs to stdout by default

    @property
    def init_duties(self) -> bool:
        return self.init or self.is_pid1

    @property
    def held_workers(self) -> bool:
        """Workers start through tlrun's entry module, held until released (prepared reloads; the entry
        reports the transport's poll interval, which the fast stop needs)."""
        return self.fast_stop or self.dev_poll


def celery_version() -> tuple[int, ...]:
    """The installed Celery's version, without importing Celery."""
    from importlib.metadata import version

    parts = []
    for piece in version("celery").split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        parts.append(int(digits or 0))
    return tuple(parts)


def lock_path(settings: Settings, kind: str) -> Path:
    return guard.lock_path(settings.project_id, kind, socket.gethostname())


def beat_schedule_path(settings: Settings) -> Path:
    return guard.runtime_dir(os.environ) / f"{settings.project_id}.celerybeat-schedule"


def _stop_holder(holder: procs.Identity, report: Reporter, replaced: list[procs.Identity]) -> None:
    """--replace: ask the launcher holding the lock for a graceful stop (it stops its own worker)."""
    proc = signals.launcher_for(holder)
    if proc is None:
        raise LockHeldError(
            f"the lock names pid {holder.pid}, which is gone, reused, or not a tlrun launcher: not stopping it",
            hint="the real holder is still alive; find it with `tlrun ps`",
        )
    report(Notice(f"--replace: asking launcher pid {holder.pid} to stop"))
    signals.send(proc, signal.SIGTERM)
    replaced.append(holder)


def _local_nodes(app: str) -> dict[str, list[int]]:
    return procs.pids_by_node(procs.main_processes(procs.scan(("worker",))), app)


BANNER = " -------------- "  # the first line of a worker's start-up banner: it imported the app

_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def start_failure(app: str, ready_timeout: float, status: int | None, tail: list[str], timeout: bool) -> Exception:
    """Turn a worker that never answered into the error that explains it."""
    text = "\n".join(tail)
    if (
        status == 2
        and "Unable to load celery application" not in text
        and ("No such option" in text or "Usage:" in text)
    ):
        # Celery's command line refused an argument tlrun passed through (`tlrun worker -- --bogus`).
        reason = next((ln.strip() for ln in reversed(tail) if ln.strip().startswith("Error:")), "a bad argument")
        return UsageError(f"celery worker refused its arguments: {reason.removeprefix('Error: ')}")
    if "Unable to load celery application" in text or (status == 2 and "Error" in text):
        reason = next(
            (ln.strip() for ln in reversed(tail) if ln.strip() and not ln.startswith(("Usage:", "Try "))),
            "unknown error",
        )
        # The innermost frame of the traceback that is not Python's own import machinery: the user's line.
        frames = [m.groups() for m in _FRAME.finditer(text) if "<frozen" not in m.group(1)]
        where = f" ({frames[-1][0]}, line {frames[-1][1]})" if frames else ""
        return AppImportError(f"app {app!r} does not import: {reason}{where}", details=tuple(tail))
    if timeout:
        return WorkerStartError(
            f"the worker did not answer a ping within {ready_timeout:g} s",
            hint="raise --ready-timeout, or read the log: " + (tail[-1] if tail else "(empty)"),
        )
    return WorkerStartError(f"the worker exited with status {status} before it answered a ping")


def check_app_module(settings: Settings) -> None:
    """The app's top-level module exists where the worker will look (the project root, then sys.path).
    Nothing is imported or run: a package's code runs only in the worker (or when the broker comes from it)."""
    import importlib.util

    top = settings.app.split(":", 1)[0].split(".", 1)[0]
    root = str(settings.project_root)
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise AppImportError(
            f"app {settings.app!r} does not import: no module named {top!r} in the project root {root}",
            hint="run tlrun from the project's root directory, or pass --project-dir",
        )


UNSHAREABLE_SCHEMES = ("memory",)


def refuse_unshareable(url: str) -> None:
    """A broker that lives inside one process cannot be shared by a launcher and its worker."""
    scheme = url.split("://", 1)[0].split("+")[-1].lower()
    if scheme in UNSHAREABLE_SCHEMES:
        raise BrokerError(
            f"broker {scheme}:// lives inside one process: the worker and tlrun cannot share it",
            hint="use a Redis or RabbitMQ URL (tlrun dev starts a private redis-server when none answers)",
        )


class RoleWorker:
    """One role's worker under this launcher: its node name, its lock, its supervised child and log."""

    def __init__(self, role: Role, hostname: str, restart: RestartSettings | None) -> None:
        self.role = role
        self.hostname = hostname
        self.child = f"worker:{role.name}"  # its name in the Supervisor
        self.node = spawn.node_name(role.node_prefix, os.getpid(), hostname)
        self.renamed_from: str | None = None
        self.policy = RestartPolicy(restart) if restart is not None else None
        self.poll_interval: float | None = None  # its transport's poll interval on Redis, when known
        self.since = ""  # when the running worker became ready (for "the worker of 10:42:07")
        self.not_consuming_recorded = False  # its lock record names queues it does not consume
        # For the metrics endpoint:
        self.last_exit_code: int | None = None
        self.ready_seconds: float | None = None
        self.stop_seconds: float | None = None
        self.not_consuming: tuple[str, ...] = ()

    @property
    def lock_kind(self) -> str:
        return self.role.lock_kind

    @property
    def label(self) -> str:
        """`worker`, or `reports worker` for a role of the project file."""
        return f"{self.role.name} worker" if self.role.declared else "worker"

    def rename(self, taken: set[str]) -> str:
        """Come back under a name nobody answers to: `api4242-1@host`."""
        self.renamed_from = self.node
        self.node = spawn.unique_node_name(self.role.node_prefix, os.getpid(), self.hostname, taken)
        return self.node


class Session:
    """One launcher's children and their output, from the first spawn to the last reap."""

    def __init__(self, settings: Settings, report: Reporter, sup: Supervisor, opts: LaunchOptions) -> None:
        self.s = settings
        self.report = report
        self.sup = sup
        self.opts = opts
        self.hostname = socket.gethostname()
        roles = settings.roles if opts.worker else ()
        self.workers = [RoleWorker(role, self.hostname, opts.restart) for role in roles]
        self.broker_url = ""
        self._private_argv: list[str] | None = None
        # As a container's PID 1, stdout is the log (the runtime collects it) unless a log directory is set.
        self.log_dir = None if opts.is_pid1 and not settings.log_dir_given else settings.log_dir
        self.outputs = Outputs(
            self.log_dir,
            lambda label, line: report(WorkerOutput(label, line)),
            lambda msg: report(Notice(msg, "warning")),
            lambda: [
                *redact.secrets_of(self.broker_url),
                *redact.secrets_of(settings.broker_url),
                *redact.registered(),
            ],
        )
        self.census: list[str] | verify.Census[list[str]] | None = None
        self.watcher: Watcher | None = None
        self.lease: BeatLease | None = None  # the cluster's beat lease (beat runs only while it is held)
        self.consume_watch: consuming.Watch | None = None
        self._stuck: dict[str, list[consuming.NotConsuming]] = {}  # verdicts for the supervise loop
        self._stopping = False  # a deferred stop request has been acted on
        self._spares: dict[str, tuple[str, Hold]] = {}  # role -> its spare's child name and hold (dev --reload)
        self._locks: dict[str, tuple[guard.ProjectLock, dict[str, Any]]] = {}

    # -- guard ---------------------------------------------------------------------------------------
    def take_locks(self, stack: contextlib.ExitStack) -> None:
        note = guard.check_env_guard(os.environ)
        if note is not None:
            self.report(Notice(note.message, "warning"))
        base = {
            "pid": os.getpid(),
            "create_time": procs.Identity.of_self().create_time,
            "app": self.s.app,
            "project_root": str(self.s.project_root),
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        wanted = [(w.lock_kind, {"role": w.role.name, "node": w.node}, f"a {w.label}") for w in self.workers]
        if self.opts.beat:
            wanted.append(("beat", {}, "a beat"))
        replaced: list[procs.Identity] = []
        for kind, fields, noun in wanted:
            what = f"{noun} of app {self.s.app} in {self.s.project_root}"
            replace = (lambda holder: _stop_holder(holder, self.report, replaced)) if self.s.replace else None
            lock = guard.acquire(lock_path(self.s, kind), what, replace, wait=self.s.stop_grace + signals.KILL_WAIT + 5)
            stack.enter_context(lock)
            record = {**base, **fields}
            lock.write(record)
            self._locks[kind] = (lock, record)
        # A replaced launcher lets go of its locks just before it exits: let it finish exiting.
        deadline = time.monotonic() + signals.KILL_WAIT
        while any(h.is_alive() for h in replaced) and time.monotonic() < deadline:
            time.sleep(0.05)
        roles = None if self.s.role_filter is None else [r.name for r in self.s.roles]
        what = f"{wanted[0][2] if wanted else 'a launcher'} of app {self.s.app} in {self.s.project_root}"
        guard.check_no_other_launcher(
            self.s.project_root, self.s.app, roles if self.workers else [], self.opts.beat, self.s.beat, what
        )

    def mark_in_process(self, node: str) -> None:
        """Debug mode: this process is the worker. Its lock records say so, so that ps, health and doctor
        find it (no `celery worker` command line shows it in the process table)."""
        for w in self.workers:
            self._update_record(w.lock_kind, node=node, worker_pid=os.getpid(), in_process=True)

    def _update_record(self, kind: str, **fields: Any) -> None:
        if kind in self._locks:
            lock, record = self._locks[kind]
            record.update(fields)
            lock.write(record)

    # -- validation and broker ---------------------------------------------------------------------
    def validate(self) -> None:
        """Everything that can fail, before anything is stopped (--replace, the sweep) or started: the log
        directory, the app's module, the broker (resolved, and answering unless a private one is planned)."""
        if self.log_dir is not None:
            logfiles.check_log_dir(self.log_dir)
        check_app_module(self.s)
        choice = resolve_broker(self.s)
        url = choice.url
        refuse_unshareable(url)
        if self.opts.managed_broker:
            if choice.source == "default":  # nothing configured anywhere: the local Redis of a laptop
                url = brokerd.DEFAULT_DEV_BROKER
            self._private_argv = brokerd.plan_private_redis(url, guard.runtime_dir(os.environ))
        self.broker_url = url
        if self._private_argv is None:
            check_reachable(url)

    def start_broker(self) -> None:
        """The private redis-server planned by validate(), now that the project's lock is ours."""
        if self._private_argv is None:
            return
        url = self.broker_url
        pid = brokerd.start_private(self.sup, self.outputs, url, self._private_argv, guard.runtime_dir(os.environ))
        address = brokerd.local_redis_address(url) or ("?", 0)
        self.report(
            Notice(
                f"no broker answered at {address[0]}:{address[1]}: started a private redis-server "
                f"(pid {pid}, no persistence) for this session; it stops on exit"
            )
        )
        check_reachable(url)

    # -- sweep ---------------------------------------------------------------------------------------
    def sweep(self) -> None:
        kinds = (["worker", procs.LEFTOVER] if self.workers else []) + (["beat"] if self.opts.beat else [])
        if not self.s.sweep or not kinds:
            return
        result = sweep.sweep(
            self.s.project_id,
            self.s.app,
            self.s.project_root,
            self.s.stop_grace,
            kinds=kinds,
            roles=[w.role for w in self.workers],
            on_found=lambda stray: self.report(StrayFound(stray)),
            on_step=lambda msg: self.report(Notice(msg)),
        )
        if result.survivors:
            raise StopError(f"stray process(es) survived SIGKILL: {', '.join(map(str, result.survivors))}")

    # -- spawn and verify ----------------------------------------------------------------------------
    def start_census(self) -> None:
        self.census = verify.Census(self.broker_url, self.s.ping_window).start()

    def _spawn(self, w: RoleWorker, name: str | None = None, hold: Hold | None = None, announce: bool = True) -> None:
        name = name or w.child
        module = "tlrun.dev.worker_entry" if hold is not None else "celery"
        argv = spawn.worker_argv(self.s.app, w.role.worker, w.node, module=module)
        env = spawn.worker_env(self.s, w.node, procs.Identity.of_self(), self.broker_url, w.role.name)
        if hold is not None:
            env.update(hold.env(), **({DEV_POLL_ENV: "1"} if self.opts.dev_poll else {}))
        fds = (hold.child_fd,) if hold is not None else ()
        stem = f"celery_{w.role.log_stem}_{os.getpid()}"
        env.update(self.outputs.child_env(stem))
        child = self.sup.start(name, argv, env, self.s.project_root, pass_fds=fds, requeue=True)
        if hold is not None:
            hold.spawned()
        log_path = self.outputs.attach(name, child, stem, label=w.node, hold_until=BANNER)
        if announce:
            self.report(Spawned("worker", w.node, child.pid, log_path, tuple(argv)))

    def spawn_spares(self) -> None:
        """tlrun dev --reload: one spare per role, with Celery imported and the app not yet, waiting for the
        next save (a save then costs only the import of the new code)."""
        if self.watcher is None or not self.opts.held_workers or self.sup.stop_requested:
            return
        for w in self.workers:
            if w.role.name not in self._spares:
                name, hold = f"{w.child}+spare", Hold(spare=True)
                self._spawn(w, name, hold, announce=False)
                self._spares[w.role.name] = (name, hold)

    def _take_spare(self, w: RoleWorker) -> tuple[str, Hold] | None:
        """The role's spare, told to import the app now; None when there is none (or it died)."""
        spare = self._spares.pop(w.role.name, None)
        if spare is None:
            return None
        name, hold = spare
        if self.sup.running(name) and hold.load():
            return spare
        hold.close()
        self._end(name)
        return None

    def _end(self, name: str, settle: float = 0.0) -> tuple[int | None, tuple[str, ...]]:
        """End a child that never connected (a spare, a prepared worker): SIGKILL is safe, it holds nothing.
        With `settle`, first give it that long to exit on its own (to print why its app did not import).
        Returns its status and its last lines."""
        deadline = time.monotonic() + settle
        while self.sup.running(name) and time.monotonic() < deadline:
            time.sleep(0.05)
        code = self.sup.kill(name) if self.sup.running(name) else self.sup.reap(name)
        return code, self.outputs.detach(name)

    def _drop_spare(self, name: str) -> bool:
        """A spare exited (killed at a stop, or it died): forget it; the next reload starts afresh."""
        for role, (spare, hold) in list(self._spares.items()):
            if spare == name:
                hold.close()
                del self._spares[role]
                return True
        return name.endswith("+spare")

    def _stop_workers(self, workers: list[RoleWorker]) -> None:
        stopping = time.monotonic()
        self.sup.stop_each([w.child for w in workers])
        for w in workers:
            w.stop_seconds = round(time.monotonic() - stopping, 3)
        for w in workers:
            self.outputs.detach(w.child)

    def _stop_drained(self, workers: list[RoleWorker], why: str, announce: bool = False) -> int:
        """Stop workers the fastest safe way: an idle one drained through the broker and killed (with
        fast stop), any other with the warm ladder. Says in one line which way each went; returns the first
        non-zero status of a warm stop (a drained worker counts as a clean stop)."""
        warm, status = [], 0
        for w in workers:
            if not self.sup.running(w.child):
                continue
            if not self.opts.fast_stop:
                warm.append(w)
                continue
            started = time.monotonic()
            drained = drain.drain(self.broker_url, w.node, w.poll_interval)
            if drained.ok:
                self.sup.kill(w.child)
                self.outputs.detach(w.child)
                self.report(
                    Notice(f"{why}: {w.node} was idle: drained and stopped in {time.monotonic() - started:.2f} s")
                )
                if announce:
                    self.report(Exited(w.node, 0, True))
            else:
                self.report(Notice(f"{why}: {w.node} gets the warm stop ladder ({drained.why})"))
                warm.append(w)
        self.sup.begin_stop([w.child for w in warm])
        for w in warm:
            code = self.sup.reap(w.child) or 0
            self.outputs.detach(w.child)
            status = status or code
            if announce:
                self.report(Exited(w.node, code, True))
        return status

    def _spawn_and_wait(self, workers: list[RoleWorker], started: float) -> bool:
        """Spawn the workers, then wait for each one's first pong; False when a stop was asked meanwhile.
        A worker that never answers stops the others started with it and raises the error that explains it."""
        holds = {w.child: Hold() for w in workers} if self.opts.held_workers else {}
        for w in workers:
            self._spawn(w, hold=holds.get(w.child))
        if self.census is None:
            # Right after the spawn, so that importing Celery overlaps the worker's own start-up. The new
            # worker cannot answer it: it subscribes to its mailbox only after its own imports (> 0.3 s).
            self.start_census()
        deadline = time.monotonic() + self.s.ready_timeout
        for w in workers:
            hold = holds.get(w.child)
            if hold is not None:
                if hold.wait_prepared(deadline, functools.partial(self._alive, w.child)):
                    w.poll_interval = hold.poll_interval
                    hold.release()
                else:
                    hold.close()  # a worker not prepared in time ends unconnected; its failure is reported below
            elif self.broker_url.startswith(("redis://", "rediss://")):
                w.poll_interval = drain.CELERY_POLL_INTERVAL
        with Broker(self.broker_url) as broker:
            for w in workers:
                ok = verify.wait_ready(
                    broker, w.node, deadline, functools.partial(self.sup.running, w.child), self._stop_asked
                )
                if self.sup.stop_requested:
                    return False
                if ok:
                    self.outputs.release(w.child)
                    w.since = datetime.now().strftime("%H:%M:%S")
                else:
                    timed_out = self.sup.running(w.child)
                    status = self.sup.stop(w.child) if timed_out else self.sup.reap(w.child)
                    tail = list(self.outputs.detach(w.child))
                    self._stop_workers([o for o in workers if o is not w])
                    raise start_failure(self.s.app, self.s.ready_timeout, status, tail, timed_out)
        return True

    def _alive(self, name: str) -> bool:
        return self.sup.running(name) and not self.sup.stop_requested

    def _stop_asked(self) -> bool:
        return self.sup.stop_requested

    def start_workers(
        self, workers: list[RoleWorker], started: float, allow_rename: bool = True
    ) -> verify.ReadyReport | None:
        """Spawn and verify `workers`; the report covers every worker of this launcher. None: stop asked."""
        if not self._spawn_and_wait(workers, started):
            return None
        census = self.census
        assert census is not None
        replies = self.census = census if isinstance(census, list) else census.result(lambda: self.sup.stop_requested)
        taken = [w for w in workers if w.node in replies] if allow_rename else []
        if taken:
            # A worker elsewhere already answers to our name: stop ours and come back under a unique one.
            self._stop_workers(taken)
            for w in taken:
                old = w.node
                self.report(
                    Notice(
                        f"node name {old} already answers on the broker: restarting as {w.rename(set(replies))}",
                        "warning",
                    )
                )
            if not self._spawn_and_wait(taken, started):
                return None
        for w in workers:
            self._update_record(w.lock_kind, node=w.node, worker_pid=self.sup.pid(w.child))
            w.ready_seconds = round(time.monotonic() - started, 3)
        ours = {w.node for w in self.workers}
        others = [name for name in replies if name not in ours]
        nodes = [
            verify.ReadyNode(w.role.name, w.node, self.sup.pid(w.child) or 0, renamed_from=w.renamed_from)
            for w in self.workers
            if self.sup.running(w.child)
        ]
        return verify.build_report(
            nodes,
            time.monotonic() - started,
            replies,
            self.s.expected_workers,
            _local_nodes(self.s.app) if others else {},
        )

    # -- beat: one per cluster, through the broker's lease ------------------------------------------
    def begin_beat(self) -> None:
        """Take the cluster's beat lease and start beat, or stand by (the supervise loop retries)."""
        from tlrun.cluster.lease import BeatLease, Holder, backend_for, lease_name

        try:
            backend = backend_for(self.broker_url, lease_name(self.s.app, self.s.project_name), self.s.beat_lock_ttl)
        except ValueError as exc:
            self.report(Notice(f"{exc}: beat runs without a cluster-wide lease", "warning"))
            self.start_beat()
            return
        self.lease = BeatLease(backend, Holder.new(os.getpid(), self.hostname), self.s.beat_lock_ttl)
        self._lease_tick()

    def _lease_tick(self) -> None:
        if self.lease is None or self.sup.stop_requested:
            return
        change = self.lease.tick(time.monotonic())
        if change.message:
            self.report(Notice(change.message, "warning" if change.action == "stop" else "info"))
        if change.action == "start":
            self._update_record("beat", beat_lease="held")
            self.start_beat()
        elif change.action == "stop":
            self._update_record("beat", beat_lease="lost", beat_pid=None)
            self.sup.stop("beat", grace=self.lease.margin / 2)
            self.outputs.detach("beat")
        elif change.action == "standby":
            self._update_record("beat", beat_lease="standby")

    def end_beat(self) -> None:
        if self.lease is not None:
            self.lease.release()

    def start_beat(self) -> None:
        argv = spawn.beat_argv(self.s.app, beat_schedule_path(self.s), self.s.roles[0].worker.loglevel)
        env = spawn.worker_env(self.s, "beat", procs.Identity.of_self(), self.broker_url)
        stem = f"celery_beat_{os.getpid()}"
        env.update(self.outputs.child_env(stem))
        child = self.sup.start("beat", argv, env, self.s.project_root)
        log_path = self.outputs.attach("beat", child, stem)
        self._update_record("beat", beat_pid=child.pid)
        self.report(Spawned("beat", "beat", child.pid, log_path, tuple(argv)))

    def verdict(self, ready: verify.ReadyReport) -> None:
        for node in ready.duplicated:
            raise DuplicateNodeError(f"{node.replies} workers answer as {node.node}: node names must be unique")
        self.report(Ready(ready))
        if self.s.strict and not ready.as_expected:
            raise DuplicateNodeError(f"--strict: {ready.answering} workers answer, expected {self.s.expected_workers}")

    # -- supervise -----------------------------------------------------------------------------------
    def _wake(self) -> bool:
        if self.sup.stop_requested:
            return not self._stopping or not self.sup.has_running()
        self._lease_tick()
        if self.consume_watch is not None:
            self._stuck.update(self.consume_watch.take())
            if self._stuck:
                return True
        return self.watcher is not None and self.watcher.pending()

    # -- a worker that answers pings but does not consume --------------------------------------------
    def start_consume_watch(self) -> None:
        """tlrun worker: check every `consume_check_every` seconds that each worker consumes its queues."""
        if not (self.opts.consume_check or self.opts.metrics_port is not None) or not self.workers:
            return

        def targets() -> list[tuple[str, list[str]]]:
            return [
                (w.node, consuming.wanted_queues(w.role.queue_set)) for w in self.workers if self.sup.running(w.child)
            ]

        self.consume_watch = consuming.Watch(
            self.broker_url,
            targets,
            self.s.consume_check_every,
            self.s.stuck_after,
            sample=self.opts.metrics_port is not None,
            queue_owner=self._holds_queue_metrics if self.opts.metrics_port is not None else None,
        ).start()

    def _holds_queue_metrics(self) -> bool:
        """celery_queue_length comes from the host holding the beat lease only (hosts would repeat it)."""
        from tlrun.cluster.lease import backend_for, lease_name

        if self.lease is not None:
            return self.lease.held
        try:
            backend = backend_for(self.broker_url, lease_name(self.s.app, self.s.project_name), self.s.beat_lock_ttl)
        except ValueError:
            return False
        try:
            holder = backend.current()
        except OSError:
            return False
        finally:
            backend.close()
        return holder is not None and holder.host == self.hostname

    # -- metrics ---------------------------------------------------------------------------------------
    def start_metrics(self, stack: contextlib.ExitStack) -> None:
        port = self.opts.metrics_port
        if port is None:
            return
        from tlrun.ops import metrics

        try:
            server = metrics.serve(port, self.opts.metrics_addr, self.metrics_sample)
        except OSError as exc:
            raise UsageError(
                f"cannot serve metrics on {self.opts.metrics_addr}:{port}: {exc.strerror or exc}",
                hint="choose another --metrics-port",
            ) from None
        stack.callback(server.shutdown)
        self.report(Notice(f"metrics on http://{self.opts.metrics_addr}:{port}/metrics"))

    def metrics_sample(self) -> metrics.LauncherSample:
        from tlrun.ops import metrics

        watch = self.consume_watch
        states, lengths = watch.latest() if watch is not None else ({}, {})
        samples = []
        for w in self.workers:
            pid = self.sup.pid(w.child) if self.sup.running(w.child) else None
            state = states.get(w.node)
            pool_running, rss = _pool_and_rss(pid)
            samples.append(
                metrics.WorkerSample(
                    node=w.node,
                    role=w.role.name,
                    up=pid is not None and w.ready_seconds is not None,
                    tasks_active=state.active if state is not None else None,
                    restarts=w.policy.restarts if w.policy is not None else 0,
                    last_exit_code=w.last_exit_code,
                    ready_seconds=w.ready_seconds,
                    stop_seconds=w.stop_seconds,
                    pool_expected=_pool_expected(w.role),
                    pool_running=pool_running,
                    rss_bytes=rss,
                    not_consuming=w.not_consuming,
                )
            )
        held = self.lease.held if self.lease is not None else None
        return metrics.LauncherSample(tuple(samples), dict(lengths), held)

    def act_on_stuck(self) -> None:
        verdicts, self._stuck = self._stuck, {}
        for node, found in verdicts.items():
            w = next((w for w in self.workers if w.node == node), None)
            if w is None:
                continue
            w.not_consuming = tuple(nc.queue for nc in found)
            if found or w.not_consuming_recorded:
                self._update_record(w.lock_kind, not_consuming=[nc.as_dict() for nc in found])
                w.not_consuming_recorded = bool(found)
            if not found:
                continue
            for nc in found:
                self.report(Notice(nc.message(), "warning"))
            if w.policy is None or self.sup.stop_requested:
                continue
            assert self.consume_watch is not None
            stopping = time.monotonic()
            w.last_exit_code = self.sup.stop(w.child)
            w.stop_seconds = round(time.monotonic() - stopping, 3)
            w.not_consuming = ()
            self.outputs.detach(w.child)
            self.consume_watch.forget(node)
            self._update_record(w.lock_kind, not_consuming=[])
            w.not_consuming_recorded = False
            self.restart_after_crash(w, None, why=f"{w.label} {node} does not consume {found[0].queue}")

    def reload(self) -> None:
        """Prepare, then swap: the next worker of every role starts at once and imports the new code while
        the old ones serve; only then are the old ones stopped (drained, or warm when busy) and the new ones
        released to connect. The two never consume at the same time; a save that breaks the import leaves
        the old workers serving."""
        assert self.watcher is not None and self.opts.held_workers  # only tlrun dev reloads; its workers are held
        changes = self.watcher.take()
        started = time.monotonic()
        prepared: list[tuple[RoleWorker, str, Hold]] = []
        for w in self.workers:
            spare = self._take_spare(w)
            if spare is None:
                spare = (f"{w.child}+next", Hold())
                self._spawn(w, spare[0], spare[1], announce=False)
            prepared.append((w, *spare))
        deadline = time.monotonic() + self.s.ready_timeout
        for w, name, hold in prepared:
            if not hold.wait_prepared(deadline, functools.partial(self._alive, name)):
                self._abandon(prepared, failed=(w, name))
                return
        serving = [w for w in self.workers if self.sup.running(w.child)]
        self._stop_drained(serving, "reload")
        for w, name, hold in prepared:
            self.sup.rename(name, w.child)
            self.outputs.rename(name, w.child)
            w.poll_interval = hold.poll_interval
            hold.release()
        with Broker(self.broker_url) as broker:
            for w in self.workers:
                if not verify.wait_ready(
                    broker, w.node, deadline, functools.partial(self.sup.running, w.child), self._stop_asked
                ):
                    if not self.sup.stop_requested:
                        self.report(Notice(f"reload: {w.node} did not answer after its release", "warning"))
                    return
                self.outputs.release(w.child)
                w.since = datetime.now().strftime("%H:%M:%S")
        for w in self.workers:
            self._update_record(w.lock_kind, node=w.node, worker_pid=self.sup.pid(w.child))
        nodes = [verify.ReadyNode(w.role.name, w.node, self.sup.pid(w.child) or 0) for w in self.workers]
        report = verify.build_report(nodes, time.monotonic() - started, [], self.s.expected_workers, {})
        self.report(Reloaded(tuple(changes), time.monotonic() - started, report))
        self.spawn_spares()

    def _abandon(self, prepared: list[tuple[RoleWorker, str, Hold]], failed: tuple[RoleWorker, str]) -> None:
        """A prepared worker did not import: end every prepared one unconnected; the old ones keep serving."""
        status: int | None = None
        tail: list[str] = []
        for w, name, hold in prepared:
            hold.close()
            code, lines = self._end(name, settle=5.0 if (w, name) == failed else 0.0)
            if (w, name) == failed:
                status, tail = code, list(lines)
        if self.sup.stop_requested:
            return
        error = start_failure(self.s.app, self.s.ready_timeout, status, tail, status is None)
        old = [w for w in self.workers if self.sup.running(w.child)]
        keeps = (
            f"the worker of {old[0].since} keeps running the previous code"
            if len(old) == 1
            else f"{len(old)} workers keep running the previous code"
            if old
            else "no worker runs until the next good save"
        )
        self.report(Notice(f"reload failed: {error}; {keeps}", "warning"))
        self.spawn_spares()

    def restart_after_crash(self, w: RoleWorker, code: int | None, why: str | None = None) -> None:
        """Back off, then guard, sweep, spawn and verify again; RestartGiveUpError when the policy says so.
        `why` replaces "exited with status N" (a worker stopped because it did not consume)."""
        assert w.policy is not None
        delay = w.policy.on_crash()
        if delay is None:
            raise RestartGiveUpError(f"giving up on the {w.label} after {w.policy.why_given_up()}")
        what = why or f"{w.label} exited with status {code}"
        self.report(Notice(f"{what}: restart {w.policy.restarts} in {delay:.1f} s", "warning"))
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and not self.sup.stop_requested:
            time.sleep(0.05)
        if self.sup.stop_requested:
            return
        note = guard.check_env_guard(os.environ)  # the lock is still ours; the guard is checked again
        if note is not None:
            self.report(Notice(note.message, "warning"))
        self.sweep()
        try:
            ready = self.start_workers([w], time.monotonic(), allow_rename=False)
        except (AppImportError, WorkerStartError) as exc:
            self.report(Notice(f"restart failed: {exc}", "warning"))
            self.restart_after_crash(w, WorkerStartError.exit_code)
            return
        if ready is not None:
            self.report(Ready(ready))

    def _worker(self, child: str) -> RoleWorker | None:
        return next((w for w in self.workers if w.child == child), None)

    def supervise(self) -> int:
        """Until every worker and beat has stopped; returns the exit status."""
        status = 0
        while True:
            got = self.sup.wait(interrupt=self._wake)
            if got is None:
                if self.sup.stop_requested and not self._stopping:
                    # A deferred stop (fast stop): drain idle workers, the warm ladder for the rest and beat.
                    self._stopping = True
                    status = self._stop_drained(self.workers, "stop", announce=True)
                    self.sup.escalate()
                    continue
                if self.sup.stop_requested or not (self.watcher or self.lease or self.sup.has_running()):
                    break
                if self._stuck:
                    self.act_on_stuck()
                if self.watcher is not None and self.watcher.pending():
                    self.reload()
                continue
            name, code = got
            tail = self.outputs.detach(name)
            if self._drop_spare(name):
                if self.sup.stop_requested and not self.sup.has_running():
                    break
                continue
            w = self._worker(name)
            label = w.node if w is not None else name
            if w is not None:
                w.last_exit_code = code
            if self.sup.stop_requested:
                self.report(Exited(label, code, True))
                if w is not None or not self.workers:
                    status = status or code
                if not self.sup.has_running():
                    break
                continue
            self.report(Exited(label, code, False, tail))
            if self.watcher is not None and w is not None:
                self.report(Notice("waiting for a change to start the worker again"))
                continue
            if w is not None and code != 0 and w.policy is not None:
                self.restart_after_crash(w, code)
                continue
            status = code  # a clean exit of its own (a remote shutdown) is not a crash
            break
        self.sup.stop_all()
        return status


def _pool_expected(role: Role) -> int | None:
    """Prefork pool size: --concurrency, else Celery's default (the number of CPUs); None for other pools."""
    if (role.worker.pool or "prefork") not in ("prefork", "processes"):
        return None
    return role.worker.concurrency or os.cpu_count() or 1


def _pool_and_rss(pid: int | None) -> tuple[int | None, int | None]:
    """The worker's pool processes (children running its own command line) and its main process's RSS."""
    if pid is None:
        return None, None
    import psutil

    try:
        proc = psutil.Process(pid)
        argv = proc.cmdline()
        children = sum(1 for c in proc.children() if c.cmdline() == argv)
        return children, proc.memory_info().rss
    except psutil.Error:
        return None, None


def run(settings: Settings, report: Reporter, opts: LaunchOptions | None = None) -> int:
    """Run the project's workers (one per role) and/or beat until they stop; returns the exit status."""
    opts = opts or LaunchOptions()
    started = time.monotonic()
    reaper = None
    if opts.init_duties:
        if not opts.is_pid1:
            pid1.become_subreaper()
        reaper = pid1.Reaper()
    with contextlib.ExitStack() as stack:
        sup = stack.enter_context(
            Supervisor(
                settings.stop_grace,
                lambda msg: report(Notice(msg)),
                defer_first_stop=opts.fast_stop,
                reaper=reaper,
                requeue_margin=requeue_margin(settings.stop_grace, celery_version()),
            )
        )
        session = Session(settings, report, sup, opts)
        # Validate, guard, broker, sweep: nothing is stopped before everything that can fail was checked. A
        # stop asked for meanwhile ends the launch before anything is spawned.
        session.validate()
        session.start_metrics(stack)  # a port already taken fails here, before anything is stopped
        session.take_locks(stack)
        if not sup.stop_requested:
            session.start_broker()
        if not sup.stop_requested:
            session.sweep()
        if sup.stop_requested:
            return 128 + (sup.stop_signal or signal.SIGINT)
        if opts.debug:
            from tlrun.dev import debug

            if opts.beat:  # beat stays a supervised child; the worker runs here, in the debugger's process
                session.start_beat()
            node = session.workers[0].node if len(session.workers) == 1 else debug.node_for_roles(session.hostname)
            session.mark_in_process(node)
            return debug.run_in_process(settings, report, node, session.broker_url)
        if opts.reload:
            session.watcher = Watcher(settings.project_root, [settings.log_dir]).start()
            stack.callback(session.watcher.close)
        if session.workers:
            try:
                ready = session.start_workers(session.workers, started)
            except (AppImportError, WorkerStartError) as exc:
                if session.watcher is None:
                    raise
                report(Notice(f"{exc}; fix it and save: tlrun restarts the worker on the next change", "warning"))
                ready = None
            if ready is not None:
                session.verdict(ready)
            session.spawn_spares()
            session.start_consume_watch()
            if session.consume_watch is not None:
                stack.callback(session.consume_watch.close)
        if opts.beat and not sup.stop_requested:
            stack.callback(session.end_beat)  # after the supervisor has stopped beat: release the lease
            session.begin_beat()
        return session.supervise()
