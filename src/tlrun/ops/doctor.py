"""`tlrun doctor`: why do my tasks run twice, run old code, or never run?

Joins the local view (inventory) and the broker's view (one broadcast ping, counted from the raw reply list)
with the app's configuration, and returns findings, each with a severity, a sentence and a fix. Takes about
one ping window: the app is imported while the census ping is in flight.
"""

from __future__ import annotations

import collections
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from tlrun.cluster.backends import backend_for
from tlrun.cluster.lease import Holder, lease_name
from tlrun.config import Settings
from tlrun.errors import (
    DOCTOR_WARNINGS_EXIT_CODE,
    HUNG_TASK_EXIT_CODE,
    NOT_CONSUMING_EXIT_CODE,
    AppImportError,
    BrokerError,
    DuplicateNodeError,
)
from tlrun.launch import launchers, owner, procs, verify
from tlrun.launch.broker import Broker, broker_for_command, load_app
from tlrun.ops import consuming, hung, inventory
from tlrun.ops.findings import (
    Finding,
    NodeView,
    config_findings,
    lease_findings,
    memory_finding,
    redis_findings,
    role_findings,
    state_findings,
)
from tlrun.ops.inventory import STANDBY
from tlrun.redact import redact_url

SCHEMA_VERSION = 3  # 3: local kind `leftover`, `beat_lease`, findings BEAT_LEASE, BEAT_WITHOUT_LEASE, NOT_CONSUMING


@dataclass(frozen=True)
class DoctorReport:
    project_root: str
    app: str
    project_id: str
    broker_url: str  # redacted
    broker_reachable: bool
    broker_connect_s: float | None  # time to open a connection; None when it failed
    ping_window_s: float
    expected_workers: int
    nodes: tuple[NodeView, ...]
    local: tuple[inventory.LocalProcess, ...]
    findings: tuple[Finding, ...]
    exit_code: int
    status: str  # "healthy" | "warnings" | "problems" | "failure"
    seconds: float
    schema_version: int = field(default=SCHEMA_VERSION)
    beat_lease: str | None = None  # who holds the cluster's beat lease ("hostA pid 4242 since ..."), if anyone
    # For the metrics only (not in --json): labels the same on every host, and the per-series facts.
    project_name: str = ""  # the project file's `name`, else the app
    node_roles: dict[str, str] = field(default_factory=dict)  # node -> role (by node prefix)
    not_consuming: tuple[tuple[str, str], ...] = ()  # (node, queue)
    lease_host: str | None = None  # the host whose beat holds the lease
    hung_tasks: dict[str, int] = field(default_factory=dict)  # node -> tasks past their limit
    memory_kills: dict[str, int] = field(default_factory=dict)  # task name -> pool children the guard killed

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for private in ("project_name", "node_roles", "not_consuming", "lease_host", "hung_tasks", "memory_kills"):
            data.pop(private)
        data["nodes"] = [asdict(n) for n in self.nodes]
        data["local"] = [p.as_dict() for p in self.local]
        data["findings"] = [{k: v for k, v in asdict(f).items() if k != "task" or v is not None} for f in self.findings]
        return data


# Findings whose presence decides the exit code, most serious first.
_EXIT_BY_CODE = {
    "BROKER_UNREACHABLE": BrokerError.exit_code,
    "APP_IMPORT": AppImportError.exit_code,
    "DUPLICATE_NODE": DuplicateNodeError.exit_code,
    "ROLE_MISSING": DuplicateNodeError.exit_code,
    "TWO_LAUNCHERS": DuplicateNodeError.exit_code,
    "STRAY_PROCESS": DuplicateNodeError.exit_code,
    "MULTIPLE_BEATS": DuplicateNodeError.exit_code,
    "BEAT_WITHOUT_LEASE": DuplicateNodeError.exit_code,
    "NOT_CONSUMING": NOT_CONSUMING_EXIT_CODE,
    "HUNG_TASK": HUNG_TASK_EXIT_CODE,
}

