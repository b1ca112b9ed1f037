"""The watchdog parent of a launcher's non-Python children (see `_child.py`): it holds the lifeline's read end,
runs its child, and stops it when the launcher is gone. Imported by the shim only for such children.

- `run_watchdog` (the private redis-server): forwards the launcher's stop signals to its child; on EOF
  SIGTERM, then SIGKILL to the group after a short wait.
- `run_group` (a process of tlrun dev's stack): its whole process group gets the process's stop signal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from tlrun.launch._child import FORWARDED, _say, kill_own_group, watch

WATCHDOG_WAIT = 3.0  # a non-Python child's time between SIGTERM and SIGKILL once the launcher is gone


def run_watchdog(argv: Sequence[str], fd: int, launcher: int, wait: float = WATCHDOG_WAIT) -> int:
    """Run `argv` as our child; forward stop signals; stop it when the launcher is gone. Its exit status."""
    child = subprocess.Popen(list(argv), close_fds=True)
    gone = threading.Event()

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(child.pid, signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)

    def on_gone() -> None:
        gone.set()
        forward(signal.SIGTERM, None)
        try:
            child.wait(wait)
        except subprocess.TimeoutExpired:
            kill_own_group()

    watch(fd, launcher, on_gone)
    code = child.wait()
    if gone.is_set():
        kill_own_group()  # anything the child left in our group goes with it
    return 128 - code if code < 0 else code


def run_group(argv: Sequence[str], fd: int, launcher: int, stop: int, grace: float) -> int:
    """A stack's process (a web server, a frontend watcher): run `argv` as our child in our own process group
    (the session tlrun started us in), so that its children (`sh -c`, runserver's autoreloader, npm's node)
    are in it too. A stop signal from the launcher becomes `stop` (the process's stop signal) to the whole
    group; a second one SIGKILL. When the launcher is gone: `stop` to the group, SIGKILL after `grace`.

    On Linux this watchdog is a child subreaper: what the process starts and lets go (a daemon's double fork
    into a session of its own, `env -i setsid ...`) is re-parented here, never to the host's init. Such a
    process is ours to reap while it runs, and when the process ends it is stopped too: `stop`, then SIGKILL
    before the launcher's own grace runs out. Our own unreaped children: their pids cannot be reused."""
    subreaper = become_subreaper()
    try:
        child = subprocess.Popen(list(argv), close_fds=True)
    except OSError as exc:  # a program that does not exist, or may not be run: say so, never a traceback
        _say(f"tlrun: cannot run {argv[0]}: {exc.strerror or exc}")
        return 127
    expected, asked = [0], [0]  # our own signals (sent to the group, so to us too: not requests); requests
    stopping: list[float] = []  # when the first stop was sent

    def to_group(sig: int) -> None:
        stopping.append(time.monotonic())
        if sig != signal.SIGKILL:
            expected[0] += 1
        try:
            os.killpg(0, sig)
        except OSError:
            expected[0] = max(0, expected[0] - 1)

    def on_signal(signum: int, _frame: object) -> None:
        if signum == stop and expected[0] > 0:
            expected[0] -= 1
            return
        asked[0] += 1
        to_group(stop if asked[0] == 1 and signum != signal.SIGQUIT else signal.SIGKILL)

    for sig in {*FORWARDED, stop}:
        signal.signal(sig, on_signal)

    gone, ended = threading.Event(), threading.Event()

    def on_gone() -> None:
        gone.set()
        to_group(stop)
        if ended.wait(grace):
            return  # the main thread ends the escaped ones, then the group
        if subreaper:  # never reaps here: the main thread waits for the child
            for pid in our_children(child.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        kill_own_group()

    watch(fd, launcher, on_gone)
    code = wait_reaping(child) if subreaper else child.wait()
    ended.set()
    if subreaper:
        # What it let go ends with it, before the launcher's grace (counted from its first stop) runs out.
        last = stopping[0] + grace - ESCAPED_MARGIN if stopping else time.monotonic() + grace
        end_escaped(stop, child.pid, max(last, time.monotonic() + 0.2))
    if gone.is_set():
        kill_own_group()  # what it started goes with it: nobody is left to reap the group
    return 128 - code if code < 0 else code


ESCAPED_MARGIN = 0.5  # seconds: the escaped processes are SIGKILLed this long before the launcher's grace ends
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Linux: orphans of our descendants come to us (pid1.py does the same for the launcher with --init)."""
    from tlrun.launch._child import portable

    if not sys.platform.startswith("linux") or portable():
        return False
    import ctypes

    try:
        return int(ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def wait_reaping(child: subprocess.Popen[bytes]) -> int:
    """Wait for `child`, reaping every orphan that comes to us and exits meanwhile; its exit status."""
    while True:
        pid, status = os.wait()
        if pid == child.pid:
            child.returncode = os.waitstatus_to_exitcode(status)
            return child.returncode


def our_children(exclude: int) -> list[int]:
    """Our children other than `exclude`, from /proc (the standard library only: this runs in the shim)."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == exclude:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if len(fields) > 1 and int(fields[1]) == me:
            found.append(int(entry))
    return found


def _reap_any() -> bool:
    """Reap what has exited; False when no child is left at all."""
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True


def end_escaped(sig: int, main: int, deadline: float) -> None:
    """`sig` to every escaped process (our children other than the main one), then SIGKILL at `deadline` to
    whatever is left, again until none is (a killed one's own children come to us in turn)."""
    for pid in our_children(main):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    while _reap_any() and our_children(main):
        if time.monotonic() >= deadline:
            for pid in our_children(main):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
