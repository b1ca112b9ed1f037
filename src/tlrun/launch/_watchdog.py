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
import threading
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
    group; a second one SIGKILL. When the launcher is gone: `stop` to the group, SIGKILL after `grace`."""
    try:
        child = subprocess.Popen(list(argv), close_fds=True)
    except OSError as exc:  # a program that does not exist, or may not be run: say so, never a traceback
        _say(f"tlrun: cannot run {argv[0]}: {exc.strerror or exc}")
        return 127
    expected, asked = [0], [0]  # our own signals (sent to the group, so to us too: not requests); requests

    def to_group(sig: int) -> None:
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

    gone = threading.Event()

    def on_gone() -> None:
        gone.set()
        to_group(stop)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(grace)
        kill_own_group()

    watch(fd, launcher, on_gone)
    code = child.wait()
    if gone.is_set():
        kill_own_group()  # what it started goes with it: nobody is left to reap the group
    return 128 - code if code < 0 else code
