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
from urllib.parse import urlsplit

from tlrun.cluster.lease import Holder, backend_for, lease_name
from tlrun.config import ENV_GUARD, Settings
from tlrun.errors import (
    DOCTOR_WARNINGS_EXIT_CODE,
    NOT_CONSUMING_EXIT_CODE,
    AppImportError,
    BrokerError,
    DuplicateNodeError,
    TlrunError,
)
from tlrun.launch import guard, procs, verify
from tlrun.launch.broker import Broker, load_app, resolve_broker_url
from tlrun.launch.procs import Identity
from tlrun.launch.units import WAITING
from tlrun.ops import consuming, inventory
from tlrun.ops.inventory import STANDBY
from tlrun.redact import redact_url

SCHEMA_VERSION = 3  # 3: local kind `leftover`, `beat_lease`, findings BEAT_LEASE, BEAT_WITHOUT_LEASE, NOT_CONSUMING
RECOMMENDED = "see README: Recommended Celery settings"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Finding:
    code: str  # stable identifier, e.g. DUPLICATE_NODE
    severity: str  # "error" | "warning" | "info"
    message: str
    fix: str | None = None


@dataclass(frozen=True)
class NodeView:
    name: str
    replies: int
    host: str
    this_host: bool
    local_pids: tuple[int, ...]


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

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["nodes"] = [asdict(n) for n in self.nodes]
        data["local"] = [p.as_dict() for p in self.local]
        data["findings"] = [asdict(f) for f in self.findings]
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
}


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


def config_findings(conf: Any, broker_url: str, running_as_root: bool) -> list[Finding]:
    """Settings that lose or repeat tasks. `conf` is a Celery app's conf (or any mapping-like object)."""
    found = []

    def get(key: str, default: Any = None) -> Any:
        try:
            return conf.get(key, default)
        except Exception:
            return default

    if not get("task_acks_late"):
        found.append(
            Finding(
                "ACKS_EARLY",
                "warning",
                "task_acks_late is off: a task running when its worker dies is lost",
                RECOMMENDED,
            )
        )
    prefetch = get("worker_prefetch_multiplier", 4)
    if isinstance(prefetch, int) and prefetch > 1:
        found.append(
            Finding(
                "PREFETCH",
                "warning",
                f"worker_prefetch_multiplier is {prefetch}: with long tasks, messages wait behind a busy "
                "worker and come back late when it dies",
                RECOMMENDED,
            )
        )
    accept = get("accept_content") or ["json"]
    if "pickle" in accept or "application/x-python-serialize" in accept:
        found.append(
            Finding(
                "PICKLE",
                "warning",
                "accept_content allows pickle: a message on the broker can run arbitrary code",
                'accept_content=["json"]',
            )
        )
    time_limit = get("task_time_limit")
    if not time_limit:
        found.append(
            Finding(
                "NO_TIME_LIMIT", "info", "no task_time_limit: a stuck task holds its worker slot forever", RECOMMENDED
            )
        )
    parts = urlsplit(broker_url)
    if parts.scheme in ("redis", "rediss"):
        options = get("broker_transport_options") or {}
        visibility = options.get("visibility_timeout") if isinstance(options, dict) else None
        if visibility is None:
            found.append(
                Finding(
                    "VISIBILITY_DEFAULT",
                    "warning",
                    "Redis visibility_timeout is left at its default (1 h): an unacked task of a killed "
                    "worker comes back only after an hour",
                    RECOMMENDED,
                )
            )
        elif time_limit and visibility < time_limit:
            found.append(
                Finding(
                    "VISIBILITY_SHORT",
                    "warning",
                    f"Redis visibility_timeout ({visibility} s) is shorter than task_time_limit "
                    f"({time_limit} s): long tasks are delivered twice",
                    RECOMMENDED,
                )
            )
        if not parts.password and parts.hostname not in LOOPBACK:
            found.append(
                Finding(
                    "REDIS_NO_PASSWORD",
                    "warning",
                    f"the Redis broker on {parts.hostname} has no password",
                    "set requirepass and put the password in CELERY_BROKER_URL",
                )
            )
    if running_as_root:
        # C_FORCE_ROOT is Celery's own "yes, I mean it": then this is a note, not a warning.
        forced = bool(os.environ.get("C_FORCE_ROOT"))
        found.append(
            Finding(
                "RUNNING_AS_ROOT",
                "info" if forced else "warning",
                "workers run as root: a task can do anything to this machine"
                + (" (C_FORCE_ROOT is set)" if forced else ""),
                "run workers as an unprivileged user",
            )
        )
    return found


