"""The launch path every command shares: guard -> sweep -> spawn -> verify -> supervise."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from tlrun import guard, procs, signals, spawn, sweep, verify
from tlrun.broker import Broker, resolve_broker_url
from tlrun.config import Settings
from tlrun.errors import AppImportError, DuplicateNodeError, LockHeldError, StopError, WorkerStartError
from tlrun.events import Exited, Notice, Ready, Reporter, Spawned, StrayFound, WorkerOutput
from tlrun.logfiles import open_log
from tlrun.redact import Redactor, url_password
from tlrun.supervise import Supervisor

log = logging.getLogger(__name__)


def lock_path(settings: Settings, kind: str = "worker") -> Path:
    return guard.runtime_dir(os.environ) / f"{settings.project_id}.{kind}.lock"


def _stop_holder(holder: procs.Identity, report: Reporter) -> None:
    """--replace: ask the launcher holding the lock for a graceful stop (it stops its own worker)."""
    proc = signals.process_for(holder)
    if proc is None:
        raise LockHeldError(
            f"the lock names pid {holder.pid}, which is gone or is not the process that took it",
            hint="the real holder is still alive; find it with `tlrun ps`",
        )
    try:
        cmdline = " ".join(proc.cmdline())
    except Exception:
        cmdline = ""
    if "tlrun" not in cmdline:
        raise LockHeldError(f"the lock names pid {holder.pid}, which is not a tlrun launcher: not stopping it")
    report(Notice(f"--replace: asking launcher pid {holder.pid} to stop"))
    signals.send(proc, signal.SIGTERM)


def _local_nodes() -> dict[str, list[int]]:
    nodes: dict[str, list[int]] = {}
    for proc in procs.main_processes(procs.scan(("worker",))):
        if proc.node:
            nodes.setdefault(proc.node, []).append(proc.pid)
    return nodes


def _start_failure(settings: Settings, status: int | None, tail: list[str], timeout: bool) -> Exception:
    text = "\n".join(tail)
    if "Unable to load celery application" in text or (status == 2 and "Error" in text):
        reason = next(
            (ln.strip() for ln in reversed(tail) if ln.strip() and not ln.startswith(("Usage:", "Try "))),
            "unknown error",
        )
        return AppImportError(f"app {settings.app!r} does not import: {reason}")
    if timeout:
        return WorkerStartError(
            f"the worker did not answer a ping within {settings.ready_timeout:g} s",
            hint="raise --ready-timeout, or read the log: " + (tail[-1] if tail else "(empty)"),
        )
    return WorkerStartError(f"the worker exited with status {status} before it answered a ping")


@dataclass
class _Run:
    settings: Settings
    report: Reporter
    broker_url: str
    hostname: str

    def spawn_and_verify(
        self,
        sup: Supervisor,
        node: str,
        census: list[str] | verify.Census,
        started: float,
        renamed_from: str | None = None,
    ) -> verify.ReadyReport | None:
        s = self.settings
        argv = spawn.worker_argv(s, node)
        env = spawn.worker_env(s, node, procs.Identity.of_self(), self.broker_url)
        worker_log = open_log(s.log_dir, f"celery_worker_{os.getpid()}")
        child = sup.start(argv, env, s.project_root)
        redactor = Redactor([url_password(self.broker_url)])
        self.pump = spawn.OutputPump(child, worker_log, redactor, lambda line: self.report(WorkerOutput(node, line)))
        self.report(Spawned(node, child.pid, worker_log.path, tuple(argv)))
        deadline = time.monotonic() + s.ready_timeout
        with Broker(self.broker_url) as broker:
            ok = verify.wait_ready(broker, node, deadline, sup.running, lambda: sup.stop_requested)
        if sup.stop_requested:
            return None
        if not ok:
            timed_out = sup.running()
            status = sup.stop() if timed_out else sup.wait()
            self.pump.close()
            raise _start_failure(s, status, list(self.pump.tail), timed_out)
        replies = census if isinstance(census, list) else census.result(lambda: sup.stop_requested)
        if node in replies and renamed_from is None:
            # A worker elsewhere already answers to our name: stop ours and come back under a unique one.
            new = spawn.unique_node_name(s.node_prefix, os.getpid(), self.hostname, set(replies))
            self.report(Notice(f"node name {node} already answers on the broker: restarting as {new}", "warning"))
            sup.stop()
            self.pump.close()
            return self.spawn_and_verify(sup, new, replies, started, renamed_from=node)
        return verify.build_report(
            node,
            child.pid,
            time.monotonic() - started,
            replies,
            s.expected_workers,
            _local_nodes(),
            renamed_from,
        )


def run_worker(settings: Settings, report: Reporter) -> int:
    """Run one supervised worker of the project until it stops; returns the exit status."""
    started = time.monotonic()
    note = guard.check_env_guard(os.environ)
    if note is not None:
        report(Notice(note.message, "warning"))
    what = f"a worker of app {settings.app} in {settings.project_root}"
    lock = guard.acquire(
        lock_path(settings),
        what,
        replace_holder=(lambda holder: _stop_holder(holder, report)) if settings.replace else None,
        wait=settings.stop_grace + signals.KILL_WAIT + 5,
    )
    with lock:
        hostname = socket.gethostname()
        node = spawn.node_name(settings.node_prefix, os.getpid(), hostname)
        record = {
            "pid": os.getpid(),
            "create_time": procs.Identity.of_self().create_time,
            "node": node,
            "app": settings.app,
            "project_root": str(settings.project_root),
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        lock.write(record)
        broker_url = resolve_broker_url(settings)
        # Fail on a dead broker before anything is stopped or started.
        with Broker(broker_url) as probe:
            probe.connect()
        if settings.sweep:
            result = sweep.sweep(
                settings.project_id,
                settings.app,
                settings.project_root,
                settings.stop_grace,
                on_found=lambda stray: report(StrayFound(stray)),
                on_step=lambda msg: report(Notice(msg)),
            )
            if result.survivors:
                raise StopError(f"stray process(es) survived SIGKILL: {', '.join(map(str, result.survivors))}")
        run = _Run(settings, report, broker_url, hostname)
        census = verify.Census(broker_url, settings.ping_window).start()
        with Supervisor(settings.stop_grace, lambda msg: report(Notice(msg))) as sup:
            ready = run.spawn_and_verify(sup, node, census, started)
            if ready is not None:
                lock.write({**record, "node": ready.node, "worker_pid": ready.worker_pid})
                if ready.own_replies > 1:
                    raise DuplicateNodeError(
                        f"{ready.own_replies} workers answer as {ready.node}: node names must be unique"
                    )
                report(Ready(ready))
                if settings.strict and not ready.as_expected:
                    raise DuplicateNodeError(
                        f"--strict: {ready.answering} workers answer, expected {settings.expected_workers}"
                    )
            status = sup.wait()
            run.pump.close()
            report(Exited(ready.node if ready else node, status, sup.stop_requested, tuple(run.pump.tail)))
            return status
