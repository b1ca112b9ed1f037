"""The local view: this project's workers and beats (or every Celery process of the user) with their state,
as plain rows for `ps`, `doctor` and `stop`."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import psutil

from tlrun.config import Settings
from tlrun.errors import TlrunError
from tlrun.launch import guard, procs
from tlrun.launch.units import WAITING


@dataclass(frozen=True)
class LocalProcess:
    pid: int
    ppid: int
    kind: str  # "worker" | "beat" | "leftover" (what a task started) | "process" | "flower" | "broker" (dev's stack)
    # | "base" (tlrun dev --reload's spare of a role: installed modules imported, waiting for the next save)
    role: str | None  # the worker role it serves (tlrun's marker, or its queues); None for beat or unknown
    node: str | None
    app: str | None
    cwd: str | None
    state: str  # psutil status: running, sleeping, stopped, zombie, ...
    uptime_s: float
    rss_bytes: int
    cpu_s: float  # user + system CPU time of the main process
    pool_children: int
    launcher_pid: int | None  # the tlrun launcher that started it, when alive
    project: bool  # belongs to the project asked about
    stray: bool  # a project process that no live launcher owns
    memory_limit: int | None = None  # the memory guard's limit for its tree (bytes), when one applies
    pool_memory: dict[str, int] | None = None  # pool child pid -> its PSS, as the guard last sampled
    name: str | None = None  # the unit's name: its role, `beat`, a process's name, `flower`, `broker`
    port: int | None = None  # where a stack's process serves
    escaped: tuple[int, ...] = ()  # a stack process's descendants in a session of their own (its watchdog holds them)
    pss_bytes: int | None = None  # a base's proportional set size: the memory it adds beside the workers

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["uptime"] = self.uptime_s
        if data["name"] is None:
            data["name"] = self.role if self.kind == "worker" else "beat" if self.kind == "beat" else None
        return data


def _stats(pid: int) -> tuple[str, int, float, int]:
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            times = proc.cpu_times()
            children = [c for c in proc.children() if c.cmdline() == proc.cmdline()]
            return proc.status(), proc.memory_info().rss, times.user + times.system, len(children)
    except (psutil.Error, OSError):
        return "gone", 0, 0.0, 0


def _pss(pid: int) -> int | None:
    from tlrun.ops.memory import pss

    try:
        return pss(psutil.Process(pid))
    except (psutil.Error, OSError):
        return None


def _live_launcher(proc: procs.CeleryProcess) -> int | None:
    launcher = procs.Identity.decode(proc.launcher) if proc.launcher else None
    if launcher is None or not launcher.is_alive():
        return None
    return launcher.pid


def local_processes(
    settings: Settings | None, everything: bool = False, table: Sequence[procs.CeleryProcess] | None = None
) -> list[LocalProcess]:
    """Main processes of Celery workers and beats of the current user: the project's, or all of them.
    (A debug-mode worker runs inside `python -m tlrun`: the broker sees it, the process table does not.)"""
    rows = procs.scan(("worker", "beat", procs.LEFTOVER)) if table is None else table
    uid = os.getuid()
    now = time.time()
    out = []
    workers = _recorded_workers(settings) if settings is not None else {}
    units = _process_records(settings) if settings is not None else {}
    guarded = guarded_pids(settings) if settings is not None else {}
    standby_beat = _standby_beat(settings) if settings is not None else None
    # A process in another UTS namespace runs on another host as far as tlrun is concerned (Linux only).
    mine = [p for p in rows if p.uid == uid and procs.same_host_namespace(p.pid)]
    for proc in procs.main_processes(mine):
        # tlrun dev's spare: its role's base imported (launch/base.py), waiting for the next save; no node yet
        base = proc.spare and proc.pid not in workers and _live_launcher(proc) is not None
        is_project = settings is not None and procs.project_match(
            proc, settings.project_id, settings.app, settings.project_root, uid
        )
        if not (everything or is_project):
            continue
        launcher = _live_launcher(proc)
        if proc.role == procs.LEFTOVER and proc.process is None and launcher is not None:
            continue  # a running task's subprocess: its launcher answers for it
        state, rss, cpu, children = _stats(proc.pid)
        kind, record = ("base" if base else proc.role), {}
        if proc.role == procs.LEFTOVER and proc.process is not None:  # a process of tlrun dev's stack
            kind = proc.process if proc.process in ("flower", "broker") else "process"
            record = units.get(proc.process, {}) if launcher is not None else {}
            state = str(record.get("state") or state) if record.get("process_pid") == proc.pid else state
        if proc.pid == standby_beat:
            state = STANDBY  # a warm beat that may not send: another host holds the lease
        role = procs.role_of(proc, settings.all_roles) if settings is not None and is_project else proc.role_name
        out.append(
            LocalProcess(
                pid=proc.pid,
                ppid=proc.ppid,
                kind=kind,
                role=role if proc.process is None else None,
                node=None if base else proc.node if proc.role != procs.LEFTOVER else proc.command,
                app=proc.app,
                cwd=proc.cwd,
                state=state,
                uptime_s=round(now - (workers.get(proc.pid) or proc.create_time), 1),
                rss_bytes=rss,
                cpu_s=round(cpu, 2),
                pool_children=children,
                launcher_pid=launcher,
                project=is_project,
                stray=is_project and launcher is None,
                memory_limit=guarded.get(proc.pid, {}).get("limit"),
                pool_memory=guarded.get(proc.pid, {}).get("children"),
                name=proc.process,
                port=record.get("port") if isinstance(record.get("port"), int) else None,
                escaped=escaped_from(proc.pid) if kind == "process" else (),
                pss_bytes=_pss(proc.pid) if base else None,
            )
        )
    if settings is not None:
        seen = {row.pid for row in out}
        out += [row for row in in_process_workers(settings) + held_units(settings) if row.pid not in seen]
    return sorted(out, key=lambda p: (p.kind, p.role or "", p.pid))


def escaped_from(pid: int) -> tuple[int, ...]:
    """The descendants of a stack process's watchdog that left its session (a daemon's double fork, `env -i
    setsid`): no marker and no process group leads to them, but the watchdog is their subreaper."""
    try:
        session = os.getsid(pid)
        found = []
        for child in psutil.Process(pid).children(recursive=True):
            try:
                if os.getsid(child.pid) != session:
                    found.append(child.pid)
            except OSError:
                continue
    except (psutil.Error, OSError):
        return ()
    return tuple(sorted(found))


def _standby_beat(settings: Settings) -> int | None:
    """The pid of this project's beat when its launcher's record says it stands by (fenced: it sends nothing)."""
    try:
        record = guard.read_record(guard.lock_path(settings.project_id, "beat"))
    except TlrunError:
        return None
    if record and record.get("beat_lease") in ("standby", "lost") and isinstance(record.get("beat_pid"), int):
        return int(record["beat_pid"])
    return None


def guarded_pids(settings: Settings) -> dict[int, dict[str, Any]]:
    """worker pid -> the memory guard's last sample its launcher recorded (limit, tree, children, kills)."""
    found = {}
    for _kind, record, _holder in guard.live_records(settings.project_id, [r.lock_kind for r in settings.all_roles]):
        memory = record.get("memory")
        if isinstance(memory, dict) and isinstance(record.get("worker_pid"), int):
            found[int(record["worker_pid"])] = memory
    return found


