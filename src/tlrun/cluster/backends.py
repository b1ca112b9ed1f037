"""The lease's backends, on the broker every host already talks to: Redis (a key with a ttl, and a fencing
counter beside it) and RabbitMQ (an exclusive queue on a connection of the holder's own). Both connect as the
app does (brokerconf.py: TLS, Sentinel, credentials, key prefix)."""

from __future__ import annotations

import logging
import time
from typing import Any

from tlrun.cluster.lease import KEY_PREFIX, UNKNOWN, Backend, Holder
from tlrun.launch import brokerconf
from tlrun.launch.broker import Broker

log = logging.getLogger(__name__)

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_ACQUIRE = """
local value = redis.call('get', KEYS[1])
if (not value) or string.sub(value, 1, string.len(ARGV[3])) == ARGV[3] then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {1, redis.call('incr', KEYS[2])}
end
return {0, value}
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


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
        self.fence: int | None = None  # the fencing token of our last acquisition

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
            self._scripts = tuple(client.register_script(script) for script in (_RENEW, _RELEASE, _ACQUIRE))
        return self._client_

    @property
    def _renew(self) -> Any:
        self._client  # noqa: B018 (connects)
        return self._scripts[0]

    @property
    def _release(self) -> Any:
        self._client  # noqa: B018 (connects)
        return self._scripts[1]

    @property
    def _acquire(self) -> Any:
        self._client  # noqa: B018 (connects)
        return self._scripts[2]

    def acquire(self, holder: Holder, ttl: float) -> Holder | None:
        """One script: take the key when it is free, or when it holds this very process's token (its own
        SET of an earlier try, applied late by a paused Redis); then the fencing token is one more (beat's
        messages carry it, fence.py). Else who holds it."""
        mine = f"{holder.host}:{holder.pid}:{holder.token}:"
        try:
            taken, value = self._acquire(
                keys=[self.key, f"{self.key}:fence"], args=[holder.encode(), int(ttl * 1000), mine]
            )
        except Exception as exc:
            raise _unreachable(exc) from exc
        if int(taken):
            self.fence = int(value)
            return None
        return Holder.decode(value) or UNKNOWN

    def confirm(self, holder: Holder) -> bool | None:
        try:
            value = self._client.get(self.key)
        except Exception:
            return None
        return value is not None and value.decode(errors="replace") == holder.encode()

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

    def server_facts(self) -> tuple[str | None, float | None]:
        """What doctor checks of the Redis server itself: its eviction policy when it has a memory limit (None:
        no limit, or not readable: a managed Redis may refuse CONFIG), and its clock minus ours (seconds,
        from TIME against the middle of the round trip)."""
        policy = None
        try:
            config = self._client.config_get("maxmemory*")
            if int(config.get("maxmemory") or 0) > 0:
                policy = str(config.get("maxmemory-policy") or "") or None
        except Exception:
            pass
        try:
            before = time.time()
            seconds, micros = self._client.time()
            after = time.time()
            skew = seconds + micros / 1e6 - (before + after) / 2
        except Exception:
            skew = None
        return policy, skew

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
        self.fence: int | None = None  # no counter on RabbitMQ: beat's messages carry no fencing token

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

    def poll(self) -> None:
        """Called by the lease's own thread every tick (fence.py): read what the broker sent (heartbeats, a
        Connection.Close), so that a connection the broker closed is known within a tick, not at the next
        renewal: `confirm` then says no before the next send."""
        if self._conn is None:
            return
        try:
            try:
                self._conn.drain_events(timeout=0.01)
            except TimeoutError:
                pass
            self._conn.heartbeat_check(rate=2)
        except Exception as exc:
            log.debug("the beat lease's connection is gone: %s", exc)
            self._drop()

    def confirm(self, holder: Holder) -> bool | None:
        """Our exclusive queue lives exactly as long as our connection: open, and heard from lately (no I/O
        here: the connection belongs to the lease's thread, which polls it every tick)."""
        if self._conn is None:
            return False
        heard = getattr(self._conn.connection, "last_heartbeat_received", None) or self._last_beat
        return time.monotonic() - heard <= self._heartbeat / 2 + 1

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
