"""The launcher's end of a held worker (see tlrun/dev/worker_entry.py): the worker imports its app, says
`ready <poll interval>`, and connects to the broker only after `go`. Closing instead ends it unconnected."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Callable

from tlrun.dev.worker_entry import HOLD_FD_ENV


class Hold:
    def __init__(self) -> None:
        self._ours, self._theirs = socket.socketpair()
        self.poll_interval: float | None = None  # the worker's transport poll interval on Redis

    @property
    def child_fd(self) -> int:
        return self._theirs.fileno()

    def env(self) -> dict[str, str]:
        return {HOLD_FD_ENV: str(self.child_fd)}

    def spawned(self) -> None:
        """The child has its copy: ours must go, or its EOF would never come."""
        self._theirs.close()

    def wait_prepared(self, deadline: float, alive: Callable[[], bool]) -> bool:
        """Until the worker has imported its app (True), or it exited, `alive()` turned false, or time ran out."""
        buffer = b""
        while time.monotonic() < deadline and alive():
            readable, _, _ = select.select([self._ours], [], [], 0.05)
            if not readable:
                continue
            chunk = self._ours.recv(128)
            if not chunk:
                return False  # it exited before it was ready (the app did not import)
            buffer += chunk
            if b"\n" in buffer:
                word, _, value = buffer.partition(b"\n")[0].decode().partition(" ")
                if word != "ready":
                    return False
                self.poll_interval = float(value) if value else None
                return True
        return False

    def release(self) -> None:
        try:
            self._ours.sendall(b"go\n")
        except OSError:
            pass  # it is gone: the supervisor sees that
        self._ours.close()

    def close(self) -> None:
        self._ours.close()
        self._theirs.close()