def _process_records(settings: Settings) -> dict[str, dict[str, Any]]:
    """process name -> its live lock record (state, port), for this project's stack processes."""
    kinds = [f"process-{p.name}" for p in settings.processes] + ["process-flower"]
    return {kind.split("-", 1)[1]: record for kind, record, _holder in guard.live_records(settings.project_id, kinds)}


def _recorded_workers(settings: Settings) -> dict[int, float | None]:
    """The worker pids the project's lock records name (a spare becomes one when a reload promotes it), each
    with the time it began to serve (a spare's process was made long before: its uptime counts from then)."""
    pids: dict[int, float | None] = {}
    for role in settings.all_roles:
        try:
            record = guard.read_record(guard.lock_path(settings.project_id, role.lock_kind))
        except TlrunError:
            continue
        if record and isinstance(record.get("worker_pid"), int):
            since = record.get("serving_since")
            pids[int(record["worker_pid"])] = float(since) if isinstance(since, (int, float)) else None
    return pids


def in_process_workers(settings: Settings) -> list[LocalProcess]:
    """Workers that run inside their launcher (`tlrun dev --debug`), from the project's lock records: the
    process table shows them only as `python -m tlrun dev`."""
    by_pid: dict[int, tuple[dict[str, object], list[str]]] = {}
    role_of_kind = {r.lock_kind: r.name for r in settings.all_roles}
    for kind, record, holder in guard.live_records(settings.project_id, list(role_of_kind)):
        if record.get("in_process"):
            by_pid.setdefault(holder.pid, (record, []))[1].append(role_of_kind[kind])
    rows = []
    now = time.time()
    for pid, (record, roles) in by_pid.items():
        state, rss, cpu, _ = _stats(pid)
        rows.append(
            LocalProcess(
                pid=pid,
                ppid=_ppid(pid),
                kind="worker",
                role=",".join(roles),
                node=str(record.get("node") or "") or None,
                app=settings.app,
                cwd=str(settings.project_root),
                state=state,
                uptime_s=round(now - float(str(record.get("create_time", now))), 1),
                rss_bytes=rss,
                cpu_s=round(cpu, 2),
                pool_children=0,
                launcher_pid=pid,
                project=True,
                stray=False,
            )
        )
    return rows


STANDBY = "standby"  # the state of a launcher's beat that waits for the cluster's beat lease


def held_units(settings: Settings) -> list[LocalProcess]:
    """Units a live launcher holds with no process of their own, from their lock records, shown with the
    launcher's pid: a beat standing by (another host holds the beat lease), and a `tlrun dev --reload`
    worker waiting for a good save (its app or a task module does not import)."""
    role_of_kind = {r.lock_kind: r.name for r in settings.all_roles}
    rows = []
    for kind, record, holder in guard.live_records(settings.project_id, [*role_of_kind, "beat"]):
        if kind == "beat":
            if record.get("beat_lease") not in ("standby", "lost") or record.get("beat_pid"):
                continue  # a beat with a process of its own is a row of the process table
            unit, role, node, state = "beat", None, None, STANDBY
        elif record.get("state") == WAITING:
            unit, role, node, state = "worker", role_of_kind[kind], str(record.get("node") or "") or None, WAITING
        else:
            continue
        rows.append(
            LocalProcess(
                pid=holder.pid,
                ppid=_ppid(holder.pid),
                kind=unit,
                role=role,
                node=node,
                app=settings.app,
                cwd=str(settings.project_root),
                state=state,
                uptime_s=round(time.time() - holder.create_time, 1),
                rss_bytes=0,
                cpu_s=0.0,
                pool_children=0,
                launcher_pid=holder.pid,
                project=True,
                stray=False,
            )
        )
    return rows


def _ppid(pid: int) -> int:
    try:
        return psutil.Process(pid).ppid()
    except psutil.Error:
        return 0
