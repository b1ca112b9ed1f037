"""What tlrun does as a container's PID 1 (or with --init): what tini or dumb-init would do.

- Reap every process re-parented to us (orphans of a worker's pool, anything a task forked), so that no
  zombie is left; our own children stay the Supervisor's to reap.
- On Linux outside PID 1, become a child subreaper (PR_SET_CHILD_SUBREAPER), so that pool children of a
  worker whose main process died come to us instead of to the host's init, and go with the group.
Stop signals need nothing special: PID 1 ignores only signals it has no handler for, and tlrun installs
handlers for SIGINT, SIGTERM and SIGHUP.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Collection

import psutil

from tlrun.launch._child import portable

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36


def is_pid1(pid: int | None = None) -> bool:
    return (os.getpid() if pid is None else pid) == 1


def become_subreaper() -> bool:
    """Linux only: orphans of our descendants are re-parented to us. False where not available."""
    if not sys.platform.startswith("linux") or portable():
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_CHILD_SUBREAPER) failed: errno %d", ctypes.get_errno())
        return False
    return True


class Reaper:
    """Reaps exited children that are not ours to wait for (`known`: the pids the Supervisor waits for)."""

    def __init__(self) -> None:
        self.reaped: list[tuple[int, int]] = []  # (pid, raw wait status), for reports and tests

    def reap(self, known: Collection[int]) -> int:
        """Reap every exited child not in `known`; returns how many. Never blocks, never touches `known`."""
        if not hasattr(os, "waitid") or portable():
            return self._reap_listed(known)  # macOS before Python 3.13
        count = 0
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return count  # no children at all
            if info is None:
                return count  # none has exited
            if info.si_pid in known:
                # One of ours is first in the kernel's list and stays there until the Supervisor reaps it:
                # find the others by looking at our children's states instead.
                return count + self._reap_listed(known)
            count += self._reap_pid(info.si_pid)

    def drain(self, timeout: float) -> int:
        """At exit (every child of ours reaped): reap orphans until none is left or `timeout` passes (those
        killed with a worker's group are still dying). A live orphan stays: as PID 1 the kernel ends it
        with the namespace; with --init the host's init inherits it, and the sweep finds it by its marker."""
        deadline = time.monotonic() + timeout
        count = self.reap(())
        while time.monotonic() < deadline and self._has_dying_children():
            time.sleep(0.02)
            count += self.reap(())
        return count

    @staticmethod
    def _has_dying_children() -> bool:
        try:
            children = psutil.Process().children()
        except psutil.Error:
            return False
        for child in children:
            try:
                if child.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                    return True
            except psutil.Error:
                return True
        return False

    def _reap_listed(self, known: Collection[int]) -> int:
        count = 0
        try:
            children = psutil.Process().children()
        except psutil.Error:
            return 0
        for child in children:
            if child.pid in known:
                continue
            try:
                zombie = child.status() == psutil.STATUS_ZOMBIE
            except psutil.Error:
                zombie = True  # psutil may no longer see it: waitpid tells
            if zombie:
                count += self._reap_pid(child.pid)
        return count

    def _reap_pid(self, pid: int) -> int:
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return 0
        if got == 0:
            return 0
        self.reaped.append((got, status))
        log.debug("reaped orphan pid %d (status %d)", got, status)
        return 1
