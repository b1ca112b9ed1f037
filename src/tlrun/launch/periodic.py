"""A round of work every `every` seconds on a daemon thread of the launcher: the checks that ask the broker
(consumption, hung tasks, the watchdog's pings) and the memory guard's sampling, so that the supervise loop
never waits on them. Each subclass does one `round`; what it finds, the loop takes from it."""

from __future__ import annotations

import threading
from typing import TypeVar

P = TypeVar("P", bound="Periodic")


class Periodic:
    name = "tlrun-periodic"

    def __init__(self, every: float) -> None:
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def start(self: P) -> P:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.round()
        self.finish()

    def round(self) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """On the thread, after its last round (close what the rounds kept open)."""

    def close(self) -> None:
        """Ask the thread to end after the round it may be in; never waits for it (a launcher's stop must not
        wait on a broker round trip; the thread is a daemon)."""
        self._stop.set()
