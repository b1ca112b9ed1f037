"""A process named so that a reused pid does not match: its pid plus its create time.

A module of its own, without psutil at import: the early start (launch/early.py) puts the launcher's
identity into each worker's environment before the rest of the launch core is imported. On Linux the
launcher's own create time is read from /proc exactly as psutil computes it (the start time in clock
ticks since boot, plus the boot time); elsewhere psutil answers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tlrun.launch.rundir import create_time_of


@dataclass(frozen=True)
class Identity:
    pid: int
    create_time: float

    @classmethod
    def of_self(cls) -> Identity:
        return cls(os.getpid(), _own_create_time())

    def encode(self) -> str:
        return f"{self.pid}:{self.create_time:.2f}"

    @classmethod
    def decode(cls, value: str) -> Identity | None:
        try:
            pid, ctime = value.split(":", 1)
            identity = cls(int(pid), float(ctime))
        except (ValueError, AttributeError):
            return None
        return identity if identity.pid > 0 else None

    def is_alive(self) -> bool:
        import psutil

        try:
            proc = psutil.Process(self.pid)
            return abs(proc.create_time() - self.create_time) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


def _own_create_time() -> float:
    """psutil.Process().create_time(), without importing psutil where /proc has the answer."""
    found = create_time_of("self")
    if found is not None:
        return found
    import psutil

    return float(psutil.Process().create_time())
