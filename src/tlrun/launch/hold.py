"""The launcher's end of a held worker (see tlrun/launch/entry.py): the worker imports its app, says
`ready <poll interval>`, and connects to the broker only after `go`. Closing instead ends it unconnected. Once
it consumes it says `consuming`: the launcher's cue to ping it."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable
from typing import Any

from tlrun.launch import brokerconf
from tlrun.launch.entry import HOLD_FD_ENV, SPARE_ENV, SPARE_PLAIN, SPARE_WITH_BASE


class Hold:
    def __init__(self, spare: bool = False, base: bool = True) -> None:
        self._ours, self._theirs = socket.socketpair()
        self._child_fd = self._theirs.fileno()  # the number the child's environment names, kept after spawned()
        self.spare = spare  # it imports Celery, says `spare`, and imports the app only after `load`
        self.base = base  # a spare: it imports its role's base too (base.py)
        self.unusable = ""  # a spare's word that its base is stale or impure (it exited instead of loading)
        self.base_modules = 0  # a spare: how many installed modules its base imported before the save
        self.poll_interval: float | None = None  # the worker's transport poll interval on Redis
        self.broker_options: dict[str, Any] | None = None  # the app's connection settings (brokerconf.py)
        self.prepared = False
        self._buffer = b""
        self._eof = False
        self._said = False  # the released worker said `consuming` (or can say nothing more)

    @property
    def child_fd(self) -> int:
        return self._child_fd

    def env(self) -> dict[str, str]:
        if not self.spare:
            return {HOLD_FD_ENV: str(self.child_fd)}
        return {HOLD_FD_ENV: str(self.child_fd), SPARE_ENV: SPARE_WITH_BASE if self.base else SPARE_PLAIN}

    def load(self) -> bool:
        """A spare: import the app now (its code as saved). False when the spare is gone."""
        try:
            self._ours.sendall(b"load\n")
            return True
        except OSError:
            return False

    def spawned(self) -> None:
        """The child has its copy: ours must go, or its EOF would never come."""
        self._theirs.close()

    def wait_prepared(self, deadline: float, alive: Callable[[], bool]) -> bool:
        """Until the worker has imported its app (True), or it exited, `alive()` turned false, or time ran out."""
        if self.prepared:
            return True
        while True:
            line = self._line(deadline, alive)
            if line is None:
                return False
            word, _, value = line.partition(" ")
            if word == "ready":
                interval, _, options = value.partition(" ")
                self.poll_interval = float(interval) if interval else None
                self.broker_options = brokerconf.decode(options) if options else None
                self.prepared = True
                return True
            if word == "unusable":
                self.unusable = value or "unusable"
                return False
            if word != "spare":  # a spare announces itself first; anything else is not our protocol
                return False
            self.base_modules = int(value) if value.isdigit() else 0

    def wait_consuming(self, timeout: float, alive: Callable[[], bool]) -> bool:
        """Up to `timeout` for the released worker's word that it consumes (True, as when it closed the socket
        without it: nothing more will come, ping it as before); False while it has not said it yet, or has
        exited. Returns as soon as the word comes."""
        if self._said or self._ours.fileno() < 0:  # said, or closed here: nothing to wait for
            self._said = True
            return True
        try:
            line = self._line(time.monotonic() + timeout, alive)
        except OSError:
            line = None
            self._eof = True
        if line == "consuming" or self._eof:
            self._said = True
            self._ours.close()
        return self._said

    def _line(self, deadline: float, alive: Callable[[], bool]) -> str | None:
        while b"\n" not in self._buffer:
            # What a child said before it exited still counts (a spare says `unusable` and exits at once).
            gone = time.monotonic() >= deadline or not alive()
            wait = 0.0 if gone else max(0.0, min(0.05, deadline - time.monotonic()))
            readable, _, _ = select.select([self._ours], [], [], wait)
            if not readable:
                if gone:
                    return None
                continue
            chunk = self._ours.recv(4096)
            if not chunk:
                self._eof = True
                return None  # it exited (the app did not import), or closed the socket
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def release(self) -> None:
        """`go`: the worker connects. The socket stays open for its `consuming` (wait_consuming closes it)."""
        try:
            self._ours.sendall(b"go\n")
        except OSError:
            pass  # it is gone: the supervisor sees that

    def close(self) -> None:
        self._ours.close()
        self._theirs.close()
