"""Workers that start importing before the launcher has validated, locked and swept.

A worker spends most of its start importing Celery and the app (about 0.5 s); the launcher spends about
0.2 s before it may let one connect (its own imports, the validation, the lock, the sweep, the node-name
claim). Both can happen at once: as soon as the settings are read, the CLI starts each role's worker *held*
(tlrun's entry module, see entry.py): it imports Celery, the app and its task modules, says `ready`, and
connects to the broker only after `go`. The launcher then validates, locks and sweeps as before, and adopts
each held worker in place of the one it would have spawned, with the very command line and environment it
would have given it (`plan_worker`). Released only after the guard, the sweep and the claim passed, the
worker never connects before them; a failure anywhere before (a lock another launcher holds, a broker that
does not answer, a name taken, Ctrl-C) ends it unconnected (`discard`: SIGKILL is safe, it holds nothing).

Only when the broker URL is configured (no app import needed to know it) and the workers are plain children
(not debug mode's in-process worker).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import signal
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlrun.config import Role, Settings
from tlrun.launch import spawn
from tlrun.launch._child import HEARTBEAT_ENV, LOG_ENV, TASK_STATS_ENV
from tlrun.launch.entry import BASE_ENV, DEV_POLL_ENV
from tlrun.launch.hold import Hold
from tlrun.launch.identity import Identity

HELD_MODULE = "tlrun.launch.entry"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    argv: list[str]
    env: dict[str, str]
    stem: str  # the log file's stem
    heartbeat: str  # the liveness heartbeat file the worker writes


def task_stats_prefix(runtime: Path, project_id: str, role: str, launcher_pid: int) -> str:
    """Where a role's workers write their task counts: `<prefix>.<worker pid>.json` (taskstats.py)."""
    return str(runtime / f"{project_id}.{role}.{launcher_pid}.tasks")


def base_file(runtime: Path, project_id: str, role: str, launcher_pid: int) -> str:
    """Where a role's workers of tlrun dev write the modules its next spare imports (base.py)."""
    return str(runtime / f"{project_id}.{role}.{launcher_pid}.modules")


def remove_task_stats(runtime: Path, project_id: str, roles: Iterable[str], launcher_pid: int) -> None:
    """The task count files this launcher's workers wrote (at its close: the metrics step has read them), and
    the lists of their modules (base.py)."""
    for role in roles:
        prefix = task_stats_prefix(runtime, project_id, role, launcher_pid)
        for path in [*glob.glob(glob.escape(prefix) + ".*.json"), base_file(runtime, project_id, role, launcher_pid)]:
            with contextlib.suppress(OSError):
                os.unlink(path)


def plan_worker(
    settings: Settings,
    role: Role,
    node: str,
    broker_url: str,
    runtime: Path,
    log_dir: Path | None,
    hold: Hold | None,
    dev_poll: bool,
) -> Plan:
    """The command line and environment of a role's worker: one function for the early start and the
    launcher's own spawns, so that an adopted worker is exactly the one the launcher would have started."""
    module = HELD_MODULE if hold is not None else "celery"
    argv = spawn.worker_argv(settings.app, role.worker, node, module=module)
    env = spawn.worker_env(settings, node, Identity.of_self(), broker_url, role.name)
    beat_file = str(runtime / f"{settings.project_id}.{role.name}.{os.getpid()}.alive")
    env[HEARTBEAT_ENV] = beat_file  # the worker's own event loop writes it: `tlrun health --liveness`
    env[TASK_STATS_ENV] = task_stats_prefix(runtime, settings.project_id, role.name, os.getpid())
    if hold is not None:
        env.update(hold.env(), **({DEV_POLL_ENV: "1"} if dev_poll else {}))
        if dev_poll:  # tlrun dev: what the role's next spare imports before a save (base.py)
            env[BASE_ENV] = base_file(runtime, settings.project_id, role.name, os.getpid())
    stem = f"celery_{role.log_stem}_{os.getpid()}"
    if log_dir is not None:
        env[LOG_ENV] = str(log_dir / f"{stem}.log")  # where it writes once its launcher is gone (_child.py)
    return Plan(argv, env, stem, beat_file)


@dataclass
class EarlyWorker:
    role: str
    node: str
    broker_url: str
    plan: Plan
    hold: Hold
    popen: subprocess.Popen[bytes]


class EarlyStart:
    """The held workers started early, until the launcher adopts or discards them."""

    def __init__(self, lifeline: spawn.Lifeline) -> None:
        self.lifeline = lifeline
        self.workers: dict[str, EarlyWorker] = {}

    @classmethod
    def begin(cls, settings: Settings, *, dev_poll: bool, log_dir: Path | None, runtime: Path) -> EarlyStart | None:
        """Start every role's worker held, or None when the early start does not apply (no configured broker
        URL: only the app would say it)."""
        import socket

        if not settings.broker_url:
            return None
        early = cls(spawn.Lifeline())
        hostname = socket.gethostname()
        try:
            for role in settings.roles:
                node = spawn.node_name(role.node_prefix, spawn.node_token(), hostname)
                hold = Hold()
                plan = plan_worker(settings, role, node, settings.broker_url, runtime, log_dir, hold, dev_poll)
                popen = spawn.spawn(
                    plan.argv, plan.env, settings.project_root, early.lifeline, settings.stop_grace, (hold.child_fd,)
                )
                hold.spawned()
                early.workers[role.name] = EarlyWorker(role.name, node, settings.broker_url, plan, hold, popen)
                log.debug("early start: worker %s (pid %d) imports its app, held until released", node, popen.pid)
        except BaseException:
            early.discard()
            early.lifeline.close()
            raise
        return early

    def take(self, role: str, node: str, broker_url: str, plan: Callable[[Hold], Plan]) -> EarlyWorker | None:
        """The held worker of `role`, when it is the one the launcher would start now (same node, broker,
        command line and environment: `plan(its hold)`) and still alive; else None (the launcher spawns its
        own)."""
        worker = self.workers.pop(role, None)
        if worker is None:
            return None
        same = (worker.node, worker.broker_url, worker.plan) == (node, broker_url, plan(worker.hold))
        if not same or worker.popen.poll() is not None:
            _end(worker)
            return None
        return worker

    def broker_options(self, deadline: float) -> dict[str, Any] | None:
        """The app's connection settings, as the first held worker that imported its app said them (None: none
        did by `deadline`: its app does not import, which its adoption then reports)."""
        import time

        for worker in self.workers.values():
            alive = lambda w=worker: w.popen.poll() is None  # noqa: E731
            if worker.hold.wait_prepared(deadline, alive) and worker.hold.broker_options is not None:
                return worker.hold.broker_options
            if time.monotonic() >= deadline:
                break
        return None

    def pids(self) -> frozenset[int]:
        """The held workers not adopted yet: this launcher's, never strays to sweep."""
        return frozenset(w.popen.pid for w in self.workers.values())

    def discard(self) -> None:
        """End every held worker not adopted: it never connected, so SIGKILL loses nothing."""
        for worker in list(self.workers.values()):
            _end(worker)
        self.workers.clear()


def _end(worker: EarlyWorker) -> None:
    worker.hold.close()
    try:
        os.killpg(worker.popen.pid, signal.SIGKILL)  # its own session and group (spawn.spawn)
    except (ProcessLookupError, PermissionError):
        pass
    worker.popen.wait()
    if worker.popen.stdout is not None:
        worker.popen.stdout.close()
