"""One fix to Celery's prefork pool, applied inside a worker that tlrun runs in its own process (`_child.py`).

The defect (Celery 5.x, billiard 4.x; docs/celery-settings.md): at a warm shutdown the
consumer calls `AsynPool.flush()`, which drops from the pool's job cache every job no pool child has
acknowledged yet, including a job whose message is already written to a child's pipe. That child runs it
anyway. Its result then goes unread, because the pool's shutdown reader runs only while the cache is not
empty, and billiard's child does not exit until the parent has counted each result it sent (it retries
300 x 0.1 s): the worker's stop stalls about 30 s after its last task, and the task's late ack never goes
out (the message is restored and runs again). It happens when the SIGTERM lands while the event loop is
handing out tasks (a worker replaced or stopped under a stream of tasks): 6 of 40 bare Celery stops with
SIGTERM a few ms after a task finished, 0 of 40 with this fix (`bench/warm_shutdown_race.py`).

The fix keeps such jobs in the cache: the pool then reads their results as it does for any task still
running at shutdown (acks included), and the children exit as soon as they are done. Jobs not yet written to a child are
dropped as before (the broker redelivers them). `TLRUN_CELERY_FIX=0` turns it off.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

ENV = "TLRUN_CELERY_FIX"
_MARK = "_tlrun_keeps_written_jobs"


def written_jobs(cache: Mapping[Any, Any]) -> list[Any]:
    """Jobs no child has acknowledged yet but whose message is in a live child's pipe: they will run."""
    found = []
    for job in tuple(cache.values()):
        proc = getattr(job, "_write_to", None)
        if not getattr(job, "_accepted", True) and proc is not None and proc._is_alive():
            found.append(job)
    return found


def keep_written_jobs(flush: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Wrap `AsynPool.flush` so that jobs already written to a child stay in the cache."""

    @functools.wraps(flush)
    def wrapper(pool: Any) -> Any:
        keep = [] if getattr(pool, "synack", False) else written_jobs(pool._cache)
        try:
            return flush(pool)
        finally:
            for job in keep:
                if job._write_to._is_alive():
                    pool._cache.setdefault(job._job, job)

    setattr(wrapper, _MARK, True)
    return wrapper


def install(environ: Mapping[str, str] = os.environ) -> bool:
    """Apply the fix when this Celery has the pool it fixes (and it is not turned off). True when applied."""
    if environ.get(ENV) == "0":
        return False
    try:
        from celery.concurrency import asynpool
    except ImportError:
        return False
    pool = getattr(asynpool, "AsynPool", None)
    flush = getattr(pool, "flush", None)
    if pool is None or flush is None:
        return False
    if not getattr(flush, _MARK, False):
        pool.flush = keep_written_jobs(flush)
    return True


# -- a ping that says which process answers --------------------------------------------------------------
PING_COMMAND = "tlrun_ping"


def register_ping() -> bool:
    """A remote control command that answers like `ping` plus this process's pid: the launcher's readiness
    check knows its own worker's reply from that of another worker with the same node name (which answers
    an unknown command with an error). True when registered."""
    try:
        from celery.worker.control import control_command
    except ImportError:
        return False

    def tlrun_ping(state: Any, **_kwargs: Any) -> dict[str, Any]:
        return {"ok": "pong", "pid": os.getpid()}

    control_command(name=PING_COMMAND)(tlrun_ping)
    return True


ACTIVE_COMMAND = "tlrun_active"


def active_tasks(now: float | None = None) -> list[dict[str, Any]]:
    """The tasks this worker runs: id, name, the pid that runs it, its runtime and the hard time limit it runs
    under (the call's `time_limit`, the task's, `task_time_limit` or --time-limit; None without one).
    Arguments are never included."""
    import time

    from celery.worker import state

    now = time.time() if now is None else now
    worker = _controller[0] if _controller else None
    default = getattr(worker, "time_limit", None)
    pool = type(getattr(worker, "pool", None)).__module__ if worker is not None else ""
    found = []
    for req in list(state.active_requests):
        hard = (req.time_limits or (None, None))[0] or getattr(req.task, "time_limit", None) or default
        found.append(
            {
                "id": req.id,
                "name": req.name,
                "pid": req.worker_pid or os.getpid(),
                "runtime": round(now - req.time_start, 3) if req.time_start else 0.0,
                "limit": float(hard) if hard else None,
                "pool_child": bool(req.worker_pid) and req.worker_pid != os.getpid() and "prefork" in pool,
            }
        )
    return found


def register_active() -> bool:
    """A remote control command that lists the running tasks with their limits (for HUNG_TASK)."""
    try:
        from celery.worker.control import control_command
    except ImportError:
        return False

    def tlrun_active(state: Any, **_kwargs: Any) -> dict[str, Any]:
        return {"ok": "active", "pid": os.getpid(), "tasks": active_tasks()}

    control_command(name=ACTIVE_COMMAND)(tlrun_active)
    return True


# -- tasks running at the end of the grace period ----------------------------------------------------------
_controller: list[Any] = []  # the WorkController of this process, once Celery sends worker_init


def _remember(sender: Any = None, **_kwargs: Any) -> None:
    _controller[:] = [sender]


def track_worker() -> None:
    """Keep a reference to this process's worker, so that `running_tasks` can look into its pool."""
    try:
        from celery import signals
    except ImportError:
        return
    signals.worker_init.connect(_remember, weak=False, dispatch_uid="tlrun-track-worker")


def tracked_worker() -> Any:
    """This process's WorkController; LookupError before Celery sent worker_init."""
    if not _controller:
        raise LookupError("the worker has not started")
    return _controller[0]


def running_tasks() -> int:
    """Tasks this worker runs now: accepted requests, and jobs its pool still has out (written to a child,
    not acknowledged yet: with the flush fix they run). Read from a signal handler: no locks, no I/O."""
    from celery.worker import state

    running = len(state.active_requests)
    pool = getattr(getattr(_controller[0], "pool", None), "_pool", None) if _controller else None
    cache = getattr(pool, "_cache", None)
    return max(running, len(cache)) if cache else running


def stop_idle_pool() -> int:
    """Near the stop's deadline, in a warm shutdown with no task running: SIGKILL the pool's processes, which
    hold nothing and only keep the shutdown waiting (billiard's child sleeps 1 s after its DEATH message,
    which an idle pool never reads; on a loaded machine, seconds). The pool's join then returns at once and
    the worker ends its warm shutdown with status 0, instead of being SIGKILLed at the deadline (137).
    Called from a signal handler: no locks, no I/O but kill(2). Returns how many were sent SIGKILL."""
    import signal

    if not _controller or running_tasks():
        return 0
    pool = getattr(getattr(_controller[0], "pool", None), "_pool", None)
    stopped = 0
    for process in list(getattr(pool, "_pool", None) or ()):
        pid = getattr(process, "pid", None)
        if isinstance(pid, int) and pid > 1 and pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
                stopped += 1
            except OSError:
                pass
    return stopped
