"""Step 1 of the launch path for a launcher's units: one lock per unit (a role's worker, beat), each with a
JSON record of the holder that ps, health, doctor and stop read (guard.py holds the lock primitives)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from tlrun.config import Settings
from tlrun.errors import LockHeldError
from tlrun.events import Notice, Reporter
from tlrun.launch import guard, procs, signals, unitctl
from tlrun.launch.units import STARTING, Unit, WorkerUnit


def _stop_holder(holder: procs.Identity, report: Reporter, replaced: list[procs.Identity]) -> None:
    """--replace: ask the launcher holding the lock for a graceful stop (it stops its own worker)."""
    proc = signals.launcher_for(holder)
    if proc is None:
        raise LockHeldError(
            f"the lock names pid {holder.pid}, which is gone, reused, or not a tlrun launcher: not stopping it",
            hint="the real holder is still alive; find it with `tlrun ps`",
        )
    report(Notice(f"--replace: asking launcher pid {holder.pid} to stop"))
    signals.send(proc, signal.SIGTERM)
    replaced.append(holder)


class UnitLocks:
    def __init__(self, settings: Settings, report: Reporter, hostname: str) -> None:
        self.s = settings
        self.report = report
        self.hostname = hostname
        self._held: dict[str, tuple[guard.ProjectLock, dict[str, Any]]] = {}
        self._released: dict[str, dict[str, Any]] = {}  # the records of units stopped on request (restart)
        self._stack: contextlib.ExitStack | None = None

    def take(self, stack: contextlib.ExitStack, units: Sequence[Unit]) -> None:
        """Every unit's lock, or LockHeldError (with --replace: the holder is asked to stop first); then the
        process table is checked for a launcher that bypassed the locks."""
        note = guard.check_env_guard(os.environ)
        if note is not None:
            self.report(Notice(note.message, "warning"))
        s = self.s
        self._stack = stack
        base = {
            "pid": os.getpid(),
            "create_time": procs.Identity.of_self().create_time,
            "pidns": guard.pid_namespace(),  # the pid means this process only in this namespace
            "app": s.app,
            "project_root": str(s.project_root),
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "state": STARTING,
            "units": [unitctl.record_fields(u)["unit"] for u in units],  # `tlrun restart NAME` finds us by it
        }
        root = guard.root_identity(s.project_root)
        if root is not None:  # the same project however its path changes (guard.moved_holders)
            base["root_dev"], base["root_ino"] = root
        replaced: list[procs.Identity] = []
        for unit in units:
            fields = unitctl.record_fields(unit)
            what = f"a {unit.label} of app {s.app} in {s.project_root}"
            replace = (lambda holder: _stop_holder(holder, self.report, replaced)) if s.replace else None
            wait = s.stop_grace + signals.KILL_WAIT + 5
            path = guard.lock_path(s.project_id, unit.lock_kind, self.hostname)
            lock = guard.acquire(path, what, replace, wait=wait)
            stack.enter_context(lock)
            record = {**base, **fields}
            lock.write(record)
            self._held[unit.lock_kind] = (lock, record)
        moved = guard.moved_holders(s.project_root, s.app, s.project_id, [u.lock_kind for u in units])
        if moved:
            kind, holder, started_in = moved[0]
            raise LockHeldError(
                f"this project's {kind} is already running under tlrun launcher pid {holder.pid}, started in "
                f"{started_in}: the same directory, renamed or moved since",
                hint="stop it first: tlrun stop (here), then start again",
            )
        # A replaced launcher lets go of its locks just before it exits: let it finish exiting.
        deadline = time.monotonic() + signals.KILL_WAIT
        while any(h.is_alive() for h in replaced) and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = [u for u in units if isinstance(u, WorkerUnit)]
        roles = None if s.role_filter is None else [r.name for r in s.roles]
        what = f"a {units[0].label if units else 'launcher'} of app {s.app} in {s.project_root}"
        every = [r.lock_kind for r in s.all_roles] + ["beat"]
        coordinated = {h.pid for _k, _r, h in guard.live_records(s.project_id, every)} - {os.getpid()}
        runs_beat = any(u.kind == "beat" for u in units)
        guard.check_no_other_launcher(
            s.project_root, s.app, roles if workers else [], runs_beat, s.beat, what, coordinated
        )

    def record(self, kind: str, **fields: Any) -> None:
        if kind in self._held:
            lock, record = self._held[kind]
            record.update(fields)
            lock.write(record)

    def record_all(self, **fields: Any) -> None:
        """The same fields in every record this launcher holds (an answer to `tlrun restart`)."""
        for kind in list(self._held):
            self.record(kind, **fields)

    def release(self, kind: str) -> None:
        """The unit is gone for good (stop --role): another launcher may start it now."""
        held = self._held.pop(kind, None)
        if held is not None:
            held[0].release()
            self._released[kind] = dict(held[1])

    def retake(self, unit: Unit) -> None:
        """A unit stopped on request starts again (`tlrun restart NAME`): its lock again, or LockHeldError when
        another launcher started it meanwhile."""
        if unit.lock_kind in self._held:
            return
        path = guard.lock_path(self.s.project_id, unit.lock_kind, self.hostname)
        lock = guard.acquire(path, f"the {unit.label} of app {self.s.app} in {self.s.project_root}")
        if self._stack is not None:
            self._stack.enter_context(lock)
        record = {**self._released.pop(unit.lock_kind, {}), "state": STARTING}
        lock.write(record)
        self._held[unit.lock_kind] = (lock, record)
