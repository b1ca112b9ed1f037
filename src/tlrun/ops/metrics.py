"""Prometheus metrics, in the names dashboards already read (celery-exporter's) plus tlrun's own, written with
prometheus-client: `tlrun doctor --format prometheus` / `--textfile`, and the launcher's endpoint
(`tlrun worker --metrics-port PORT`).

celery-exporter names, for what a launcher knows cheaply: `celery_worker_up` and `celery_worker_tasks_active`
(label `hostname`: the node name), `celery_queue_length` (label `queue_name`; from a launcher only on the
host holding the beat lease, so that hosts do not report one queue several times). Every metric is
documented in docs/metrics.md.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
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
    ("tlrun_broker_up", "1 when the broker answered the last check, else 0.", lambda r: int(r.broker_reachable)),
    (
        "tlrun_broker_connect_seconds",
        "Time to open a connection to the broker.",
        lambda r: r.broker_connect_s if r.broker_connect_s is not None else float("nan"),
    ),
    ("tlrun_doctor_exit_code", "What `tlrun doctor` would exit with (0 healthy).", lambda r: r.exit_code),
)


def host_of(node: str) -> str:
    """celery-exporter's `hostname` label: the host part of a node name (`api4242@web-1` -> `web-1`), so that
    a restart (a new pid in the name) continues the same series."""
    return node.rsplit("@", 1)[1] if "@" in node else node


def prometheus(report: DoctorReport) -> str:
    """The doctor's view: tlrun's gauges labelled with the app and the project's name (the same on every
    host), and the metrics it shares with the launcher's endpoint in the endpoint's labels and meaning."""
    registry = CollectorRegistry()
    labels = {"app": report.app, "project": report.project_name or report.app}
    for name, help_text, value in _DOCTOR_GAUGES:
        gauge = Gauge(name, help_text, list(labels), registry=registry)
        gauge.labels(**labels).set(value(report))
    up = Gauge("celery_worker_up", WORKER_UP_HELP, ["hostname", "worker"], registry=registry)
    for node in report.nodes:
        if node.name in report.node_roles:  # the project's own: other apps' workers on the broker are not ours
            up.labels(hostname=host_of(node.name), worker=report.node_roles[node.name]).set(1)
    for proc in report.local:
        if proc.project and proc.kind == "worker" and proc.node and all(n.name != proc.node for n in report.nodes):
            up.labels(hostname=host_of(proc.node), worker=proc.role or "").set(0)
    stuck = Gauge("tlrun_not_consuming", NOT_CONSUMING_HELP, ["hostname", "worker", "queue_name"], registry=registry)
    for name, queue in report.not_consuming:
        stuck.labels(hostname=host_of(name), worker=report.node_roles.get(name, ""), queue_name=queue).set(1)
    hung = Gauge("tlrun_hung_tasks", HUNG_HELP, ["hostname", "worker"], registry=registry)
    for name, count in report.hung_tasks.items():
        hung.labels(hostname=host_of(name), worker=report.node_roles.get(name, "")).set(count)
    kills = Counter("tlrun_memory_kills", MEMORY_KILLS_HELP, ["task"], registry=registry)
    for task, n in sorted(report.memory_kills.items()):
        kills.labels(task=task).inc(n)
    lease = Gauge("tlrun_beat_lease_held", LEASE_HELP, ["hostname"], registry=registry)
    if report.lease_host is not None:
        lease.labels(hostname=report.lease_host).set(1)
    return generate_latest(registry).decode()


WORKER_UP_HELP = "1 when the worker runs, answered, and its broker answers (celery-exporter's name)."
BROKER_UP_HELP = "1 when the broker answered the last check, else 0."
NOT_CONSUMING_HELP = "1 when the worker answers pings but does not consume this queue while messages wait."
LEASE_HELP = "1 when the beat on this host holds the project's beat lease."
MEMORY_KILLS_HELP = "Pool children tlrun's memory guard killed, by the task they ran."
HUNG_HELP = "Tasks running past their hard time limit (or hung_after without one): HUNG_TASK."


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
    hung_tasks: int = 0  # tasks past their hard time limit (or hung_after) now
    tasks_busy: int | None = None  # active + reserved, as the worker last replied
    concurrency: int | None = None  # its pool's size (prefork: the CPUs by default), None when unknown


@dataclass(frozen=True)
class LauncherSample:
    workers: tuple[WorkerSample, ...]
    queue_lengths: dict[str, int] = field(default_factory=dict)  # only on the beat-lease holder's host
    beat_lease_held: bool | None = None  # None: this launcher runs no beat
    hostname: str = ""  # this host (the `hostname` label of tlrun_beat_lease_held)
    hung_recoveries: int = 0  # hung tasks recovered (a pool child killed, a worker restarted)
    memory_kills: dict[str, int] = field(default_factory=dict)  # task name -> pool children the guard killed
    broker_up: bool | None = None  # the last check's answer (None: no check yet)
    app: str = ""
    project: str = ""
    tasks: tuple[tuple[str, str, Any], ...] = ()  # (role, hostname label, taskmetrics.Totals) per role


UTILISATION_HELP = (
    "Tasks the worker holds (active + reserved) per pool process, as it last replied: 1 is full, above 1 "
    "tasks wait in its prefetch."
)


class LauncherCollector(Collector):
    """Reads the launcher's latest sample at scrape time: no broker call on the scrape path."""

    def __init__(self, sample: Callable[[], LauncherSample]) -> None:
        self._sample = sample

    def collect(self) -> Iterator[Any]:
        s = self._sample()
        # celery-exporter's `hostname` (the host part of the node name: a restart continues the series) and a
        # `worker` label, the role: two roles on one host are two series.
        host = ["hostname", "worker"]
        up = GaugeMetricFamily("celery_worker_up", WORKER_UP_HELP, labels=host)
        active = GaugeMetricFamily("celery_worker_tasks_active", "Tasks the worker is running.", labels=host)
        restarts = CounterMetricFamily("tlrun_worker_restarts", "Restarts of the role's worker by tlrun.", labels=host)
        code = GaugeMetricFamily("tlrun_worker_last_exit_code", "Exit status of the role's last worker.", labels=host)
        ready = GaugeMetricFamily("tlrun_worker_ready_seconds", "Start to verified ready, last start.", labels=host)
        stop = GaugeMetricFamily(
            "tlrun_worker_stop_seconds", "Duration of the last stop of the role's worker.", labels=host
        )
        pool = GaugeMetricFamily(
            "tlrun_pool_processes", "Pool processes of the worker: expected and running.", labels=[*host, "state"]
        )
        rss = GaugeMetricFamily("tlrun_worker_rss_bytes", "Resident memory of the worker's main process.", labels=host)
        stuck = GaugeMetricFamily("tlrun_not_consuming", NOT_CONSUMING_HELP, labels=[*host, "queue_name"])
        hung = GaugeMetricFamily("tlrun_hung_tasks", HUNG_HELP, labels=host)
        utilisation = GaugeMetricFamily("tlrun_worker_utilisation", UTILISATION_HELP, labels=host)
        for w in s.workers:
            at = [host_of(w.node), w.role]
            up.add_metric(at, 1 if w.up else 0)
            if w.tasks_active is not None:
                active.add_metric(at, w.tasks_active)
            restarts.add_metric(at, w.restarts)
            if w.last_exit_code is not None:
                code.add_metric(at, w.last_exit_code)
            if w.ready_seconds is not None:
                ready.add_metric(at, w.ready_seconds)
            if w.stop_seconds is not None:
                stop.add_metric(at, w.stop_seconds)
            if w.pool_expected is not None:
                pool.add_metric([*at, "expected"], w.pool_expected)
            if w.pool_running is not None:
                pool.add_metric([*at, "running"], w.pool_running)
            if w.rss_bytes is not None:
                rss.add_metric(at, w.rss_bytes)
            for queue in w.not_consuming:
                stuck.add_metric([*at, queue], 1)
            hung.add_metric(at, w.hung_tasks)
            if w.tasks_busy is not None and w.concurrency:
                utilisation.add_metric(at, w.tasks_busy / w.concurrency if w.up else 0.0)
        recovered = CounterMetricFamily("tlrun_hung_task_recoveries", "Hung tasks recovered (--restart).")
        recovered.add_metric([], s.hung_recoveries)
        kills = CounterMetricFamily("tlrun_memory_kills", MEMORY_KILLS_HELP, labels=["task"])
        for task, n in sorted(s.memory_kills.items()):
            kills.add_metric([task], n)
        families: list[Any] = [up, active, restarts, code, ready, stop, pool, rss, stuck, hung, utilisation]
        families += [recovered, kills]
        if s.tasks:
            from tlrun.ops import taskmetrics

            families += taskmetrics.families(s.tasks)
        if s.queue_lengths:
            length = GaugeMetricFamily("celery_queue_length", "Messages waiting in the queue.", labels=["queue_name"])
            for queue, n in sorted(s.queue_lengths.items()):
                length.add_metric([queue], n)
            families.append(length)
        if s.broker_up is not None:
            broker = GaugeMetricFamily("tlrun_broker_up", BROKER_UP_HELP, labels=["app", "project"])
            broker.add_metric([s.app, s.project], int(s.broker_up))
            families.append(broker)
        if s.beat_lease_held is not None:
            lease = GaugeMetricFamily("tlrun_beat_lease_held", LEASE_HELP, labels=["hostname"])
            lease.add_metric([s.hostname], int(s.beat_lease_held))
            families.append(lease)
        yield from families


def serve(port: int, addr: str, sample: Callable[[], LauncherSample]) -> Any:
    """Serve /metrics on a daemon thread; returns the server (shutdown() stops it). Raises OSError."""
    from prometheus_client import start_http_server

    registry = CollectorRegistry()
    registry.register(LauncherCollector(sample))
    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server