def role_findings(settings: Settings, nodes: list[NodeView], queues: list[tuple[str, list[str]]]) -> list[Finding]:
    """The configured roles against what answers: a missing role, a role with the wrong count, and workers
    that consume queues no role declares."""
    found = []
    live = guard.live_records(settings.project_id, [r.lock_kind for r in settings.all_roles])
    held = {kind: (record, holder) for kind, record, holder in live}
    for role in settings.all_roles:
        record, holder = held.get(role.lock_kind, ({}, None))
        # A debug-mode worker serves every role it consumes under its own name: its records say which.
        serving = str(record.get("node") or "") if record.get("in_process") else ""
        count = sum(n.replies for n in nodes if role.owns_node(n.name) or n.name == serving)
        if count == 0:
            waits = f": tasks on {', '.join(sorted(role.queue_set or []))} wait"
            if holder is None:
                advice = f"tlrun worker --role {role.name} (or tlrun dev)"
                why = "no worker of role"
            elif record.get("state") == WAITING:
                # Never advise a start the running launcher would refuse (it holds the role's lock).
                advice = f"fix the import error its log shows and save (or `tlrun stop --role {role.name}`)"
                why = f"launcher pid {holder.pid} waits for a good save: no worker of role"
            else:
                advice = f"wait for it, or `tlrun stop --role {role.name}` and start it again"
                state = record.get("state", "starting")
                why = f"launcher pid {holder.pid} holds role {role.name} ({state}), but no worker of role"
            found.append(Finding("ROLE_MISSING", "error", f"{why} {role.name} answers{waits}", advice))
        elif count != role.expected:
            found.append(
                Finding(
                    "ROLE_COUNT",
                    "warning",
                    f"{count} workers of role {role.name} answer, expected {role.expected}",
                    f"set expected = {count} under [tool.tlrun.workers.{role.name}], or stop the extra ones",
                )
            )
    declared: set[str] = set()
    for role in settings.all_roles:
        declared |= role.queue_set or set()
    for node, consumed in queues:
        extra = sorted(set(consumed) - declared)
        if extra:
            found.append(
                Finding(
                    "UNDECLARED_QUEUES",
                    "warning",
                    f"{node} consumes {', '.join(extra)}, which no role of the project file declares",
                    "declare the queue under a role in [tool.tlrun.workers], or stop that worker",
                )
            )
    return found


def _state_findings(settings: Settings) -> list[Finding]:
    found = []
    raw = os.environ.get(ENV_GUARD)
    if raw:
        launcher = Identity.decode(raw)
        alive = launcher is not None and launcher.is_alive()
        found.append(
            Finding(
                "GUARD_IN_ENVIRONMENT",
                "warning",
                f"{ENV_GUARD} is set in this shell ({'its launcher is alive' if alive else 'stale'}): "
                "it leaked from a worker's environment",
                f"unset {ENV_GUARD}",
            )
        )
    for kind in [r.lock_kind for r in settings.all_roles] + ["beat"]:
        # Read, never lock: a probe holding the lock, even briefly, would make a launch starting then fail.
        try:
            record = guard.read_record(guard.lock_path(settings.project_id, kind))
        except TlrunError:  # an unsafe lock directory: the launch path reports it
            return found
        holder = guard.holder_identity(record)
        if record and holder is not None and not holder.is_alive():
            found.append(
                Finding(
                    "STALE_LOCK",
                    "info",
                    f"the {kind} lock names pid {record.get('pid')}, which died without releasing it; "
                    "the kernel already did (harmless: the next launch takes it)",
                    None,
                )
            )
    launchers = procs.find_launchers(settings.project_root)
    for role in settings.all_roles:
        mine = guard.competing_launchers(launchers, settings.app, [role.name], False, settings.beat)
        if len(mine) > 1:
            found.append(
                Finding(
                    "TWO_LAUNCHERS",
                    "error",
                    f"{len(mine)} tlrun launchers run the {role.name} role of this project on this host "
                    f"(pids {', '.join(str(m.identity.pid) for m in mine)}): each starts its own worker",
                    "tlrun stop, then start one launcher",
                )
            )
    return found


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
    everyone = inventory.local_processes(settings, everything=True)  # to put pids on node names
    local = [p for p in everyone if p.project]
    app: Any = None
    try:
        broker_url = resolve_broker_url(settings)
    except AppImportError as exc:
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
            findings.append(
                Finding(
                    "STRAY_PROCESS",
                    "error",
                    f"stray {proc.kind} pid {proc.pid} ({proc.node or 'no node name'}) runs this "
                    "project's code with no tlrun launcher: it may run old code",
                    "tlrun doctor --fix",
                )
            )
    holder = lease.result()
    findings.extend(lease_findings(holder, local, hostname))
    if reachable:
        try:
            depths: dict[str, int | None] | None = waiting.result()
        except BrokerError:
            depths = None
        for nc in consuming.project_check(settings, broker_url, [n.name for n in nodes], depths):
            findings.append(Finding("NOT_CONSUMING", "error", nc.message(), "tlrun worker --restart restarts it"))
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
    findings.extend(_state_findings(settings))
    if app is not None:
        # Root matters only for workers that run: they get tlrun's user.
        workers_here = any(p.kind == "worker" for p in local)
        findings.extend(config_findings(app.conf, broker_url, os.geteuid() == 0 and workers_here))
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
    )


class _LeaseProbe:
    """Who holds the beat lease, asked on a thread while the ping census runs. None: nobody, or no answer."""

    def __init__(self, settings: Settings, broker_url: str) -> None:
        self._settings = settings
        self._url = broker_url
        self._holder: Holder | None = None
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
        except OSError:
            pass  # the census reports an unreachable broker
        finally:
            backend.close()

    def result(self) -> Holder | None:
        self._thread.join(5.0)
        return self._holder


def lease_findings(holder: Holder | None, local: list[inventory.LocalProcess], hostname: str) -> list[Finding]:
    """The lease's holder (info), and every beat of this project running here without it (error: a beat
    started by hand, or by a launcher from before the lease; with the holder's beat, ticks run twice)."""
    found = []
    if holder is not None:
        found.append(Finding("BEAT_LEASE", "info", f"the beat lease is held by {holder.describe()}", None))
    for proc in local:
        if not proc.project or proc.kind != "beat" or proc.state == STANDBY:
            continue
        ours = holder is not None and holder.host == hostname and proc.launcher_pid == holder.pid
        if not ours:
            by = f"held by {holder.describe()}" if holder is not None else "held by nobody"
            found.append(
                Finding(
                    "BEAT_WITHOUT_LEASE",
                    "error",
                    f"beat pid {proc.pid} runs here without the cluster's beat lease ({by}): with the lease "
                    "holder's beat, every periodic task runs twice",
                    "stop it and run beat with tlrun beat (one per cluster)",
                )
            )
    return found


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
