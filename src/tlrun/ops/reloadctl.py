"""`tlrun reload [--role R]`: ask the project's running launchers for new code without downtime.

The launchers are found the way `tlrun stop` finds them (control.py). Each gets a request file in the user's
private lock directory and SIGUSR1 (unitstop.py); its reload step (deploy/swap.py) starts each role's next
worker, and answers in the role's lock record (`reload`: the request's id, ok, message) once the new worker
answered its ping, or with the error that kept the old one serving. Two callers at once may share one
request: an answer to a request asked after ours answers ours too. A launcher that does not say it takes
reload requests (`reload_requests` in its records: a tlrun older than this) is never sent SIGUSR1.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

import psutil

from tlrun.config import Settings
from tlrun.errors import NothingRunningError, ReloadError
from tlrun.launch import guard, signals, unitstop
from tlrun.ops.control import project_launchers

POLL = 0.05
RECORD_READS = 5


@dataclass(frozen=True)
class RoleReloaded:
    launcher: int
    role: str
    ok: bool
    message: str  # `api4242-2@host (pid 123) ready in 1.20 s`, or why the old worker keeps serving


def reload_project(settings: Settings, timeout: float) -> list[RoleReloaded]:
    """Reload every role of the project that runs here (or --role's); one answer per role. Raises when
    nothing runs, or when a launcher did not answer within `timeout`."""
    guard.check_env_guard(os.environ, "reload from inside a task")
    kinds = {r.lock_kind: r.name for r in settings.roles}
    if settings.role_filter is None:
        kinds["beat"] = "beat"  # a `tlrun beat` launcher: its reload restarts beat with the new schedule
    procs = {p.pid: p for p in project_launchers(settings)}
    held: dict[int, dict[str, dict[str, Any]]] = {}
    for _ in range(RECORD_READS):  # a record rewritten in place can read empty for an instant: read again
        for kind, record, holder in guard.live_records(settings.project_id, list(kinds)):
            if record.get("state") not in (None, "gone"):
                held.setdefault(holder.pid, {})[kind] = record
        if not procs or held:
            break
        time.sleep(POLL)
    for records in held.values():
        if len(records) > 1:
            records.pop("beat", None)  # beside workers, beat restarts with their reload; they answer
    asked: dict[int, set[str]] = {}
    refused: list[int] = []
    request_id = f"{time.time():.6f}-{secrets.token_hex(4)}"  # when it was asked: see _covers
    roles = None if settings.role_filter is None else sorted(kinds.values())
    for pid, records in held.items():
        proc = procs.get(pid)
        if proc is None:
            continue
        if not all(r.get("reload_requests") for r in records.values()):
            refused.append(pid)
            continue
        if unitstop.send(proc, settings.project_id, "reload", {"id": request_id, "roles": roles}):
            asked[pid] = set(records)
    if not asked:
        if refused:
            raise ReloadError(
                f"the launcher(s) {', '.join(map(str, refused))} of this project take no reload requests "
                "(started by an older tlrun, or beat only): restart them once"
            )
        raise NothingRunningError("no worker of this project runs here: nothing to reload")
    return _answers(settings, {pid: (procs[pid], ks) for pid, ks in asked.items()}, kinds, request_id, timeout)


def _answers(
    settings: Settings,
    asked: dict[int, tuple[psutil.Process, set[str]]],
    kinds: dict[str, str],
    request_id: str,
    timeout: float,
) -> list[RoleReloaded]:
    deadline = time.monotonic() + timeout
    answers: dict[tuple[int, str], RoleReloaded] = {}
    waiting = {(pid, kind) for pid, (_proc, ks) in asked.items() for kind in ks}
    while waiting and time.monotonic() < deadline:
        for kind, record, holder in guard.live_records(settings.project_id, sorted({k for _p, k in waiting})):
            answer = record.get("reload")
            if (holder.pid, kind) in waiting and isinstance(answer, dict) and _covers(answer.get("id"), request_id):
                waiting.discard((holder.pid, kind))
                ok = bool(answer.get("ok"))
                answers[(holder.pid, kind)] = RoleReloaded(holder.pid, kinds[kind], ok, str(answer.get("message")))
        for pid, kind in list(waiting):
            # The process itself, not its records: a record being rewritten may be unreadable for an instant.
            if not signals.is_alive(asked[pid][0]):  # it stopped meanwhile
                waiting.discard((pid, kind))
                answers[(pid, kind)] = RoleReloaded(pid, kinds[kind], False, "its launcher stopped before it answered")
        if waiting:
            time.sleep(POLL)
    if waiting:
        late = ", ".join(f"role {kinds[k]} of launcher {p}" for p, k in sorted(waiting))
        raise ReloadError(f"no answer within {timeout:g} s from {late}")
    return sorted(answers.values(), key=lambda a: (a.launcher, a.role))


def _covers(answered: Any, ours: str) -> bool:
    """An answer to our request, or to one asked after ours: two `tlrun reload` at once share one request file
    per launcher, so the later one may replace ours before it is read; its reload loads code at least as new
    as ours asked for. (Request ids start with the time they were asked.)"""
    if answered == ours:
        return True
    try:
        return float(str(answered).split("-", 1)[0]) >= float(ours.split("-", 1)[0])
    except ValueError:
        return False
