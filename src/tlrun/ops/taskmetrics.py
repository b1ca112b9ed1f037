"""Task metrics on the launcher's endpoint, in celery-exporter's names, types and labels (launcher side; the
worker counts them: launch/taskstats.py).

Read at scrape time from the files the role's workers write (`<prefix>.<worker pid>.json`). Counters stay
monotonic through a worker's restart, a reload's new generation and a crash: the counts of a worker that is
gone are folded into the role's base once (its file read a last time, then removed), so a dashboard's
`increase()` never sees a reset while the launcher runs. Every outcome counter exists for each (task, queue)
seen, at 0 where nothing happened (as celery-exporter does), so that ratios such as succeeded / (succeeded +
failed) have both sides.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tlrun.launch.taskstats import EVENTS, RUNTIME_BUCKETS, WAIT_BUCKETS

MAX_FILE = 1 << 20
HELP = {
    "received": "Sent when the worker receives a task.",
    "started": "Sent just before the worker executes the task.",
    "succeeded": "Sent if the task executed successfully.",
    "failed": "Sent if the execution of the task failed.",
    "retried": "Sent if the task failed, but will be retried in the future.",
    "rejected": "The task was rejected by the worker, possibly to be re-queued or moved to a dead letter queue.",
    "revoked": "Sent if the task has been revoked.",
}
RUNTIME_HELP = "Histogram of task runtime measurements."
WAIT_HELP = (
    "Histogram of the time tasks spend waiting in the queue before being executed, excluding deliberate "
    "ETA/countdown delay (tasks whose publisher stamped the publish time)."
)


class Totals:
    """One role's counts: what its gone workers left (the base) plus its live workers' latest."""

    def __init__(self) -> None:
        self.counters: dict[tuple[str, str, str, str], float] = {}
        self.histograms: dict[str, dict[tuple[str, str], list[float]]] = {"runtime": {}, "wait": {}}

    def add(self, record: dict[str, Any]) -> None:
        for row in record.get("counters") or []:
            *key, n = row
            if len(key) == 4 and isinstance(n, (int, float)):
                k = (str(key[0]), str(key[1]), str(key[2]), str(key[3]))
                self.counters[k] = self.counters.get(k, 0) + n
        for kind, bounds in (("runtime", RUNTIME_BUCKETS), ("wait", WAIT_BUCKETS)):
            for row in record.get(kind) or []:
                name, queue, values = row
                if not isinstance(values, list) or len(values) != len(bounds) + 3:
                    continue
                series = self.histograms[kind].setdefault((str(name), str(queue)), [0.0] * len(values))
                for i, value in enumerate(values):
                    series[i] += float(value)

    def merged(self, other: Totals) -> Totals:
        out = Totals()
        for source in (self, other):
            out.add(source.as_record())
        return out

    def as_record(self) -> dict[str, Any]:
        return {
            "counters": [[*key, n] for key, n in self.counters.items()],
            "runtime": [[*key, v] for key, v in self.histograms["runtime"].items()],
            "wait": [[*key, v] for key, v in self.histograms["wait"].items()],
        }


def _read(path: str) -> dict[str, Any] | None:
    """A worker's count file: the user's own regular file (never a FIFO or a link someone put there)."""
    from pathlib import Path

    from tlrun.safefile import read_private

    data = read_private(Path(path), MAX_FILE)
    try:
        record = json.loads(data) if data is not None else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


class RoleTasks:
    """The task counts of one role of this launcher, across its workers' generations."""

    def __init__(self, prefix: str) -> None:
        import threading

        self.prefix = prefix
        self.base = Totals()
        self._lock = threading.Lock()  # scrapes come on threads of their own: a gone worker is folded once

    def files(self) -> Iterator[tuple[int, str]]:
        for path in glob.glob(glob.escape(self.prefix) + ".*.json"):
            pid = path[len(self.prefix) + 1 : -len(".json")]
            if pid.isdigit():
                yield int(pid), path

    def totals(self, live: Callable[[int], bool]) -> Totals:
        """The base plus every live worker's file; a gone worker's file is read a last time, folded, removed."""
        with self._lock:
            return self._totals(live)

    def _totals(self, live: Callable[[int], bool]) -> Totals:
        current = Totals()
        for pid, path in sorted(self.files()):
            record = _read(path)
            if live(pid):
                if record is not None:
                    current.add(record)
                continue
            if record is not None:
                self.base.add(record)
            with contextlib.suppress(OSError):
                os.unlink(path)
        return self.base.merged(current)

    def remove(self) -> None:
        for _pid, path in self.files():
            with contextlib.suppress(OSError):
                os.unlink(path)


def families(per_role: Iterable[tuple[str, str, Totals]]) -> list[Any]:
    """(role, hostname, totals) -> celery-exporter's task families, plus the `worker` label (the role)."""
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

    labels = ["name", "hostname", "queue_name", "worker"]
    counters = {e: CounterMetricFamily(f"celery_task_{e}", HELP[e], labels=labels) for e in EVENTS if e != "failed"}
    failed = CounterMetricFamily("celery_task_failed", HELP["failed"], labels=[*labels, "exception"])
    runtime = HistogramMetricFamily("celery_task_runtime", RUNTIME_HELP, labels=labels)
    wait = HistogramMetricFamily("celery_task_queue_wait_time", WAIT_HELP, labels=labels)
    for role, hostname, totals in per_role:
        seen = {(name, queue) for (_e, name, queue, _x) in totals.counters}
        failures: dict[tuple[str, str], dict[str, float]] = {}
        for (event, name, queue, exception), n in totals.counters.items():
            if event == "failed":
                failures.setdefault((name, queue), {})[exception] = n
        for name, queue in sorted(seen):
            at = [name, hostname, queue, role]
            for event, family in counters.items():
                family.add_metric(at, totals.counters.get((event, name, queue, ""), 0))
            for exception, n in sorted((failures.get((name, queue)) or {"": 0}).items()):
                failed.add_metric([*at, exception], n)
        for histogram, kind, bounds in ((runtime, "runtime", RUNTIME_BUCKETS), (wait, "wait", WAIT_BUCKETS)):
            for (name, queue), values in sorted(totals.histograms[kind].items()):
                cumulative, buckets = 0.0, []
                for bound, n in zip([*map(_le, bounds), "+Inf"], values[:-2], strict=True):
                    cumulative += n
                    buckets.append((bound, cumulative))
                histogram.add_metric([name, hostname, queue, role], buckets, values[-2])
    return [*counters.values(), failed, runtime, wait]


def _le(bound: float) -> str:
    return repr(float(bound))