CONNECT_WAIT = 2.0  # at most this long for the census to connect before the scan runs anyway


def exit_code_for(findings: list[Finding]) -> tuple[int, str]:
    for code in _EXIT_BY_CODE:
        if any(f.code == code for f in findings):
            exit_code = _EXIT_BY_CODE[code]
            return exit_code, "failure" if exit_code in (4, 5) else "problems"
    if any(f.severity in ("warning", "error") for f in findings):
        return DOCTOR_WARNINGS_EXIT_CODE, "warnings"
    return 0, "healthy"


def node_views(replies: list[str], local: list[inventory.LocalProcess], hostname: str, app: str) -> list[NodeView]:
    counts = collections.Counter(replies)
    local_by_node = procs.pids_by_node(local, app)
    views = []
    for name, n in sorted(counts.items()):
        host = name.split("@", 1)[1] if "@" in name else ""
        views.append(NodeView(name, n, host, host == hostname, tuple(sorted(local_by_node.get(name, ())))))
    return views


def _connect_time(url: str) -> float | None:
    started = time.monotonic()
    try:
        with Broker(url) as broker:
            broker.connect()
    except BrokerError:
        return None
    return round(time.monotonic() - started, 4)


def diagnose(settings: Settings) -> DoctorReport:
    started = time.monotonic()
    hostname = socket.gethostname()
    findings: list[Finding] = []
    app: Any = None
    try:
        broker_url, _ = broker_for_command(settings, app_first=True)
    except AppImportError as exc:
        local = [p for p in inventory.local_processes(settings, everything=True) if p.project]
        return _failed(settings, started, [Finding("APP_IMPORT", "error", str(exc), "fix the import error")], local)
    census: verify.Census[list[str]] = verify.Census(broker_url, settings.ping_window).start()
    queues = (
        verify.Census(broker_url, settings.ping_window, lambda broker, window: broker.active_queues(window)).start()
        if settings.declared_roles
        else None
    )
    lease = _LeaseProbe(settings, broker_url)
    lease.start()
    queued = consuming.project_queues(settings)
    waiting: verify.Census[dict[str, int | None]] = verify.Census(
        broker_url, settings.ping_window, lambda broker, _window: consuming.depths(broker, queued)
    ).start()
    # The one read of the process table (pids for node names, the project's launchers) runs while the pings
    # are out, once the census is connected: the scan (CPU, holding the GIL) must not slow its connection.
    census.connected.wait(CONNECT_WAIT)
    table = procs.snapshot()
    rows = procs.scan(("worker", "beat", procs.LEFTOVER), table=table)
    everyone = inventory.local_processes(settings, everything=True, table=rows)
    running = launchers.find_launchers(settings.project_root, table)
    local = [p for p in everyone if p.project]
    connect_s = _connect_time(broker_url)
    try:
        app = load_app(settings)
    except AppImportError as exc:
        findings.append(Finding("APP_IMPORT", "error", str(exc), "fix the import error, then run doctor again"))
    try:
        replies = census.result()
        reachable = True
    except BrokerError as exc:
        replies, reachable = [], False
        findings.append(Finding("BROKER_UNREACHABLE", "error", str(exc), exc.hint))
    nodes = node_views(replies, everyone, hostname, settings.app)
    project_nodes = {p.node for p in local if p.project}
    for node in nodes:
        if node.replies > 1:
            where = (
                f"{len(node.local_pids)} on this host (pid {', '.join(map(str, node.local_pids))})"
                if node.local_pids
                else "on other hosts"
                if not node.this_host
                else "on this host, another user"
            )
            fix = "tlrun doctor --fix" if node.name in project_nodes else "tlrun doctor --fix --remote"
            findings.append(
                Finding(
                    "DUPLICATE_NODE",
                    "error",
                    f"{node.replies} workers answer as {node.name} ({where}): tasks are split and "
                    "control commands reach only one of them",
                    fix,
                )
            )
    answering = sum(n.replies for n in nodes)
    if reachable and answering > settings.expected_workers:
        here = [n.name for n in nodes if n.this_host]
        findings.append(
            Finding(
                "TOO_MANY_WORKERS",
                "warning",
                f"{answering} workers answer on this broker, expected {settings.expected_workers} "
                f"({len(here)} on this host: {', '.join(here) or 'none'})",
                "tlrun ps --all, then tlrun stop or tlrun doctor --fix",
            )
        )
    if reachable and settings.declared_roles:
        try:
            consumed = queues.result() if queues is not None else []
        except BrokerError:  # the ping census reports the broker's failure
            consumed = []
        findings.extend(role_findings(settings, nodes, consumed))
    elif reachable and answering == 0 and not any(p.kind == "worker" for p in local):
        findings.append(
            Finding("NO_WORKERS", "warning", "no worker answers on this broker: tasks will wait", "tlrun worker")
        )
    answered = {n.name for n in nodes}
    for proc in local:
        if reachable and proc.kind == "worker" and proc.node and proc.node not in answered and proc.state != "stopped":
            findings.append(
                Finding(
                    "SILENT_WORKER",
                    "info",
                    f"worker pid {proc.pid} ({proc.node}) runs here but did not answer the ping: busy (a solo "
                    "pool running a task) or paused in a debugger",
                    None,
                )
            )
    for proc in local:
        if proc.stray and proc.kind == procs.LEFTOVER:
            findings.append(
                Finding(
                    "STRAY_PROCESS",
                    "error",
                    f"leftover process pid {proc.pid} ({proc.node or '?'}) was started by one of this project's "
                    "workers, whose launcher is gone",
                    "tlrun doctor --fix",
                )
            )
        elif proc.stray:
            what = f"{proc.kind} {proc.name}" if proc.kind in ("process", "flower", "broker") else proc.kind
            findings.append(
                Finding(
                    "STRAY_PROCESS",
                    "error",
                    f"stray {what} pid {proc.pid} ({proc.node or 'no node name'}) runs this "
                    "project's code with no tlrun launcher: it may run old code",
                    "tlrun doctor --fix",
                )
            )
    holder = lease.result()
    stuck: list[tuple[str, str]] = []
    hung_tasks: dict[str, int] = {}
    findings.extend(lease_findings(holder, local, hostname))
    findings.extend(redis_findings(lease.policy, lease.skew, settings.beat_lock_ttl))
    if reachable:
        try:
            depths: dict[str, int | None] | None = waiting.result()
        except BrokerError:
            depths = None
        for nc in consuming.project_check(settings, broker_url, [n.name for n in nodes], depths):
            findings.append(Finding("NOT_CONSUMING", "error", nc.message(), "tlrun worker --restart restarts it"))
            stuck.append((nc.node, nc.queue))
    memory_kills: dict[str, int] = {}
    for pid, record in inventory.guarded_pids(settings).items():
        findings.append(memory_finding(pid, record))
        for task, n in (record.get("kills") or {}).items():
            memory_kills[str(task)] = memory_kills.get(str(task), 0) + int(n)
    for h in hung.project_check(settings, broker_url if reachable else None, [n.name for n in nodes]):
        hung_tasks[h.node] = hung_tasks.get(h.node, 0) + 1
        fix = "tlrun worker --restart recovers it (prefork: kills that pool child; other pools: restarts the worker)"
        findings.append(Finding("HUNG_TASK", "error", h.message(), fix, h.as_dict()))
    beats = [p for p in local if p.project and p.kind == "beat" and p.state != STANDBY]
    if len(beats) > 1:
        findings.append(
            Finding(
                "MULTIPLE_BEATS",
                "error",
                f"{len(beats)} beats run for this project (pids {', '.join(str(b.pid) for b in beats)}): "
                "every periodic task runs more than once",
                "tlrun doctor --fix",
            )
        )
    for proc in local:
        if proc.project and proc.state == "stopped":
            findings.append(
                Finding(
                    "STOPPED_PROCESS",
                    "warning",
                    f"{proc.kind} pid {proc.pid} is stopped (SIGSTOP): it takes no tasks",
                    f"kill -CONT {proc.pid}, or tlrun stop",
                )
            )
    findings.extend(state_findings(settings, running))
    stranger = owner.foreign_listener(broker_url)
    if stranger is not None:
        findings.append(
            Finding(
                "FOREIGN_BROKER",
                "warning",
                f"the broker at {redact_url(broker_url)} is run by {owner.user_name(stranger)}, another local user: "
                "they can read every message and feed your workers tasks",
                "run a broker of your own (tlrun dev starts one when CELERY_BROKER_URL names a free local port)",
            )
        )
    if app is not None:
        # Root matters only for workers that run: they get tlrun's user.
        workers_here = any(p.kind == "worker" for p in local)
        from tlrun.project.appconfig import dialect

        style = dialect(settings.project_root, settings.code_root, settings.app)
        findings.extend(config_findings(app.conf, broker_url, os.geteuid() == 0 and workers_here, style))
    exit_code, status = exit_code_for(findings)
    return DoctorReport(
        project_root=str(settings.project_root),
        app=settings.app,
        project_id=settings.project_id,
        broker_url=redact_url(broker_url),
        broker_reachable=reachable,
        broker_connect_s=connect_s,
        ping_window_s=settings.ping_window,
        expected_workers=settings.expected_workers,
        nodes=tuple(nodes),
        local=tuple(local),
        findings=tuple(findings),
        exit_code=exit_code,
        status=status,
        seconds=round(time.monotonic() - started, 2),
        beat_lease=holder.describe() if holder is not None else None,
        project_name=settings.project_name or settings.app,
        node_roles={n.name: role.name for n in nodes for role in settings.all_roles if role.owns_node(n.name)},
        not_consuming=tuple(stuck),
        lease_host=holder.host if holder is not None else None,
        hung_tasks=hung_tasks,
        memory_kills=memory_kills,
    )


