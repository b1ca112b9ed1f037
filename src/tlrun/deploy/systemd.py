"""systemd that knows: sd_notify from the launcher (the service's main process) for `Type=notify` units.

The protocol is one datagram per message to the AF_UNIX socket named by $NOTIFY_SOCKET (a path, or an
abstract name written `@name`), newline-separated `KEY=value` lines; no dependency needed. The launcher says:
- `READY=1` and `STATUS=<verdict>` once its workers answered their own pings (not at fork);
- `RELOADING=1` with `MONOTONIC_USEC=` (so that `Type=notify-reload` accepts it too) when a reload begins,
  `READY=1` when it ended (new code serving, or the old one kept: STATUS says which);
- `STOPPING=1` when its own stop begins;
- `WATCHDOG=1` every half of $WATCHDOG_USEC from its supervise loop, only while every ready worker answered
  tlrun's own ping (which a worker answers from its event loop, with its pid) within the last half period:
  a wedged worker (SIGSTOPped, its event loop blocked) stops the watchdog, and systemd restarts the service.
  $WATCHDOG_PID, when set, must be our pid. The pings run on a thread; every datagram is sent from the main
  thread of the launcher's process.
Children never see these variables (spawn.worker_env drops them).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from tlrun.events import Event, Ready, Reloaded, Reloading
from tlrun.launch.broker import Broker
from tlrun.launch.periodic import Periodic
from tlrun.launch.steps import Step
from tlrun.launch.units import READY

if TYPE_CHECKING:
    from tlrun.launch.launcher import Launcher

log = logging.getLogger(__name__)

MIN_PING_EVERY = 0.1


class Notifier:
    """$NOTIFY_SOCKET's client; does nothing when the variable is unset (not run by systemd)."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        path = environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.watchdog: float | None = None  # seconds, when systemd watches us
        usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or (pid.isdigit() and int(pid) == os.getpid())):
            self.watchdog = int(usec) / 1_000_000

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, **fields: str) -> bool:
        """One datagram of `KEY=value` lines; False when systemd's socket does not take it."""
        if not self.address:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, self.address)
            return True
        except OSError as exc:
            log.debug("sd_notify to %r failed: %s", self.address, exc)
            return False


def monotonic_usec() -> str:
    return str(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)


class Pinger(Periodic):
    """Pings each ready worker with tlrun's own ping every `every` seconds: when each last answered."""

    name = "tlrun-watchdog"

    def __init__(self, url: str, targets: Callable[[], list[tuple[str, int]]], every: float) -> None:
        super().__init__(every)
        self.url = url
        self.targets = targets
        self.answered: dict[tuple[str, int], float] = {}
        self.first_seen: dict[tuple[str, int], float] = {}
        self._broker: Broker | None = None  # one connection for every round, opened again after a failure

    def round(self) -> None:
        began = time.monotonic()
        try:
            if self._broker is None:
                self._broker = Broker(self.url)
            for node, pid in self.targets():
                self.first_seen.setdefault((node, pid), began)
                if self._broker.answers_as(node, pid, max(self.every, MIN_PING_EVERY)):
                    self.answered[(node, pid)] = time.monotonic()
        except Exception as exc:  # the broker away: no answers, so no watchdog
            log.debug("watchdog ping failed: %s", exc)
            self._drop()

    def _drop(self) -> None:
        if self._broker is not None:
            self._broker.close()
            self._broker = None

    finish = _drop

    def fresh(self, within: float) -> bool:
        """Did every current target answer within the last `within` seconds? (One seen for the first time
        within that window counts as fresh: a new generation after a reload.)"""
        now = time.monotonic()
        for target in self.targets():
            last = self.answered.get(target, self.first_seen.get(target, now))
            if now - last > within:
                return False
        return True


class SystemdStep(Step):
    name = "systemd"

    def __init__(self, notifier: Notifier | None = None) -> None:
        self.notifier = notifier or Notifier()
        self.pinger: Pinger | None = None
        self._next_watchdog = 0.0
        self._ready = False

    def _targets(self, launcher: Launcher) -> list[tuple[str, int]]:
        targets = []
        for w in list(launcher.workers):
            pid = launcher.sup.pid(w.child)
            if w.state == READY and pid is not None:
                targets.append((w.node, pid))
        return targets

    def started(self, launcher: Launcher) -> None:
        if not self.notifier.enabled:
            return
        if not launcher.workers and not self._ready:  # tlrun beat: ready once beat runs (or stands by)
            self._ready = self.notifier.send(READY="1", STATUS="beat started")
        if self.notifier.watchdog is not None and launcher.workers:
            every = max(self.notifier.watchdog / 4, MIN_PING_EVERY)
            self.pinger = Pinger(launcher.broker_url, lambda: self._targets(launcher), every).start()

    def observe(self, launcher: Launcher, event: Event) -> None:
        if not self.notifier.enabled:
            return
        if isinstance(event, Ready):
            nodes = ", ".join(f"{n.node} (pid {n.pid})" for n in event.report.nodes)
            self._ready = self.notifier.send(READY="1", STATUS=f"{len(event.report.nodes)} ready: {nodes}"[:1000])
        elif isinstance(event, Reloaded):
            nodes = ", ".join(n.node for n in event.report.nodes)
            self.notifier.send(STATUS=f"reloaded: {nodes} ready"[:1000])
        elif isinstance(event, Reloading) and not event.done:
            self.notifier.send(RELOADING="1", MONOTONIC_USEC=monotonic_usec(), STATUS=f"reloading ({event.why})")
        elif isinstance(event, Reloading):
            if event.ok:
                self.notifier.send(READY="1")
            else:
                self.notifier.send(READY="1", STATUS="reload failed: the previous code keeps serving")

    def poll(self, launcher: Launcher) -> bool:
        watchdog = self.notifier.watchdog
        if watchdog is None or not self._ready or time.monotonic() < self._next_watchdog:
            return False
        self._next_watchdog = time.monotonic() + watchdog / 2
        if self.pinger is None or self.pinger.fresh(watchdog / 2):
            self.notifier.send(WATCHDOG="1")
        return False

    def stopping(self, launcher: Launcher) -> None:
        self.notifier.send(STOPPING="1", STATUS="stopping")

    def close(self, launcher: Launcher) -> None:
        if self.pinger is not None:
            self.pinger.close()
