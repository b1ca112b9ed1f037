"""One beat per cluster: a lease on the broker every host already talks to (never a home-made coordinator).

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
from typing import Any, Protocol

from tlrun.launch import brokerconf
from tlrun.launch.broker import Broker

log = logging.getLogger(__name__)

DEFAULT_TTL = 30.0
MIN_TTL = 2.0
KEY_PREFIX = "tlrun:beat-lease"

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


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

    def close(self) -> None: ...


UNKNOWN = Holder("another host", 0, "", 0.0)


class RedisLease:
    """The connection is made as the app makes its own (TLS, Sentinel, credentials: through kombu's channel),
    and the key takes the app's `global_keyprefix`, as kombu's own keys do."""

    def __init__(self, url: str, name: str, timeout: float = 2.0, prefix: str = KEY_PREFIX) -> None:
        self.url = url
        self.name = f"{prefix}:{name}"
        self.key = brokerconf.key_prefix(url) + self.name
        self._timeout = timeout
        self._conn: Any = None
        self._client_: Any = None
        self._scripts: Any = None

    @property
    def _client(self) -> Any:
        """The redis-py client on the pool of a kombu channel (connected on first use; raises when it cannot)."""
        if self._client_ is None:
            import redis

            conn = Broker(self.url, self._timeout, self._timeout).kombu_connection()
            try:
                channel = conn.default_channel
                client = redis.Redis(connection_pool=channel.pool)
            except BaseException:
                conn.release()
                raise
            self.key = str(getattr(channel, "global_keyprefix", "") or "") + self.name
            self._conn, self._client_ = conn, client
            self._scripts = (client.register_script(_RENEW), client.register_script(_RELEASE))
        return self._client_

    @property
    def _renew(self) -> Any:
        self._client  # noqa: B018 (connects)
        return self._scripts[0]

    @property
    def _release(self) -> Any:
        self._client  # noqa: B018 (connects)
        return self._scripts[1]

    def acquire(self, holder: Holder, ttl: float) -> Holder | None:
        try:
            if self._client.set(self.key, holder.encode(), nx=True, px=int(ttl * 1000)):
                return None
            return Holder.decode(self._client.get(self.key)) or UNKNOWN
        except Exception as exc:
            raise _unreachable(exc) from exc

    def renew(self, holder: Holder, ttl: float) -> bool:
        try:
            return bool(self._renew(keys=[self.key], args=[holder.encode(), int(ttl * 1000)]))
        except Exception as exc:
            raise _unreachable(exc) from exc

    def release(self, holder: Holder) -> None:
        try:
            self._release(keys=[self.key], args=[holder.encode()])
        except Exception as exc:  # the lease then ends with its ttl
            log.debug("could not release the beat lease: %s", exc)

    def current(self) -> Holder | None:
        try:
            value = self._client.get(self.key)
        except Exception as exc:
            raise _unreachable(exc) from exc
        return Holder.decode(value) if value is not None else None

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.release()
            except Exception:
                pass
        self._conn = self._client_ = self._scripts = None


class AmqpLease:
    """The lease is an exclusive queue: it lives exactly as long as the holder's connection."""

    def __init__(self, url: str, name: str, ttl: float, timeout: float = 2.0, prefix: str = KEY_PREFIX) -> None:
        self.url = url
        self.queue = f"{prefix}:{name}"
        # Who holds it: a one-message queue that expires when no holder has redeclared it for two ttls, and is
        # deleted by a holder that lets go (`:holder`, its first form, never expired: one stayed in the vhost).
        self.info_queue = f"{self.queue}:holder-info"
        self._ttl = ttl
        self._timeout = timeout
        self._conn: Any = None  # the holder's dedicated connection
        self._channel: Any = None
        self._last_beat = 0.0
        self._heartbeat = max(1, int(ttl))

    def _connect(self, heartbeat: float = 0) -> Any:
        conn = Broker(self.url, self._timeout, self._timeout).kombu_connection(heartbeat)
        conn.ensure_connection(max_retries=1, timeout=self._timeout)
        return conn

    def acquire(self, holder: Holder, ttl: float) -> Holder | None:
        from amqp.exceptions import ResourceLocked

        # The broker drops a connection it has not heard from for about the heartbeat timeout: with the ttl as
        # that timeout, a holder cut off loses the lease about a ttl after it was last heard, like on Redis.
        # (A holder that dies outright loses it at once: its TCP connection closes.)
        self._heartbeat = max(1, int(ttl))
        try:
            conn = self._connect(self._heartbeat)
        except Exception as exc:
            raise _unreachable(exc) from exc
        try:
            channel = conn.channel()
            channel.queue_declare(self.queue, exclusive=True, auto_delete=True)
        except ResourceLocked:
            conn.release()
            return self.current() or UNKNOWN
        except Exception as exc:
            conn.release()
            raise _unreachable(exc) from exc
        self._conn, self._channel = conn, channel
        self._last_beat = time.monotonic()
        self._publish_holder(holder)
        return None

    def _declare_info(self) -> None:
        arguments = {"x-max-length": 1, "x-overflow": "drop-head", "x-expires": int(self._ttl * 2000)}
        self._channel.queue_declare(self.info_queue, arguments=arguments)

    def _publish_holder(self, holder: Holder) -> None:
        kombu = _kombu()
        channel = self._channel
        self._declare_info()
        producer = kombu.Producer(channel, exchange=kombu.Exchange(""), routing_key=self.info_queue)
        producer.publish(holder.encode(), content_type="text/plain", content_encoding="utf-8")

    def renew(self, holder: Holder, ttl: float) -> bool:
        """Our connection is the lease: keep its heartbeats going and check it is alive."""
        if self._conn is None:
            return False
        try:
            try:
                self._conn.drain_events(timeout=0.01)  # the broker's heartbeats
            except TimeoutError:
                pass
            self._conn.heartbeat_check(rate=2)  # ours, when due
            self._declare_info()  # a redeclared queue does not expire
        except Exception as exc:
            self._drop()
            raise _unreachable(exc) from exc
        # py-amqp gives up only after two silent heartbeat timeouts; the broker may drop us after one. Count
        # a renewal only while the broker is heard from (it sends a heartbeat every half timeout).
        heard = getattr(self._conn.connection, "last_heartbeat_received", None) or self._last_beat
        silent = time.monotonic() - heard
        if silent > self._heartbeat / 2 + 1:
            raise OSError(f"nothing heard from the broker for {silent:.1f} s")
        return True

    def release(self, holder: Holder) -> None:
        if self._channel is not None:
            try:
                self._channel.queue_delete(self.info_queue)  # nothing of ours stays in the vhost
            except Exception:
                pass
        self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.release()
            except Exception:
                pass
        self._conn = self._channel = None

    def current(self) -> Holder | None:
        """Peek at the holder's note without consuming it. None when the lease queue does not exist."""
        from amqp.exceptions import NotFound, ResourceLocked

        try:
            conn = self._connect()
        except Exception as exc:
            raise _unreachable(exc) from exc
        try:
            channel = conn.channel()
            try:
                channel.queue_declare(self.queue, passive=True)
            except NotFound:
                return None
            except ResourceLocked:
                pass  # exclusive to another connection: held
            channel = conn.channel()  # a channel error closed the first one
            message = channel.basic_get(self.info_queue, no_ack=False)
            if message is None:
                return UNKNOWN
            channel.basic_reject(message.delivery_tag, requeue=True)
            return Holder.decode(message.body) or UNKNOWN
        except NotFound:
            return UNKNOWN
        finally:
            conn.release()

    def close(self) -> None:
        self._drop()


def _kombu() -> Any:
    import importlib

    return importlib.import_module("kombu")  # untyped: its names as Any


def _unreachable(exc: BaseException) -> OSError:
    return OSError(f"{type(exc).__name__}: {exc}")


def backend_for(url: str, name: str, ttl: float, prefix: str = KEY_PREFIX) -> Backend:
    """The lease `prefix:name` on the broker at `url` (the beat lease, or another one: the queue metrics')."""
    if url.startswith(("redis://", "rediss://", "unix://", "sentinel://")):
        return RedisLease(url, name, timeout=min(2.0, ttl / 6), prefix=prefix)
    if url.startswith(("amqp://", "amqps://", "pyamqp://")):
        return AmqpLease(url, name, ttl, timeout=min(2.0, ttl / 6), prefix=prefix)
    raise ValueError(f"no beat lease for this broker's transport ({url.split(':', 1)[0]})")


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
