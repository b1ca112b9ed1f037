"""Task metrics, counted in the worker's main process (worker side; ops/taskmetrics.py is the launcher's).

celery-exporter learns task outcomes from Celery's events (`-E` on every worker, `task_send_sent_event` on
every producer, an exporter consuming the event stream). A worker tlrun runs counts them itself, where Celery
hands each request its outcome: `task_received` (received), the request's `on_accepted` (started, and the
time it waited: from its publish time to its start, minus a deliberate ETA), `on_success` (succeeded, with
the runtime the pool process measured), `on_failure` (failed, by exception class), `on_retry`, `reject` and
`task_revoked`. Counts live in this process; the worker's own timer writes them to a small JSON file at most
once a second when they changed (and once at shutdown), which the launcher reads at scrape time. A worker
SIGKILLed loses at most the last second's counts; its launcher keeps what it last read.

Cardinality is bounded: at most MAX_NAMES task names per worker, the rest counted under `other`.

The publish time is a header (`tlrun_sent_at`) set by a `before_task_publish` receiver: in every worker and
beat tlrun runs (a task that calls a task, beat's periodic sends); `stamp_publish_time()` in the app module
adds it for every other producer (the web application). A message without it has no queue wait observed.
"""

from __future__ import annotations

import math
import os
import threading
import time
from datetime import datetime
from typing import Any

from tlrun.launch._child import TASK_STATS_ENV

ENV = TASK_STATS_ENV
SENT_HEADER = "tlrun_sent_at"
MAX_NAMES = 200
OTHER = "other"
FLUSH_EVERY = 1.0
# prometheus-client's default buckets (celery-exporter's runtime histogram) and celery-exporter's queue wait ones
RUNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
EVENTS = ("received", "started", "succeeded", "failed", "retried", "rejected", "revoked")


class Stats:
    """Counters and histograms of one worker process, safe from any thread (the threads pool's callbacks)."""

    def __init__(self, max_names: int = MAX_NAMES) -> None:
        self.counters: dict[tuple[str, str, str, str], int] = {}  # (event, name, queue, exception) -> n
        self.histograms: dict[str, dict[tuple[str, str], list[float]]] = {"runtime": {}, "wait": {}}
        self.names: set[str] = set()
        self.max_names = max_names
        self.lock = threading.Lock()
        self.changed = False

    def _name(self, name: str) -> str:
        if name in self.names:
            return name
        if len(self.names) >= self.max_names:
            return OTHER
        self.names.add(name)
        return name

    def count(self, event: str, name: str, queue: str, exception: str = "") -> None:
        with self.lock:
            key = (event, self._name(name), queue, exception)
            self.counters[key] = self.counters.get(key, 0) + 1
            self.changed = True

    def observe(self, histogram: str, name: str, queue: str, value: float) -> None:
        if not math.isfinite(value):
            return
        bounds = RUNTIME_BUCKETS if histogram == "runtime" else WAIT_BUCKETS
        with self.lock:
            series = self.histograms[histogram].setdefault((self._name(name), queue), [0.0] * (len(bounds) + 3))
            index = next((i for i, bound in enumerate(bounds) if value <= bound), len(bounds))
            series[index] += 1  # per bucket, +Inf last; then the sum and the count
            series[-2] += value
            series[-1] += 1
            self.changed = True

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            self.changed = False
            return {
                "pid": os.getpid(),
                "counters": [[*key, n] for key, n in self.counters.items()],
                "runtime": [[*key, values] for key, values in self.histograms["runtime"].items()],
                "wait": [[*key, values] for key, values in self.histograms["wait"].items()],
            }


STATS = Stats()


def write(path: str, stats: Stats = STATS, force: bool = False) -> None:
    if not (stats.changed or force):
        return
    from tlrun.launch.heartbeat import write_json

    write_json(path, stats.snapshot())


def _queue(request: Any) -> str:
    info = getattr(request, "delivery_info", None) or {}
    return str(info.get("routing_key") or "celery")


def _exception_name(exc: Any) -> str:
    inner = getattr(exc, "exc", None)  # billiard's ExceptionWithTraceback
    exc = inner if isinstance(inner, BaseException) else exc
    return type(exc).__name__


def _waited(request: Any, started: float) -> float | None:
    """Seconds from its publish (or its ETA, when later) to its start; None without a publish time."""
    headers = getattr(request, "request_dict", None) or {}
    sent = headers.get(SENT_HEADER)
    if not isinstance(sent, (int, float)):
        return None
    baseline = float(sent)
    eta = getattr(request, "eta", None)
    if isinstance(eta, str):
        try:
            baseline = max(baseline, datetime.fromisoformat(eta).timestamp())
        except ValueError:
            pass
    return max(0.0, started - baseline)