class _LeaseProbe:
    """Who holds the beat lease, asked on a thread while the ping census runs. None: nobody, or no answer."""

    def __init__(self, settings: Settings, broker_url: str) -> None:
        self._settings = settings
        self._url = broker_url
        self._holder: Holder | None = None
        self.policy: str | None = None  # Redis's eviction policy, when it has a memory limit
        self.skew: float | None = None  # the Redis server's clock minus ours
        self._thread = threading.Thread(target=self._run, name="tlrun-lease-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        s = self._settings
        try:
            backend = backend_for(self._url, lease_name(s.app, s.project_name), s.beat_lock_ttl)
        except ValueError:
            return
        try:
            self._holder = backend.current()
            facts = getattr(backend, "server_facts", None)  # Redis
            if facts is not None:
                self.policy, self.skew = facts()
        except OSError:
            pass  # the census reports an unreachable broker
        finally:
            backend.close()

    def result(self) -> Holder | None:
        self._thread.join(5.0)
        return self._holder


def _failed(
    settings: Settings, started: float, findings: list[Finding], local: list[inventory.LocalProcess]
) -> DoctorReport:
    exit_code, status = exit_code_for(findings)
    return DoctorReport(
        project_root=str(settings.project_root),
        app=settings.app,
        project_id=settings.project_id,
        broker_url=redact_url(settings.broker_url),
        broker_reachable=False,
        broker_connect_s=None,
        ping_window_s=settings.ping_window,
        expected_workers=settings.expected_workers,
        nodes=(),
        local=tuple(local),
        findings=tuple(findings),
        exit_code=exit_code,
        status=status,
        seconds=round(time.monotonic() - started, 2),
    )
