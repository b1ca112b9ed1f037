"""Step 5 of the launch path: stay in the foreground and own the children's lives.

Children are named ("worker", "beat", "broker"). SIGINT, SIGTERM and SIGHUP (unless SIGHUP asks for a
reload: tlrun worker) ask for a warm shutdown (SIGTERM to each child's main process only: prefork pool
children die mid-task if they get it); a second one asks for a cold shutdown (SIGQUIT); when a child's
grace period is over its whole process group gets SIGKILL. Every child is reaped, and its group is emptied
before the main process is reaped.
"""

from __future__ import annotations

import collections
import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from tlrun.launch import signals, spawn
from tlrun.launch._child import REQUEUE_SIGNAL
from tlrun.launch.pid1 import Reaper

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
POLL = 0.05
REQUEUE_MARGIN = 3.0
MIN_REQUEUE_MARGIN = 1.5  # an idle cold shutdown alone takes about 1.6 s (CELERY-FACTS.md)


def exit_status(returncode: int) -> int:
    """Popen's returncode to a shell exit status: -N (killed by signal N) becomes 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def requeue_margin(grace: float, celery_version: tuple[int, ...]) -> float | None:
    """How long before SIGKILL a stopping worker gets SIGQUIT, or None for never.

    On Celery 5.5+ SIGQUIT during a warm shutdown runs the soft/cold shutdown path, which cancels the
    tasks still running and lets the broker redeliver the late-acked ones (`cancel_active_requests`): a
    task that cannot finish within the grace period goes back to the queue instead of dying with SIGKILL.
    It needs about 1.6 s to finish (measured, CELERY-FACTS.md). Celery 5.4's SIGQUIT kills the tasks at
    once, so there it is never sent. The app's own `worker_soft_shutdown_timeout` is waited on top."""
    if celery_version[:2] < (5, 5) or grace < 2 * MIN_REQUEUE_MARGIN:
        return None  # too short a grace for a cold shutdown to finish before the SIGKILL
    return min(REQUEUE_MARGIN, grace / 2)


@dataclass
class _Child:
    name: str
    popen: subprocess.Popen[bytes]
    stop_order: int  # lower stops first: the worker before the broker it needs for a warm shutdown
    requeue: bool = False  # a worker: SIGQUIT shortly before the SIGKILL (see requeue_margin)
    grace: float | None = None  # its own grace period (a stack's process), else the supervisor's
    kill_at: float | None = None
    quit_at: float | None = None


