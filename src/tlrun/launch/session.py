"""The launch path every command shares: guard -> sweep -> spawn -> verify -> supervise.

`run` serves `tlrun worker`, `tlrun dev` (with reload, beat, a managed broker) and `tlrun beat`; debug mode
hands over to debug.py after the same guard and sweep.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import signal
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tlrun.config import Settings
from tlrun.deploy.restart import RestartPolicy, RestartSettings
from tlrun.dev import brokerd
from tlrun.dev.reload import Watcher
from tlrun.errors import (
    AppImportError,
    DuplicateNodeError,
    LockHeldError,
    RestartGiveUpError,
    StopError,
    WorkerStartError,
)
from tlrun.events import Exited, Notice, Ready, Reloaded, Reporter, Spawned, StrayFound, WorkerOutput
from tlrun.launch import guard, procs, signals, spawn, sweep, verify
from tlrun.launch.broker import Broker, check_reachable, resolve_broker_url
from tlrun.launch.logfiles import open_log
from tlrun.launch.supervise import Supervisor
from tlrun.redact import Redactor, url_password

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchOptions:
    worker: bool = True
    beat: bool = False
    reload: bool = False
    managed_broker: bool = False  # start a private redis-server when nothing answers (dev)
    debug: bool = False  # run the worker inside this process (dev --debug)
    restart: RestartSettings | None = None  # restart a crashed worker with backoff (worker --restart)


def lock_path(settings: Settings, kind: str) -> Path:
    return guard.lock_path(settings.project_id, kind)


def beat_schedule_path(settings: Settings) -> Path:
    return guard.runtime_dir(os.environ) / f"{settings.project_id}.celerybeat-schedule"


def _stop_holder(holder: procs.Identity, report: Reporter) -> None:
    """--replace: ask the launcher holding the lock for a graceful stop (it stops its own worker)."""
    proc = signals.launcher_for(holder)
    if proc is None:
        raise LockHeldError(
            f"the lock names pid {holder.pid}, which is gone, reused, or not a tlrun launcher: not stopping it",
            hint="the real holder is still alive; find it with `tlrun ps`",
        )
    report(Notice(f"--replace: asking launcher pid {holder.pid} to stop"))
    signals.send(proc, signal.SIGTERM)


def _local_nodes() -> dict[str, list[int]]:
    nodes: dict[str, list[int]] = {}
    for proc in procs.main_processes(procs.scan(("worker",))):
        if proc.node:
            nodes.setdefault(proc.node, []).append(proc.pid)
    return nodes


_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def start_failure(app: str, ready_timeout: float, status: int | None, tail: list[str], timeout: bool) -> Exception:
    """Turn a worker that never answered into the error that explains it."""
    text = "\n".join(tail)
    if "Unable to load celery application" in text or (status == 2 and "Error" in text):
        reason = next(
            (ln.strip() for ln in reversed(tail) if ln.strip() and not ln.startswith(("Usage:", "Try "))),
            "unknown error",
        )
        # The innermost frame of the traceback that is not Python's own import machinery: the user's line.
        frames = [m.groups() for m in _FRAME.finditer(text) if "<frozen" not in m.group(1)]
        where = f" ({frames[-1][0]}, line {frames[-1][1]})" if frames else ""
        return AppImportError(f"app {app!r} does not import: {reason}{where}")
    if timeout:
        return WorkerStartError(
            f"the worker did not answer a ping within {ready_timeout:g} s",
            hint="raise --ready-timeout, or read the log: " + (tail[-1] if tail else "(empty)"),
        )
    return WorkerStartError(f"the worker exited with status {status} before it answered a ping")


class Session:
    """One launcher's children and their output, from the first spawn to the last reap."""

    def __init__(self, settings: Settings, report: Reporter, sup: Supervisor, opts: LaunchOptions) -> None:
        self.s = settings
        self.report = report
        self.sup = sup
        self.opts = opts
        self.hostname = socket.gethostname()
        self.node = spawn.node_name(settings.node_prefix, os.getpid(), self.hostname)
        self.broker_url = ""
        self.pumps: dict[str, spawn.OutputPump] = {}
        self.census: list[str] | verify.Census | None = None
        self.watcher: Watcher | None = None
        self.policy = RestartPolicy(opts.restart) if opts.restart is not None else None
        self._record: dict[str, Any] = {}
        self._locks: list[guard.ProjectLock] = []

    # -- guard ---------------------------------------------------------------------------------------
    def take_locks(self, stack: contextlib.ExitStack) -> None:
        note = guard.check_env_guard(os.environ)
        if note is not None:
            self.report(Notice(note.message, "warning"))
        self._record = {
            "pid": os.getpid(),
            "create_time": procs.Identity.of_self().create_time,
            "node": self.node,
            "app": self.s.app,
            "project_root": str(self.s.project_root),
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        kinds = (["worker"] if self.opts.worker else []) + (["beat"] if self.opts.beat else [])
        for kind in kinds:
            what = f"a {kind} of app {self.s.app} in {self.s.project_root}"
            replace = (lambda holder: _stop_holder(holder, self.report)) if self.s.replace else None
            lock = guard.acquire(lock_path(self.s, kind), what, replace, wait=self.s.stop_grace + signals.KILL_WAIT + 5)
            stack.enter_context(lock)
            lock.write(self._record)
            self._locks.append(lock)

    def _update_record(self, **fields: Any) -> None:
        self._record.update(fields)
        for lock in self._locks:
            lock.write(self._record)

    # -- broker --------------------------------------------------------------------------------------
    def connect_broker(self) -> None:
        url = self.s.broker_url
        if self.opts.managed_broker:
            url = url or brokerd.DEFAULT_DEV_BROKER
            argv = brokerd.plan_private_redis(url, guard.runtime_dir(os.environ))
            if argv is not None:
                self._start_private_redis(url, argv)
        self.broker_url = url or resolve_broker_url(self.s)
        # Fail on a dead broker before anything is stopped or started.
        check_reachable(self.broker_url)

    def _start_private_redis(self, url: str, argv: list[str]) -> None:
        address = brokerd.local_redis_address(url)
        child = self.sup.start("broker", argv, dict(os.environ), guard.runtime_dir(os.environ), stop_order=1)
        self._pump("broker", child, f"redis_{os.getpid()}", echo=False)
        brokerd.wait_listening(url, 5.0, lambda: self.sup.running("broker"))
        self.report(
            Notice(
                f"no broker answered at {address[0]}:{address[1]}: started a private redis-server "  # type: ignore[index]
                f"(pid {child.pid}, no persistence) for this session; it stops on exit"
            )
        )

    # -- sweep ---------------------------------------------------------------------------------------
    def sweep(self) -> None:
        roles = (["worker"] if self.opts.worker else []) + (["beat"] if self.opts.beat else [])
        if not self.s.sweep or not roles:
            return
        result = sweep.sweep(
            self.s.project_id,
            self.s.app,
            self.s.project_root,
            self.s.stop_grace,
            roles=roles,
            on_found=lambda stray: self.report(StrayFound(stray)),
            on_step=lambda msg: self.report(Notice(msg)),
        )
        if result.survivors:
            raise StopError(f"stray process(es) survived SIGKILL: {', '.join(map(str, result.survivors))}")

    # -- spawn and verify ----------------------------------------------------------------------------
    def _pump(self, name: str, child: Any, stem: str, echo: bool = True, label: str | None = None) -> None:
        out = open_log(self.s.log_dir, stem)
        redactor = Redactor([url_password(self.broker_url), url_password(self.s.broker_url)])
        tag = label or name
        on_line = (lambda line: self.report(WorkerOutput(tag, line))) if echo else None
        self.pumps[name] = spawn.OutputPump(
            child, out, redactor, on_line, on_log_error=lambda msg: self.report(Notice(msg, "warning"))
        )

    def finish_pump(self, name: str) -> tuple[str, ...]:
        pump = self.pumps.pop(name, None)
        if pump is None:
            return ()
        pump.close()
        return tuple(pump.tail)

    def start_census(self) -> None:
        self.census = verify.Census(self.broker_url, self.s.ping_window).start()

    def start_worker(self, started: float, allow_rename: bool = True) -> verify.ReadyReport | None:
        """Spawn the worker and wait for its first pong; None when a stop was asked meanwhile."""
        node = self.node
        argv = spawn.worker_argv(self.s, node)
        env = spawn.worker_env(self.s, node, procs.Identity.of_self(), self.broker_url)
        child = self.sup.start("worker", argv, env, self.s.project_root)
        self._pump("worker", child, f"celery_worker_{os.getpid()}", label=node)
        self.report(Spawned("worker", node, child.pid, self.pumps["worker"].log_path, tuple(argv)))
        if self.census is None:
            # Right after the spawn, so that importing Celery overlaps the worker's own start-up. The new
            # worker cannot answer it: it subscribes to its mailbox only after its own imports (> 0.3 s).
            self.start_census()
        deadline = time.monotonic() + self.s.ready_timeout
        with Broker(self.broker_url) as broker:
            ok = verify.wait_ready(
                broker, node, deadline, lambda: self.sup.running("worker"), lambda: self.sup.stop_requested
            )
        if self.sup.stop_requested:
            return None
        if not ok:
            timed_out = self.sup.running("worker")
            status = self.sup.stop("worker") if timed_out else self.sup.reap("worker")
            tail = list(self.finish_pump("worker"))
            raise start_failure(self.s.app, self.s.ready_timeout, status, tail, timed_out)
        census = self.census
        assert census is not None
        replies = self.census = census if isinstance(census, list) else census.result(lambda: self.sup.stop_requested)
        if node in replies and allow_rename:
            # A worker elsewhere already answers to our name: stop ours and come back under a unique one.
            new = spawn.unique_node_name(self.s.node_prefix, os.getpid(), self.hostname, set(replies))
            self.report(Notice(f"node name {node} already answers on the broker: restarting as {new}", "warning"))
            self.sup.stop("worker")
            self.finish_pump("worker")
            self.node = new
            report = self.start_worker(started, allow_rename=False)
            return None if report is None else dataclasses.replace(report, renamed_from=node)
        self._update_record(node=node, worker_pid=child.pid)
        others = [name for name in replies if name != node]
        return verify.build_report(
            node,
            child.pid,
            time.monotonic() - started,
            replies,
            self.s.expected_workers,
            _local_nodes() if others else {},
        )

    def start_beat(self) -> None:
        schedule = beat_schedule_path(self.s)
        argv = [
            spawn.PYTHON,
            "-m",
            "celery",
            "-A",
            self.s.app,
            "beat",
            "-s",
            str(schedule),
            "--loglevel",
            self.s.worker.loglevel,
        ]
        env = spawn.worker_env(self.s, "beat", procs.Identity.of_self(), self.broker_url)
        child = self.sup.start("beat", argv, env, self.s.project_root)
        self._pump("beat", child, f"celery_beat_{os.getpid()}")
        self._update_record(beat_pid=child.pid)
        self.report(Spawned("beat", "beat", child.pid, self.pumps["beat"].log_path, tuple(argv)))

    def verdict(self, ready: verify.ReadyReport) -> None:
        if ready.own_replies > 1:
            raise DuplicateNodeError(f"{ready.own_replies} workers answer as {ready.node}: node names must be unique")
        self.report(Ready(ready))
        if self.s.strict and not ready.as_expected:
            raise DuplicateNodeError(f"--strict: {ready.answering} workers answer, expected {self.s.expected_workers}")

    # -- supervise -----------------------------------------------------------------------------------
    def _wake(self) -> bool:
        if self.sup.stop_requested:
            return not self.sup.has_running()
        return self.watcher is not None and self.watcher.pending()

    def reload(self) -> None:
        assert self.watcher is not None
        changes = self.watcher.take()
        started = time.monotonic()
        if self.sup.running("worker"):
            self.sup.stop("worker")
        self.finish_pump("worker")
        try:
            ready = self.start_worker(started, allow_rename=False)
        except (AppImportError, WorkerStartError) as exc:
            self.report(Notice(f"reload failed: {exc}; fix it and save again", "warning"))
            return
        if ready is not None:
            self.report(Reloaded(tuple(changes), time.monotonic() - started, ready))

    def restart_after_crash(self, code: int) -> None:
        """Back off, then guard, sweep, spawn and verify again; RestartGiveUpError when the policy says so."""
        assert self.policy is not None
        delay = self.policy.on_crash()
        if delay is None:
            raise RestartGiveUpError(f"giving up on the worker after {self.policy.why_given_up()}")
        self.report(
            Notice(f"worker exited with status {code}: restart {self.policy.restarts} in {delay:.1f} s", "warning")
        )
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
            ready = self.start_worker(time.monotonic(), allow_rename=False)
        except (AppImportError, WorkerStartError) as exc:
            self.report(Notice(f"restart failed: {exc}", "warning"))
            self.restart_after_crash(WorkerStartError.exit_code)
            return
        if ready is not None:
            self.report(Ready(ready))

    def supervise(self) -> int:
        """Until every worker and beat has stopped; returns the exit status."""
        status = 0
        while True:
            got = self.sup.wait(interrupt=self._wake)
            if got is None:
                if self.sup.stop_requested or not (self.watcher or self.sup.has_running()):
                    break
                if self.watcher is not None and self.watcher.pending():
                    self.reload()
                continue
            name, code = got
            tail = self.finish_pump(name)
            label = self.node if name == "worker" else name
            if self.sup.stop_requested:
                self.report(Exited(label, code, True))
                if name == "worker" or not self.opts.worker:
                    status = code
                if not self.sup.has_running():
                    break
                continue
            self.report(Exited(label, code, False, tail))
            if self.watcher is not None and name == "worker":
                self.report(Notice("waiting for a change to start the worker again"))
                continue
            if name == "worker" and code != 0 and self.policy is not None:
                self.restart_after_crash(code)
                continue
            status = code  # a clean exit of its own (a remote shutdown) is not a crash
            break
        self.sup.stop_all()
        return status


def run(settings: Settings, report: Reporter, opts: LaunchOptions | None = None) -> int:
    """Run the project's worker (and/or beat) until it stops; returns the exit status."""
    opts = opts or LaunchOptions()
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        sup = stack.enter_context(Supervisor(settings.stop_grace, lambda msg: report(Notice(msg))))
        session = Session(settings, report, sup, opts)
        # Guard, broker check, sweep. A stop asked for meanwhile ends the launch before anything is spawned.
        session.take_locks(stack)
        if not sup.stop_requested:
            session.connect_broker()
        if not sup.stop_requested:
            session.sweep()
        if sup.stop_requested:
            return 128 + (sup.stop_signal or signal.SIGINT)
        if opts.debug:
            from tlrun.dev import debug

            if opts.beat:  # beat stays a supervised child; the worker runs here, in the debugger's process
                session.start_beat()
            return debug.run_in_process(settings, report, session.node, session.broker_url)
        if opts.reload:
            session.watcher = Watcher(settings.project_root, [settings.log_dir]).start()
            stack.callback(session.watcher.close)
        if opts.worker:
            try:
                ready = session.start_worker(started)
            except (AppImportError, WorkerStartError) as exc:
                if session.watcher is None:
                    raise
                report(Notice(f"{exc}; fix it and save: tlrun restarts the worker on the next change", "warning"))
                ready = None
            if ready is not None:
                session.verdict(ready)
        if opts.beat and not sup.stop_requested:
            session.start_beat()
        return session.supervise()
