"""`tlrun health --liveness`: is each role's worker on this host alive, from local evidence only (its lock
record, its process, its heartbeat file): no broker round trip, no Celery, no app. A broker outage never
makes a worker "dead" here; that is readiness's business."""

from __future__ import annotations

import time
from dataclasses import dataclass

from tlrun.config import Settings
from tlrun.errors import HEALTH_DEAD_EXIT_CODE, HEALTH_UNKNOWN_EXIT_CODE, TlrunError
from tlrun.launch import guard, heartbeat


@dataclass(frozen=True)
class RoleLiveness:
    role: str
    node: str | None
    alive: bool
    why: str
    exit_code: int  # 0, 14 (a process that shows no progress), 15 (none)


def _started(pid: int) -> float:
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return time.time()


def check_roles(settings: Settings, window: float) -> list[RoleLiveness]:
    found = []
    for role in settings.roles:
        try:
            record = guard.read_record(guard.lock_path(settings.project_id, role.lock_kind))
        except TlrunError:
            record = None
        holder = guard.holder_identity(record)
        if not record or holder is None or not holder.is_alive():
            found.append(RoleLiveness(role.name, None, False, "no tlrun launcher runs it here", HEALTH_DEAD_EXIT_CODE))
            continue
        node = str(record.get("node") or "") or None
        pid = record.get("worker_pid")
        if record.get("in_process"):  # debug mode: the worker is the launcher itself
            pid = holder.pid
        if not isinstance(pid, int):
            state = record.get("state") or "starting"
            found.append(RoleLiveness(role.name, node, True, f"{state} (its launcher runs)", 0))
            continue
        live = heartbeat.check(pid, record.get("heartbeat"), _started(pid), window)
        if live.alive or record.get("in_process"):
            found.append(RoleLiveness(role.name, node, True, live.why, 0))
        else:
            code = HEALTH_DEAD_EXIT_CODE if "gone" in live.why else HEALTH_UNKNOWN_EXIT_CODE
            found.append(RoleLiveness(role.name, node, False, live.why, code))
    return found