class Supervisor:
    """Holds named children; use as a context manager so that no child outlives it."""

    def __init__(
        self,
        grace: float,
        on_step: Callable[[str], None] | None = None,
        defer_first_stop: bool = False,
        reaper: Reaper | None = None,
        requeue_margin: float | None = None,
        lifeline: spawn.Lifeline | None = None,
        hup_reloads: bool = False,
    ) -> None:
        """`defer_first_stop`: the first stop signal only sets `stop_requested`; the owner then drains its
        workers and calls `escalate` (tlrun dev's fast stop). A second signal is acted on at once.
        `reaper`: as PID 1 or with --init, orphans re-parented to us are reaped while we wait.
        `requeue_margin`: seconds before SIGKILL at which a stopping worker gets SIGQUIT.
        `hup_reloads`: SIGHUP asks for a reload (`reload_asked`), not a stop (tlrun worker, as daemons do)."""
        self.grace = grace
        self.reaper = reaper
        self.requeue_margin = requeue_margin
        self.defer_first_stop = defer_first_stop
        self._on_step = on_step or (lambda _msg: None)
        # Set by a helper thread with news for the loop (a save): wait() looks at once, not at its next poll.
        self.wakeup = threading.Event()
        # What a signal handler has to say waits here for the main loop: a handler runs between any two
        # bytecodes of the main thread, which may be inside a write to the same stream (a reentrant write
        # raises RuntimeError) or hold the lock of the password masking on it (a deadlock).
        self._pending_steps: collections.deque[str] = collections.deque()
        self._in_handler = 0  # depth: a second signal's handler can run inside the first one's
        self._children: dict[str, _Child] = {}
        self.stop_signal: int | None = None
        self._requests = 0
        self._saved: dict[int, Any] = {}
        self.lifeline = lifeline or spawn.Lifeline()  # the early start's, when it spawned children on it
        self.hup_reloads = hup_reloads
        self._reloads = 0  # SIGHUPs not yet taken by a reload step

    # -- signals -------------------------------------------------------------------------------------
    def __enter__(self) -> Supervisor:
        for sig in STOP_SIGNALS:
            handler = self._on_reload if sig == signal.SIGHUP and self.hup_reloads else self._on_signal
            self._saved[sig] = signal.signal(sig, handler)
        return self

    def _on_reload(self, _signum: int, _frame: FrameType | None) -> None:
        self._reloads += 1

    @property
    def reload_pending(self) -> bool:
        return self._reloads > 0

    def take_reload(self) -> bool:
        """A SIGHUP came since the last call (only with `hup_reloads`)."""
        asked, self._reloads = self._reloads > 0, 0
        return asked

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop_all()
            if self.reaper is not None:
                self.reaper.drain(1.0)
                if self.reaper.reaped:
                    self._step(f"reaped {len(self.reaper.reaped)} orphaned process(es) re-parented to tlrun")
        finally:
            self.lifeline.close()
            for sig, handler in self._saved.items():
                signal.signal(sig, handler)
            self.flush_steps()

    @property
    def stop_requested(self) -> bool:
        return self._requests > 0

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._requests += 1
        self.stop_signal = self.stop_signal or signum
        if self._requests == 1 and self.defer_first_stop:
            return
        self._in_handler += 1
        try:
            for child in list(self._children.values()):
                self._escalate(child)
        finally:
            self._in_handler -= 1

    def _step(self, message: str) -> None:
        if self._in_handler:
            self._pending_steps.append(message)
            return
        self.flush_steps()
        self._on_step(message)

    def flush_steps(self) -> None:
        """Say what the signal handler did (called from the main loop, never from a handler)."""
        while self._pending_steps:
            self._on_step(self._pending_steps.popleft())

    def escalate(self) -> None:
        """Apply the stop request now to every child: a deferred first stop, after the owner's drain."""
        for child in list(self._children.values()):
            self._escalate(child)

    def _escalate(self, child: _Child) -> None:
        """Apply the current stop request to one child (first: warm, then: cold)."""
        if signals.child_exited(child.popen) or child.stop_order > 0:
            return  # helpers (the managed broker) are stopped last, by stop_all
        pid = child.popen.pid
        if self._requests == 1 and child.kill_at is None:
            self._set_deadlines(child)
            signals.signal_child(child.popen, signal.SIGTERM)
            grace = self.grace if child.grace is None else child.grace
            self._step(f"warm shutdown: SIGTERM to {child.name} pid {pid}, grace {grace:g} s")
        elif self._requests >= 2:
            child.quit_at = None
            signals.signal_child(child.popen, signal.SIGQUIT)
            self._step(f"cold shutdown: SIGQUIT to {child.name} pid {pid}")

    # -- children ------------------------------------------------------------------------------------
    def start(
        self,
        name: str,
        argv: list[str],
        env: Mapping[str, str],
        cwd: Path,
        stop_order: int = 0,
        pass_fds: tuple[int, ...] = (),
        requeue: bool = False,
        stdin_data: bytes | None = None,
        grace: float | None = None,
    ) -> subprocess.Popen[bytes]:
        self._check_free(name)
        own = self.grace if grace is None else grace
        popen = spawn.spawn(argv, env, cwd, self.lifeline, own, pass_fds, stdin_data)
        return self.adopt(name, popen, requeue, stop_order, grace)

    def adopt(
        self,
        name: str,
        popen: subprocess.Popen[bytes],
        requeue: bool = False,
        stop_order: int = 0,
        grace: float | None = None,
    ) -> subprocess.Popen[bytes]:
        """Take charge of a child started behind this supervisor's lifeline (by `start`, or early: early.py)."""
        self._check_free(name)
        child = _Child(name, popen, stop_order, requeue, grace)
        self._children[name] = child
        if self.stop_requested:  # a signal came while it was being spawned
            self._escalate(child)
        return popen

    def _check_free(self, name: str) -> None:
        if self.running(name):
            raise RuntimeError(f"a {name} is already running under this supervisor")

    def running(self, name: str) -> bool:
        child = self._children.get(name)
        return child is not None and not signals.child_exited(child.popen)

    def pid(self, name: str) -> int | None:
        child = self._children.get(name)
        return child.popen.pid if child else None

    def _reap(self, child: _Child) -> int:
        # The main process is dead but unreaped: empty its group (a task's subprocess, an orphaned pool
        # child) while the group id cannot be reused, then reap.
        signals.kill_child_group(child.popen)
        status = exit_status(child.popen.wait())
        del self._children[child.name]
        if child.kill_at is not None and status == 128 + signal.SIGTERM:
            # It died of the SIGTERM we sent before it could install its handler (stopped right after its
            # start): the stop we asked for, as clean as the warm shutdown it would have done 0.3 s later.
            return 0
        return status

    def reap(self, name: str) -> int | None:
        """Reap one child that has exited (or is about to): its status, or None when there is no such child."""
        child = self._children.get(name)
        if child is None:
            return None
        return self._finish_stop(child)

    def _set_deadlines(self, child: _Child, grace: float | None = None) -> None:
        grace = grace if grace is not None else child.grace if child.grace is not None else self.grace
        child.kill_at = time.monotonic() + grace
        if child.requeue and self.requeue_margin is not None:
            child.quit_at = child.kill_at - self.requeue_margin

    def _enforce_deadlines(self) -> None:
        if self.reaper is not None:
            self.reaper.reap({c.popen.pid for c in self._children.values()})
        now = time.monotonic()
        for child in self._children.values():
            if child.quit_at is not None and now >= child.quit_at and not signals.child_exited(child.popen):
                if signals.request_child(child.popen, REQUEUE_SIGNAL):
                    self._step(
                        f"{child.name} still stopping {self.requeue_margin:g} s before the deadline: asked it to "
                        "requeue what it runs (a cold shutdown only if it runs a task)"
                    )
                child.quit_at = None
            if child.kill_at is not None and now >= child.kill_at and not signals.child_exited(child.popen):
                self._step(f"grace period over: SIGKILL to {child.name} process group {child.popen.pid}")
                signals.kill_child_group(child.popen)
                child.kill_at = None

    def wait(self, interrupt: Callable[[], bool] | None = None) -> tuple[str, int] | None:
        """Until a child exits: reap it and return (name, status). None when `interrupt()` turns true
        first, or (without `interrupt`) when there is no child left."""
        while self._children or interrupt is not None:
            self.flush_steps()
            for child in list(self._children.values()):
                if signals.child_exited(child.popen):
                    return child.name, self._reap(child)
            if interrupt is not None and interrupt():
                return None
            self._enforce_deadlines()
            self.wakeup.wait(POLL)
            self.wakeup.clear()
        return None

    def _begin_stop(self, child: _Child, cold: bool, grace: float | None = None) -> None:
        if not signals.child_exited(child.popen):
            self._set_deadlines(child, grace)
            signals.signal_child(child.popen, signal.SIGQUIT if cold else signal.SIGTERM)

    def _finish_stop(self, child: _Child) -> int:
        pause = 0.001  # a killed worker is gone within milliseconds: look again soon, then every POLL
        while not signals.child_exited(child.popen):
            self.flush_steps()
            self._enforce_deadlines()
            time.sleep(pause)
            pause = min(POLL, pause * 2)
        return self._reap(child)

    def stop(self, name: str, cold: bool = False, grace: float | None = None) -> int | None:
        """Stop one child ourselves (reload, failed start, takeover, a lost beat lease) with the same ladder
        (`grace`: a shorter one); wait for it."""
        child = self._children.get(name)
        if child is None:
            return None
        self._begin_stop(child, cold, grace)
        return self._finish_stop(child)

    def begin_stop(self, names: list[str]) -> None:
        """Start the warm stop ladder of the named children now (SIGTERM; SIGKILL after the grace period),
        whatever the stop requests; `reap` then waits for each."""
        for name in names:
            child = self._children.get(name)
            if child is not None and child.kill_at is None:
                self._begin_stop(child, cold=False)

    def kill(self, name: str) -> int | None:
        """SIGKILL a child's whole process group now and reap it (fast stop of a drained, idle worker)."""
        child = self._children.get(name)
        if child is None:
            return None
        signals.kill_child_group(child.popen)
        return self._finish_stop(child)

    def kill_each(self, names: list[str]) -> dict[str, int]:
        """SIGKILL several children's groups at once, then reap each (drained workers of several roles)."""
        children = [self._children[n] for n in names if n in self._children]
        for child in children:
            signals.kill_child_group(child.popen)
        return {child.name: self._finish_stop(child) for child in children}

    def rename(self, old: str, new: str) -> None:
        """A prepared worker takes the name of the one it replaces."""
        child = self._children.pop(old)
        child.name = new
        self._children[new] = child

    def stop_each(self, names: list[str]) -> None:
        """Stop several children at once (every role's worker on a reload): all get SIGTERM, then we wait."""
        children = [self._children[n] for n in names if n in self._children]
        for child in children:
            self._begin_stop(child, cold=False)
        for child in children:
            self._finish_stop(child)

    def stop_all(self) -> dict[str, int]:
        """Stop every child: workers and beat together first, helpers (stop_order > 0) after them."""
        statuses: dict[str, int] = {}
        for order in sorted({c.stop_order for c in self._children.values()}):
            group = [c for c in self._children.values() if c.stop_order == order]
            for child in group:
                self._begin_stop(child, cold=False)
            for child in group:
                statuses[child.name] = self._finish_stop(child)
        return statuses

    def running_pids(self) -> set[int]:
        """The pids of the children still running (safe from another thread: nothing is reaped here)."""
        return {c.popen.pid for c in list(self._children.values()) if not signals.child_exited(c.popen)}

    def has_running(self, max_order: int = 0) -> bool:
        """Is any child with stop_order <= max_order (workers, beat) still running?"""
        return any(c.stop_order <= max_order and not signals.child_exited(c.popen) for c in self._children.values())