def _wrap(cls: Any, method: str, before: Any) -> None:
    original = getattr(cls, method, None)
    if original is None or getattr(original, "_tlrun_counted", False):
        return

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            before(self, *args, **kwargs)
        except Exception:  # counting never breaks a task's outcome
            pass
        return original(self, *args, **kwargs)

    counted._tlrun_counted = True  # type: ignore[attr-defined]
    setattr(cls, method, counted)


def _on_success(request: Any, failed__retval__runtime: Any, **_kw: Any) -> None:
    failed, _retval, runtime = failed__retval__runtime
    if not failed:  # a failure goes on to on_failure, counted there
        STATS.count("succeeded", request.name, _queue(request))
        if isinstance(runtime, (int, float)):
            STATS.observe("runtime", request.name, _queue(request), float(runtime))


def _on_failure(request: Any, exc_info: Any, *_a: Any, **_kw: Any) -> None:
    from celery.exceptions import Ignore, Reject, Retry, Terminated

    exc = getattr(exc_info, "exception", None)
    inner = getattr(exc, "exc", None)
    exc = inner if isinstance(inner, BaseException) else exc
    if isinstance(exc, (Retry, Ignore, Reject, Terminated)):
        return  # counted as retried, rejected or revoked where Celery handles them
    STATS.count("failed", request.name, _queue(request), _exception_name(exc))


def _on_accepted(request: Any, *_a: Any, **_kw: Any) -> None:
    STATS.count("started", request.name, _queue(request))
    waited = _waited(request, time.time())
    if waited is not None:
        STATS.observe("wait", request.name, _queue(request), waited)


def install(prefix: str) -> None:
    """In a worker tlrun runs: count every request's outcome, and write them to `<prefix>.<pid>.json`."""
    from celery import signals
    from celery.worker import request as request_module
    from celery.worker import strategy

    path = f"{prefix}.{os.getpid()}.json"
    base = request_module.Request
    _wrap(base, "on_accepted", _on_accepted)
    _wrap(base, "on_success", _on_success)
    _wrap(base, "on_failure", _on_failure)
    _wrap(base, "on_retry", lambda r, *a, **k: STATS.count("retried", r.name, _queue(r)))
    _wrap(base, "reject", lambda r, *a, **k: STATS.count("rejected", r.name, _queue(r)))
    create = getattr(strategy, "create_request_cls", None)
    if create is not None and not getattr(create, "_tlrun_counted", False):

        def create_request_cls(*args: Any, **kwargs: Any) -> Any:
            cls = create(*args, **kwargs)
            if "on_success" in vars(cls):  # the per-task class's own on_success (it never calls the base's)
                _wrap(cls, "on_success", _on_success)
            return cls

        create_request_cls._tlrun_counted = True  # type: ignore[attr-defined]
        strategy.create_request_cls = create_request_cls

    def received(request: Any = None, **_kw: Any) -> None:
        if request is not None:
            STATS.count("received", request.name, _queue(request))

    def revoked(request: Any = None, **_kw: Any) -> None:
        if request is not None:
            STATS.count("revoked", getattr(request, "name", None) or "unknown", _queue(request))

    def ready(sender: Any = None, **_kw: Any) -> None:
        timer = getattr(sender, "timer", None)
        if timer is not None:
            timer.call_repeatedly(FLUSH_EVERY, write, (path,), priority=0)

    signals.task_received.connect(received, weak=False, dispatch_uid="tlrun-taskstats-received")
    signals.task_revoked.connect(revoked, weak=False, dispatch_uid="tlrun-taskstats-revoked")
    signals.worker_ready.connect(ready, weak=False, dispatch_uid="tlrun-taskstats-ready")
    signals.worker_shutdown.connect(lambda **_kw: write(path), weak=False, dispatch_uid="tlrun-taskstats-last")
    stamp_publish_time()


def stamp_publish_time() -> None:
    """Put the publish time in every task message this process sends (for the queue wait histogram). Call it
    from the app module to stamp the messages of producers tlrun does not run (a web application)."""
    from celery import signals

    def stamp(headers: Any = None, **_kw: Any) -> None:
        if isinstance(headers, dict):
            headers[SENT_HEADER] = time.time()

    signals.before_task_publish.connect(stamp, weak=False, dispatch_uid="tlrun-stamp-publish-time")
