"""Step 5 of the launch path: stay in the foreground and own the worker's life.

SIGINT, SIGTERM and SIGHUP ask for a warm shutdown (SIGTERM to the worker's main process only); a second
one asks for a cold shutdown (SIGQUIT); when the grace period is over the worker's whole process group gets
SIGKILL. Every child is reaped, and the group is emptied before the main process is reaped.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from tlrun import signals, spawn

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
POLL = 0.05


def exit_status(returncode: int) -> int:
    """Popen's returncode to a shell exit status: -N (killed by signal N) becomes 128+N."""
    return 128 - returncode if returncode < 0 else returncode


class Supervisor:
    """Holds at most one child at a time; use as a context manager so the child never outlives it."""

    def __init__(self, grace: float, on_step: Callable[[str], None] | None = None) -> None:
        self.grace = grace
        self._step = on_step or (lambda _msg: None)
        self.child: subprocess.Popen[bytes] | None = None
        self.stop_signal: int | None = None
        self._requests = 0
        self._kill_at: float | None = None
        self._saved: dict[int, Any] = {}

    # -- signals -------------------------------------------------------------------------------------
    def __enter__(self) -> Supervisor:
        for sig in STOP_SIGNALS:
            self._saved[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.child is not None and self.child.returncode is None:
                self.stop()
        finally:
            for sig, handler in self._saved.items():
                signal.signal(sig, handler)

    @property
    def stop_requested(self) -> bool:
        return self._requests > 0

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._requests += 1
        self.stop_signal = self.stop_signal or signum
        self._escalate()

    def _escalate(self) -> None:
        """Apply the current stop request to the running child (first: warm, then: cold)."""
        child = self.child
        if child is None or signals.child_exited(child):
            return
        if self._requests == 1 and self._kill_at is None:
            self._kill_at = time.monotonic() + self.grace
            signals.signal_child(child, signal.SIGTERM)
            self._step(f"warm shutdown: SIGTERM to worker pid {child.pid}, grace {self.grace:g} s")
        elif self._requests >= 2:
            signals.signal_child(child, signal.SIGQUIT)
            self._step(f"cold shutdown: SIGQUIT to worker pid {child.pid}")

    # -- the child -----------------------------------------------------------------------------------
    def start(self, argv: list[str], env: Mapping[str, str], cwd: Path) -> subprocess.Popen[bytes]:
        if self.child is not None and self.child.returncode is None:
            raise RuntimeError("a worker is already running under this supervisor")
        self._kill_at = None
        self.child = spawn.spawn(argv, env, cwd)
        if self.stop_requested:  # a signal came while we were spawning
            self._escalate()
        return self.child

    def running(self) -> bool:
        return self.child is not None and not signals.child_exited(self.child)

    def wait(self) -> int:
        """Until the child has exited; apply the grace deadline; reap; return the exit status."""
        child = self.child
        assert child is not None
        while not signals.child_exited(child):
            if self._kill_at is not None and time.monotonic() >= self._kill_at:
                self._step(f"grace period over: SIGKILL to process group {child.pid}")
                signals.kill_child_group(child)
                self._kill_at = None
            time.sleep(POLL)
        # The main process is dead but unreaped: empty its group (a task's subprocess, an orphaned pool
        # child) while the group id cannot yet be reused, then reap.
        signals.kill_child_group(child)
        returncode = child.wait()
        return exit_status(returncode)

    def stop(self, cold: bool = False) -> int:
        """Stop the child ourselves (reload, failed start, takeover) with the same ladder."""
        child = self.child
        assert child is not None
        if not signals.child_exited(child):
            self._kill_at = time.monotonic() + self.grace
            sig = signal.SIGQUIT if cold else signal.SIGTERM
            signals.signal_child(child, sig)
        return self.wait()
