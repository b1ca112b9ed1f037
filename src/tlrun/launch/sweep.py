"""Step 2 of the launch path: find this project's stray workers (or beats) and stop them.

Matching is by tlrun's marker or by exact app plus project directory (procs.project_match), for the
current user only, never this process or its ancestors. Stopping uses the stop ladder in signals.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tlrun.launch import procs, signals

if TYPE_CHECKING:
    from tlrun.config import Role


@dataclass(frozen=True)
class Stray:
    pid: int
    node: str | None
    age: float  # seconds
    role: str

    def describe(self) -> str:
        if self.role.startswith(("process ", "flower", "broker")):  # a stack's process: named by its unit
            return f"{self.role} pid {self.pid} (up {format_age(self.age)})"
        return f"{self.role} pid {self.pid} ({self.node or 'no node name'}, up {format_age(self.age)})"


@dataclass(frozen=True)
class SweepResult:
    found: tuple[Stray, ...]
    stopped: tuple[int, ...]
    killed: tuple[int, ...]
    survivors: tuple[int, ...]
    dry_run: bool = False


def format_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"


def find_strays(
    project_id: str,
    app: str,
    root: Path,
    kinds: Sequence[str] = ("worker",),
    roles: Sequence[Role] | None = None,
    table: Sequence[procs.CeleryProcess] | None = None,
    keep: Collection[int] = (),
) -> list[procs.CeleryProcess]:
    """This project's processes of one of `kinds` (worker, beat) serving one of `roles` (None: all): main
    processes, and pool children whose main process is gone (they keep its command line and environment).
    Children of a live main are left to the ladder."""
    rows = procs.scan(kinds) if table is None else table
    uid = os.getuid()
    protected = procs.protected_pids()
    mine = [
        p
        for p in rows
        if p.pid not in protected
        and p.pid not in keep
        and p.role in kinds
        and procs.project_match(p, project_id, app, root, uid)
        and procs.serves_roles(p, roles)
        and procs.same_host_namespace(p.pid)  # another UTS namespace is another host: never ours to sweep
    ]
    return [p for p in procs.main_processes(mine) if not _owned_by_live_launcher(p)]


def _owned_by_live_launcher(proc: procs.CeleryProcess) -> bool:
    """A worker whose tlrun launcher is alive is supervised, not stray (this process excepted: a launcher
    never owns a worker it has not spawned yet). A leftover (what a task started) is stray only once its
    launcher is gone: while it lives, it may be a running task's, this launcher's included."""
    launcher = procs.Identity.decode(proc.launcher) if proc.launcher else None
    if proc.role == procs.LEFTOVER:
        return launcher is None or launcher.is_alive()
    return launcher is not None and launcher.pid != os.getpid() and launcher.is_alive()


def _what(proc: procs.CeleryProcess) -> str:
    """`worker`, `beat`, `leftover`, or a stack's `process web` / `flower` / `broker`."""
    if proc.process is None:
        return proc.role
    return proc.process if proc.process in ("flower", "broker") else f"process {proc.process}"


def sweep(
    project_id: str,
    app: str,
    root: Path,
    grace: float,
    *,
    kinds: Sequence[str] = ("worker",),
    roles: Sequence[Role] | None = None,
    keep: Collection[int] = (),
    dry_run: bool = False,
    on_found: Callable[[Stray], None] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> SweepResult:
    targets = find_strays(project_id, app, root, kinds, roles, keep=keep)
    now = time.time()
    strays = tuple(Stray(p.pid, p.node, now - p.create_time, _what(p)) for p in targets)
    for stray in strays:
        if on_found:
            on_found(stray)
    if dry_run or not targets:
        return SweepResult(strays, (), (), (), dry_run=dry_run)
    live = [proc for proc in (signals.process_for(procs.Identity(p.pid, p.create_time)) for p in targets) if proc]
    result = signals.stop_ladder(live, grace, on_step=on_step)
    return SweepResult(strays, result.stopped, result.killed, result.survivors)
