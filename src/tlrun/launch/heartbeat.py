"""Liveness from local evidence: a heartbeat file the worker writes from its own event loop.

Worker side (`install`, called by tlrun's shim in a worker it runs in place): once the worker is ready, a
timer on the consumer's own timer (the event loop's, where there is one) rewrites a small JSON file every
INTERVAL seconds: a wedged loop stops it. A task that runs in the main process itself (the solo pool: it
blocks the loop) is noted with its start and its hard time limit, so that a busy solo worker counts as
alive while its task is within that limit.

Probe side (`check`): no broker, no Celery, no app: the worker's main process exists and is not stopped,
and the file is fresh (or its task still within its limit). What `tlrun health --liveness` answers.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from tlrun.launch._child import HEARTBEAT_ENV

ENV = HEARTBEAT_ENV  # where the worker writes its heartbeat
INTERVAL = 5.0

_state: dict[str, Any] = {"busy_since": None, "limit": None, "reconnecting_since": None}
# The tasks running in the main process (solo, threads): id -> [name, started, hard limit or None]. The
# launcher's hung-task check reads them here: a busy solo worker cannot answer a remote-control question.
_tasks: dict[str, list[Any]] = {}
_lock = threading.Lock()
_worker_limit: list[float | None] = [None]  # the worker's own --time-limit (the solo pool enforces none)


def _write(path: str) -> None:
    with _lock:
        record = {"t": time.time(), "pid": os.getpid(), **_state, "tasks": dict(_tasks)}
    write_json(path, record)


def write_json(path: str, record: dict[str, Any]) -> None:
    """Replace `path` with `record`, atomically, never following a link; a failure is silent (the worker
    goes on). The temporary file is per thread: the threads pool's tasks write from their own threads."""
    tmp = f"{path}.{threading.get_ident()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh)
        os.replace(tmp, path)
    except OSError:
        pass


def install(path: str) -> None:
    from celery import signals

    main = os.getpid()

    def ready(sender: Any = None, **_kw: Any) -> None:
        _worker_limit[0] = getattr(getattr(sender, "controller", None), "time_limit", None)
        _write(path)
        timer = getattr(sender, "timer", None)
        if timer is not None:
            timer.call_repeatedly(INTERVAL, _write, (path,), priority=0)

    def prerun(task: Any = None, task_id: Any = None, **_kw: Any) -> None:
        if os.getpid() != main:
            return  # a pool child: the main process's loop goes on
        limits = getattr(getattr(task, "request", None), "timelimit", None) or (None, None)
        hard = limits[0] if limits and limits[0] else getattr(task, "time_limit", None)
        if not hard and task is not None:
            hard = task.app.conf.task_time_limit or _worker_limit[0]
        with _lock:
            _tasks[str(task_id or "")] = [str(getattr(task, "name", "?")), time.time(), hard or None]
            _busy()
        _write(path)

    def postrun(task_id: Any = None, **_kw: Any) -> None:
        if os.getpid() == main:
            with _lock:
                _tasks.pop(str(task_id or ""), None)
                _busy()
            _write(path)

    def init(sender: Any = None, **_kw: Any) -> None:
        # Only a pool that runs tasks in this process needs the task signals: with a receiver connected,
        # Celery sends them for every task (tens of microseconds each), which prefork's children would
        # only pay for to return at once.
        if not runs_in_pool_children(getattr(sender, "pool_cls", None)):
            signals.task_prerun.connect(prerun, weak=False, dispatch_uid="tlrun-heartbeat-busy")
            signals.task_postrun.connect(postrun, weak=False, dispatch_uid="tlrun-heartbeat-idle")

    signals.worker_init.connect(init, weak=False, dispatch_uid="tlrun-heartbeat-init")
    signals.worker_ready.connect(ready, weak=False, dispatch_uid="tlrun-heartbeat")
    _pulse_while_reconnecting(path)


def _busy() -> None:
    """busy_since and limit: the longest-running task's (what liveness judges); called under _lock."""
    oldest = min(_tasks.values(), key=lambda t: t[1], default=None)
    _state.update(busy_since=oldest[1] if oldest else None, limit=oldest[2] if oldest else None)


def running_tasks(path: str | None) -> tuple[int, list[dict[str, Any]]] | None:
    """(worker pid, its tasks running in its main process: id, name, started, limit) from its heartbeat file,
    else None (no file yet, unreadable)."""
    try:
        with open(path or "", "rb") as fh:
            beat = json.loads(fh.read(65536))
        tasks = beat.get("tasks") or {}
        return int(beat["pid"]), [
            {"id": str(k), "name": str(v[0]), "started": float(v[1]), "limit": v[2]} for k, v in tasks.items()
        ]
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None


def _pulse_while_reconnecting(path: str) -> None:
    """While Celery's consumer retries its broker connection (its event loop, and the heartbeat timer with
    it, wait in kombu's retry loop), a thread writes the heartbeat, marked `reconnecting_since`: a broker
    outage is readiness's business, never a reason to restart every worker at once. A worker whose process
    is stopped or wedged anywhere else still goes stale."""
    from celery.worker.consumer import consumer as module

    original = getattr(module.Consumer, "ensure_connected", None)
    if original is None:
        return

    def ensure_connected(self: Any, conn: Any) -> Any:
        if _state.get("reconnecting_since") is not None:
            return original(self, conn)  # nested (read and write connections): the outer one pulses
        stop = threading.Event()
        _state["reconnecting_since"] = time.time()

        def pulse() -> None:
            while not stop.wait(INTERVAL):
                _write(path)

        thread = threading.Thread(target=pulse, name="tlrun-heartbeat-reconnect", daemon=True)
        thread.start()
        try:
            return original(self, conn)
        finally:
            stop.set()
            _state["reconnecting_since"] = None

    module.Consumer.ensure_connected = ensure_connected


def runs_in_pool_children(pool_cls: Any) -> bool:
    """Does this pool (a name like `prefork` or a class, as the worker holds it at worker_init) run tasks
    in child processes? Unknown: False (the task signals stay connected)."""
    from celery import concurrency

    try:
        impl = concurrency.get_implementation(pool_cls) if pool_cls is not None else None
    except Exception:
        return False
    return impl is not None and getattr(impl, "__module__", "") == "celery.concurrency.prefork"
