"""Prometheus metrics, in the names dashboards already read (celery-exporter's) plus tlrun's own, written with
prometheus-client: `tlrun doctor --format prometheus` / `--textfile`, and the launcher's endpoint
(`tlrun worker --metrics-port PORT`).

celery-exporter names, for what a launcher knows cheaply: `celery_worker_up` and `celery_worker_tasks_active`
(label `hostname`: the node name), `celery_queue_length` (label `queue_name`; from a launcher only on the
host holding the beat lease, so that hosts do not report one queue several times). Every metric is
documented in the README's "Metrics" section.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from tlrun.ops.doctor import DoctorReport

# name, help, value from the doctor's report
_DOCTOR_GAUGES: tuple[tuple[str, str, Callable[[DoctorReport], float]], ...] = (
    (
        "tlrun_workers_answering",
        "Ping replies from workers on the broker (raw count, duplicates included).",
        lambda r: sum(n.replies for n in r.nodes),
    ),
    ("tlrun_workers_expected", "Workers expected to answer (--expected).", lambda r: r.expected_workers),
    (
        "tlrun_duplicate_node_names",
        "Node names that more than one worker answers to.",
        lambda r: sum(1 for n in r.nodes if n.replies > 1),
    ),
    (
        "tlrun_stray_processes",
        "Project workers, beats and leftovers on this host with no live tlrun launcher.",
        lambda r: sum(1 for p in r.local if p.stray),
    ),
    (
        "tlrun_orphan_processes",
        "Project processes on this host whose parent died (reparented to init).",
        lambda r: sum(1 for p in r.local if p.ppid == 1),
    ),
    (
        "tlrun_beats",
        "Beat processes of the project on this host.",
        lambda r: sum(1 for p in r.local if p.kind == "beat" and p.state != "standby"),
    ),
    ("tlrun_broker_up", "1 when the broker answered, else 0.", lambda r: int(r.broker_reachable)),
    (
        "tlrun_broker_connect_seconds",
        "Time to open a connection to the broker.",
        lambda r: r.broker_connect_s if r.broker_connect_s is not None else float("nan"),
    ),
    ("tlrun_doctor_exit_code", "What `tlrun doctor` would exit with (0 healthy).", lambda r: r.exit_code),
    (
        "tlrun_not_consuming",
        "Queues that a worker of the project answers pings for but does not consume (NOT_CONSUMING).",
        lambda r: sum(1 for f in r.findings if f.code == "NOT_CONSUMING"),
    ),
    (
        "tlrun_beat_lease_held",
        "1 when someone holds the project's beat lease on the broker, else 0.",
        lambda r: int(r.beat_lease is not None),
    ),
)


def prometheus(report: DoctorReport) -> str:
    """The doctor's view: tlrun's gauges labelled with app and project, and `celery_worker_up` per node."""
    registry = CollectorRegistry()
    labels = {"app": report.app, "project": report.project_id}
    for name, help_text, value in _DOCTOR_GAUGES:
        gauge = Gauge(name, help_text, list(labels), registry=registry)
        gauge.labels(**labels).set(value(report))
    up = Gauge(
        "celery_worker_up",
        "1 when the worker answered a ping (celery-exporter's name).",
        ["hostname"],
        registry=registry,
    )
    for node in report.nodes:
        up.labels(hostname=node.name).set(1)
    for proc in report.local:
        if proc.project and proc.kind == "worker" and proc.node and all(n.name != proc.node for n in report.nodes):
            up.labels(hostname=proc.node).set(0)
    return generate_latest(registry).decode()


def check_textfile(path: Path) -> None:
    """An existing target must be a regular file: the rename would replace a device node, a FIFO or a link."""
    import stat

    from tlrun.errors import UsageError

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"--textfile {path} exists and is not a regular file: refusing to replace it")


def write_textfile(path: Path, text: str) -> None:
    """Atomically, as node_exporter's textfile collector wants: write a temp file, then rename."""
    check_textfile(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# -- the launcher's endpoint ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerSample:
    node: str
    role: str
    up: bool
    tasks_active: int | None
    restarts: int
    last_exit_code: int | None
    ready_seconds: float | None
    stop_seconds: float | None
    pool_expected: int | None
    pool_running: int | None
    rss_bytes: int | None
    not_consuming: tuple[str, ...] = ()  # queues


@dataclass(frozen=True)
class LauncherSample:
    workers: tuple[WorkerSample, ...]
    queue_lengths: dict[str, int] = field(default_factory=dict)  # only on the beat-lease holder's host
    beat_lease_held: bool | None = None  # None: this launcher runs no beat


class LauncherCollector(Collector):
    """Reads the launcher's latest sample at scrape time: no broker call on the scrape path."""

    def __init__(self, sample: Callable[[], LauncherSample]) -> None:
        self._sample = sample

    def collect(self) -> Iterator[Any]:
        s = self._sample()
        host = ["hostname"]
        up = GaugeMetricFamily(
            "celery_worker_up", "1 when the worker runs and answered (celery-exporter's name).", labels=host
        )
        active = GaugeMetricFamily("celery_worker_tasks_active", "Tasks the worker is running.", labels=host)
        restarts = CounterMetricFamily(
            "tlrun_worker_restarts", "Restarts of the role's worker by tlrun.", labels=["role"]
        )
        code = GaugeMetricFamily(
            "tlrun_worker_last_exit_code", "Exit status of the role's last worker.", labels=["role"]
        )
        ready = GaugeMetricFamily("tlrun_worker_ready_seconds", "Start to verified ready, last start.", labels=["role"])
        stop = GaugeMetricFamily(
            "tlrun_worker_stop_seconds", "Duration of the last stop of the role's worker.", labels=["role"]
        )
        pool = GaugeMetricFamily(
            "tlrun_pool_processes", "Pool processes of the worker: expected and running.", labels=["hostname", "state"]
        )
        rss = GaugeMetricFamily("tlrun_worker_rss_bytes", "Resident memory of the worker's main process.", labels=host)
        stuck = GaugeMetricFamily(
            "tlrun_not_consuming", "1 when the worker does not consume this queue.", labels=["hostname", "queue_name"]
        )
        for w in s.workers:
            up.add_metric([w.node], 1 if w.up else 0)
            if w.tasks_active is not None:
                active.add_metric([w.node], w.tasks_active)
            restarts.add_metric([w.role], w.restarts)
            if w.last_exit_code is not None:
                code.add_metric([w.role], w.last_exit_code)
            if w.ready_seconds is not None:
                ready.add_metric([w.role], w.ready_seconds)
            if w.stop_seconds is not None:
                stop.add_metric([w.role], w.stop_seconds)
            if w.pool_expected is not None:
                pool.add_metric([w.node, "expected"], w.pool_expected)
            if w.pool_running is not None:
                pool.add_metric([w.node, "running"], w.pool_running)
            if w.rss_bytes is not None:
                rss.add_metric([w.node], w.rss_bytes)
            for queue in w.not_consuming:
                stuck.add_metric([w.node, queue], 1)
        families: list[Any] = [up, active, restarts, code, ready, stop, pool, rss, stuck]
        if s.queue_lengths:
            length = GaugeMetricFamily("celery_queue_length", "Messages waiting in the queue.", labels=["queue_name"])
            for queue, n in sorted(s.queue_lengths.items()):
                length.add_metric([queue], n)
            families.append(length)
        if s.beat_lease_held is not None:
            families.append(
                GaugeMetricFamily(
                    "tlrun_beat_lease_held",
                    "1 while this launcher holds the cluster's beat lease.",
                    value=int(s.beat_lease_held),
                )
            )
        yield from families


def serve(port: int, addr: str, sample: Callable[[], LauncherSample]) -> Any:
    """Serve /metrics on a daemon thread; returns the server (shutdown() stops it). Raises OSError."""
    from prometheus_client import start_http_server

    registry = CollectorRegistry()
    registry.register(LauncherCollector(sample))
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server
