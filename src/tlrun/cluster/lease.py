"""One beat per cluster: a lease on the broker every host already talks to (never a home-made coordinator).

The backends (backends.py):
- Redis: `SET key "host:pid:token:since" NX PX ttl`; renewed every ttl/3 by a compare-and-PEXPIRE script,
  released by a compare-and-delete script: only the holder's own token touches the key.
- RabbitMQ: an exclusive queue declared on a dedicated connection with heartbeats. Others get
  RESOURCE_LOCKED; the broker deletes the queue when the holder's connection dies. Who holds it is told
  by a one-message queue beside it (peeked, never consumed).

`BeatLease` is the state machine a launcher runs in its supervise loop: standing by (retry with jitter),
or holding (renew; when renewing has failed for ttl minus a safety margin, give the beat up *before* the
broker would let another host take the lease, so that two beats never overlap by more than that margin).
Time comes in as an argument: the machine is tested without a clock or a broker.
"""

from __future__ import annotations

import logging
import random
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Protocol

log = logging.getLogger(__name__)

DEFAULT_TTL = 30.0
MIN_TTL = 2.0
KEY_PREFIX = "tlrun:beat-lease"


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    token: str
    since: float  # epoch seconds

    @classmethod
    def new(cls, pid: int, host: str | None = None) -> Holder:
        return cls(host or socket.gethostname(), pid, secrets.token_hex(8), time.time())

    def encode(self) -> str:
        return f"{self.host}:{self.pid}:{self.token}:{self.since:.0f}"

    @classmethod
    def decode(cls, value: str | bytes | None) -> Holder | None:
        if value is None:
            return None
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        try:
            host, pid, token, since = text.rsplit(":", 3)
            return cls(host, int(pid), token, float(since))
        except ValueError:
            return None

    def describe(self) -> str:
        when = datetime.fromtimestamp(self.since, timezone.utc).isoformat(timespec="seconds")
        return f"{self.host} pid {self.pid} since {when}"


def lease_name(app: str, project_name: str | None) -> str:
    """The lease's name on the broker: the app plus the project's name (the same on every host, unlike the
    project directory)."""
    return f"{app}:{project_name}" if project_name else app


class Backend(Protocol):
    def acquire(self, holder: Holder, ttl: float) -> Holder | None:
        """Take the lease: None when it is ours now, else who holds it (a Holder with pid 0 if unknown).
        Raises OSError (or a broker error) when the broker cannot be reached."""

    def renew(self, holder: Holder, ttl: float) -> bool:
        """Extend our lease; False when it is no longer ours. Raises when the broker cannot be reached."""

    def release(self, holder: Holder) -> None: ...

    def current(self) -> Holder | None:
        """Who holds the lease now (None: nobody)."""

    def confirm(self, holder: Holder) -> bool | None:
        """Is the lease `holder`'s on the broker right now (checked before each send)? None: cannot tell."""

    def close(self) -> None: ...


UNKNOWN = Holder("another host", 0, "", 0.0)


@dataclass(frozen=True)
class Change:
    """What the launcher must do after a tick: start beat, stop it, or only report."""

    action: str  # "start" | "stop" | "standby" | "none"
    message: str | None = None


class BeatLease:
    """Standing by or holding; `tick(now)` does the broker call that is due, if any, and says what changed."""

    def __init__(
        self,
        backend: Backend,
        holder: Holder,
        ttl: float,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.backend = backend
        self.me = holder
        self.ttl = ttl
        self.margin = max(1.0, ttl / 6)  # stop the beat this long before the lease could pass to another host
        self._rng = rng
        self.held = False
        self._next = 0.0
        self.renewed_at = 0.0  # when the last successful renewal (or the acquisition) was *sent*
        self._told: str | None = None  # the last holder we reported, so a standby says it once

    @property
    def renew_every(self) -> float:
        return self.ttl / 3

    def valid(self, now: float) -> bool:
        """May the holder act now? Held, and renewed within ttl minus the safety margin: until then no other
        host can have taken the lease, whatever happened since the last renewal."""
        return self.held and now - self.renewed_at < self.ttl - self.margin

    def tick(self, now: float) -> Change:
        if now < self._next:
            return Change("none")
        return self._renew(now) if self.held else self._try(now)

    def _try(self, now: float) -> Change:
        # Jitter, so that standbys do not retry in step; at most 3/4 of a renewal interval, so that a standby
        # takes a lease that expired within ttl plus one renewal interval of its holder's last renewal.
        self._next = now + self.renew_every * (0.25 + 0.5 * self._rng())
        self.me = replace(self.me, since=time.time())  # `since` says when the lease was taken
        try:
            other = self.backend.acquire(self.me, self.ttl)
            if other is not None and (other.host, other.pid, other.token) == (self.me.host, self.me.pid, self.me.token):
                # Our own earlier SET NX, applied late (its reply was lost to a paused broker): it is ours. The
                # token is the process's for its whole life, so that this is recognised; renew it as it stands.
                self.me = other
                other = None if self.backend.renew(other, self.ttl) else UNKNOWN
        except OSError as exc:
            return self._tell(f"cannot reach the broker for the beat lease ({exc}); standing by")
        if other is None:
            self.held = True
            self.renewed_at = now
            self._next = now + self.renew_every
            self._told = None
            return Change("start", f"beat lease taken ({self.me.host} pid {self.me.pid}, ttl {self.ttl:g} s)")
        return self._tell(f"beat held by {other.describe()}; standing by")

    def _tell(self, message: str) -> Change:
        if message == self._told:
            return Change("standby")
        self._told = message
        return Change("standby", message)

    def _renew(self, now: float) -> Change:
        try:
            ok = self.backend.renew(self.me, self.ttl)
        except OSError as exc:
            if now - self.renewed_at >= self.ttl - self.margin:
                return self._lose(
                    f"cannot renew the beat lease ({exc}) for {now - self.renewed_at:.1f} s: "
                    "stopping beat before the lease can pass to another host"
                )
            self._next = now + min(1.0, self.margin / 2)  # retry soon
            return Change("none", None)
        if not ok:
            return self._lose("the beat lease is no longer ours (it expired and another host took it): stopping beat")
        self.renewed_at = now
        self._next = now + self.renew_every
        return Change("none")

    def _lose(self, message: str) -> Change:
        self.held = False
        self._next = 0.0
        self.backend.release(self.me)
        return Change("stop", message)

    def release(self) -> None:
        if self.held:
            self.backend.release(self.me)
            self.held = False
        self.backend.close()
