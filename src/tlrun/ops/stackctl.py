"""One unit from another shell: `tlrun stop NAME` and `tlrun restart NAME` (overmind's way), for a worker role,
beat, Flower or a process of the stack.

The running launcher that holds the unit is found by its lock records (a unit stopped earlier by its name is
still in the `units` list of its launcher's other records). A request file plus SIGUSR1 (unitstop.py) asks
it; it stops that unit alone, or restarts it (launch/unitctl.py) and answers in its records.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

import psutil

from tlrun.config import Settings
from tlrun.errors import NothingRunningError, ReloadError, UsageError
from tlrun.launch import guard, signals, unitstop
from tlrun.launch.procs import Identity

POLL = 0.05


def unit_kinds(settings: Settings) -> dict[str, str]:
    """Unit name -> its lock kind, for every unit the project can run."""
    kinds = {r.name: r.lock_kind for r in settings.all_roles}
    kinds.update({p.name: f"process-{p.name}" for p in settings.processes})
    kinds["flower"] = "process-flower"
    kinds["beat"] = "beat"
    return kinds


def _check_name(settings: Settings, name: str) -> dict[str, str]:
    kinds = unit_kinds(settings)
    if name not in kinds:
        shown = ", ".join(sorted(kinds))
        raise UsageError(f"no unit named {name!r} in this project", hint=f"units: {shown}")
    return kinds


def _held(settings: Settings, kinds: dict[str, str]) -> dict[int, tuple[Identity, dict[str, dict[str, Any]]]]:
    """launcher pid -> (its identity, {lock kind: record}) of every live launcher of the project here."""
    found: dict[int, tuple[Identity, dict[str, dict[str, Any]]]] = {}
    for kind, record, holder in guard.live_records(settings.project_id, sorted(set(kinds.values()))):
        found.setdefault(holder.pid, (holder, {}))[1][kind] = record
    return found


@dataclass(frozen=True)
class UnitAnswer:
    launcher: int
    name: str
    ok: bool
    message: str


def stop_unit(settings: Settings, name: str, timeout: float) -> UnitAnswer:
    """Stop one unit and leave the rest of its launcher running (a launcher that runs nothing else stops)."""
    guard.check_env_guard(os.environ, "stop from inside a task")
    kinds = _check_name(settings, name)
    kind = kinds[name]
    for pid, (holder, records) in _held(settings, kinds).items():
        record = records.get(kind)
        if record is None or record.get("state") == "gone":
            continue
        proc = signals.launcher_for(holder)
        if proc is None:
            continue
        if set(records) == {kind}:  # it runs nothing else: stop the launcher, which stops its unit warm
            result = signals.stop_ladder([proc], timeout)
            how = "SIGKILL after the grace period" if result.killed else "its launcher stopped"
            return UnitAnswer(pid, name, not result.survivors, how)
        if not unitstop.listens(record):
            raise ReloadError(f"launcher pid {pid} takes no requests for one unit: stop it whole (tlrun stop)")
        unitstop.ask(proc, settings.project_id, [name])
        deadline = time.monotonic() + timeout + signals.KILL_WAIT + 5
        while time.monotonic() < deadline:
            live = {k for k, _r, h in guard.live_records(settings.project_id, [kind]) if h.pid == pid}
            if not live:
                return UnitAnswer(pid, name, True, "stopped; the other units run on")
            time.sleep(POLL)
        raise ReloadError(f"launcher pid {pid} did not stop {name} within {timeout:g} s")
    raise NothingRunningError(f"{name} does not run here")


def restart_unit(settings: Settings, name: str, timeout: float) -> UnitAnswer:
    """Restart one unit of the running launcher that holds it (or held it, before `tlrun stop NAME`): a worker
    role through the reload path, a process with its stop ladder and a fresh start, a stopped unit started."""
    guard.check_env_guard(os.environ, "restart from inside a task")
    kinds = _check_name(settings, name)
    kind = kinds[name]
    held = _held(settings, kinds)
    owner = next((pid for pid, (_h, records) in held.items() if kind in records), None)
    if owner is None:  # stopped by name: its launcher still lists it
        owner = next(
            (
                pid
                for pid, (_h, records) in held.items()
                if any(name in (r.get("units") or []) for r in records.values())
            ),
            None,
        )
    if owner is None:
        raise NothingRunningError(f"no launcher of this project runs {name} here", hint="start it with tlrun dev")
    holder, records = held[owner]
    proc = signals.launcher_for(holder)
    if proc is None:
        raise NothingRunningError(f"the launcher of {name} (pid {owner}) is gone")
    if not all("units" in r for r in records.values()):
        raise ReloadError(f"launcher pid {owner} takes no restart requests (an older tlrun): restart it whole")
    rid = secrets.token_hex(8)
    if not unitstop.send(proc, settings.project_id, "restart", {"id": rid, "units": [name]}):
        raise NothingRunningError(f"the launcher of {name} (pid {owner}) is gone")
    return _answer(settings, proc, kinds, name, rid, timeout)


def _answer(
    settings: Settings, proc: psutil.Process, kinds: dict[str, str], name: str, rid: str, timeout: float
) -> UnitAnswer:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for _kind, record, holder in guard.live_records(settings.project_id, sorted(set(kinds.values()))):
            if holder.pid != proc.pid:
                continue
            for field in ("restart", "reload"):  # a worker role answers through the reload path
                got = record.get(field)
                if isinstance(got, dict) and got.get("id") == rid:
                    return UnitAnswer(proc.pid, name, bool(got.get("ok")), str(got.get("message")))
        if not signals.is_alive(proc):
            raise ReloadError(f"launcher pid {proc.pid} stopped before it restarted {name}")
        time.sleep(POLL)
    raise ReloadError(f"no answer within {timeout:g} s from launcher pid {proc.pid} about {name}")
