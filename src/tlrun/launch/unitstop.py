"""Stopping units: their drains in parallel, and `tlrun stop --role R` for one unit of a running launcher.

A launcher with several units stops them at once: the idle workers are drained together (drain.py: each
step one broadcast to all of them), so six idle roles stop in about the time of one.

`tlrun stop --role R` reaches a launcher that runs more than role R through a request file in the user's
private lock directory (0700, checked; the same for every shell of the user) named after the launcher's
pid, then SIGUSR1. The launcher reads the file (never through a link, never a FIFO or anything but a
regular file of its own user), stops the named units with the stop ladder, releases their locks and keeps
the rest running. A launcher says in its
lock records that it listens (`"unit_stop": true`); one that does not is never sent SIGUSR1, whose
default action would kill it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from tlrun import safefile
from tlrun.launch import drain, guard

if TYPE_CHECKING:
    import psutil

    from tlrun.launch.launcher import Launcher
    from tlrun.launch.units import WorkerUnit

REQUEST_SIGNAL = signal.SIGUSR1
MAX_REQUEST_BYTES = 4096


@dataclass(frozen=True)
class DrainResult:
    ok: bool
    why: str
    seconds: float


def drain_all(launcher: Launcher, workers: Sequence[WorkerUnit]) -> dict[str, DrainResult]:
    """Drain every worker at once (fast stop only): one broadcast per step for all of them; child name ->
    result, with the time the drain of all took. Workers paused ahead of it (pause_for_swap) count from then."""
    if not launcher.opts.fast_stop or not workers:
        return {}
    began = time.monotonic()
    paused_at = max((w.paused_at for w in workers if w.paused_at is not None), default=None)
    for w in workers:
        w.paused_at = None
    verdicts = drain.drain_many(launcher.broker_url, {w.node: w.poll_interval for w in workers}, paused_at)
    seconds = time.monotonic() - began
    return {w.child: DrainResult(verdicts[w.node].ok, verdicts[w.node].why, seconds) for w in workers}


def pause_for_swap(launcher: Launcher, workers: Sequence[WorkerUnit]) -> drain.Paused | None:
    """A reload in place, on Redis, every old worker serving: they stop fetching now, while their successors
    import (their drain's first step, ahead of it: its wait for an in-flight BRPOP is over by the time they
    have imported). A successor that does not import resumes them (drain.resume)."""
    from tlrun.launch.units import READY

    redis = launcher.broker_url.startswith(("redis://", "rediss://", "redis+socket://"))
    if not launcher.opts.fast_stop or not redis or any(w.state != READY for w in workers):
        return None
    paused = drain.pause(launcher.broker_url, [w.node for w in workers])
    for w in workers:
        w.paused_at = paused.at if paused is not None else None
    return paused


def resume_paused(launcher: Launcher, workers: Sequence[WorkerUnit], paused: drain.Paused | None) -> None:
    """Their successors did not import: the paused workers consume again (unless the launcher stops)."""
    for w in workers:
        w.paused_at = None
    if paused is not None and not launcher.sup.stop_requested:
        drain.resume(launcher.broker_url, paused)


def request_path(project_id: str, launcher_pid: int, kind: str = "stop") -> Path:
    """`stop` (units to stop), `reload` (roles to reload: `tlrun reload`) or `restart`, one file of each per
    launcher, in the user's lock directory: the one place every shell of the user agrees on (a launcher under
    a service manager and a login shell have different XDG_RUNTIME_DIRs), named with the host like the locks
    (a home directory shared between hosts)."""
    return guard.lock_dir() / f"{project_id}.{guard.host_label()}.{launcher_pid}.{kind}.request"


def _read_request(path: Path) -> dict[str, Any] | None:
    """A request file's JSON object, read once and removed; None when it is missing or not trusted."""
    data = safefile.read_private(path, MAX_REQUEST_BYTES)
    with contextlib.suppress(OSError):
        os.unlink(path)
    if data is None:
        return None
    try:
        request = json.loads(data)
    except ValueError:
        return None
    return request if isinstance(request, dict) else None


class Requests:
    """The launcher's side: SIGUSR1 sets a flag (a handler does nothing else); the loop reads the files.
    Stop requests are the launcher's own; reload requests wait in `reloads` for the reload step."""

    def __init__(self, project_id: str) -> None:
        self.project_id = project_id
        self._asked = False
        self.reloads: list[dict[str, Any]] = []
        self.restarts: list[dict[str, Any]] = []  # `tlrun restart NAME` (unitctl.py serves them)

    def _on_signal(self, _signum: int, _frame: FrameType | None) -> None:
        self._asked = True

    @contextlib.contextmanager
    def listen(self) -> Iterator[None]:
        saved = signal.signal(REQUEST_SIGNAL, self._on_signal)
        try:
            yield
        finally:
            signal.signal(REQUEST_SIGNAL, saved)
            for kind in ("stop", "reload", "restart"):
                with contextlib.suppress(OSError):
                    os.unlink(request_path(self.project_id, os.getpid(), kind))

    def pending(self) -> bool:
        return self._asked or bool(self.restarts)

    def take(self) -> set[str]:
        """The names asked to stop (roles, node names, `beat`); empty when the file is missing or not trusted.
        A reload request read on the way is kept in `reloads`."""
        self._asked = False
        reload = _read_request(request_path(self.project_id, os.getpid(), "reload"))
        if reload is not None:
            self.reloads.append(reload)
        restart = _read_request(request_path(self.project_id, os.getpid(), "restart"))
        if restart is not None:
            self.restarts.append(restart)
        request = _read_request(request_path(self.project_id, os.getpid()))
        names = request.get("units", []) if request is not None else []
        return {str(n) for n in names if isinstance(n, str)} if isinstance(names, list) else set()


def ask(proc: psutil.Process, project_id: str, names: Sequence[str]) -> bool:
    """The stopper's side: write the request for launcher `proc`, then signal it. False when it is gone."""
    return send(proc, project_id, "stop", {"units": list(names)})


def send(proc: psutil.Process, project_id: str, kind: str, request: dict[str, Any]) -> bool:
    from tlrun.launch import signals

    path = request_path(project_id, proc.pid, kind)
    safefile.write_atomic(path, json.dumps(request), mode=0o600)
    if signals.send(proc, REQUEST_SIGNAL):
        return True
    with contextlib.suppress(OSError):
        os.unlink(path)  # nobody will read it: never leave it in the lock directory
    return False


def listens(record: dict[str, Any]) -> bool:
    return bool(record.get("unit_stop"))
