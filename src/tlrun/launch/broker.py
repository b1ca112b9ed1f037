"""Talking to the broker from the launcher, on a connection of its own (never inside the worker).

Celery is imported here and only here, lazily: commands that do not talk to a broker start fast.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from tlrun import redact
from tlrun.config import Settings, check_broker_url
from tlrun.errors import AppImportError, BrokerError
from tlrun.launch import brokerconf, owner
from tlrun.launch.brokerfail import CONNECT_TIMEOUT, failure, transport_unloadable
from tlrun.launch.checks import app_hint
from tlrun.redact import redact_url

CELERY_DEFAULT_BROKER = "amqp://guest@localhost//"


@dataclass(frozen=True)
class BrokerChoice:
    url: str
    source: str  # "configured" (-b, environment, .env), "app" (its broker_url), "default" (nothing anywhere)
    options: dict[str, Any] | None = None  # the app's connection settings, when the app was imported for it


class _Answered(Exception):
    """Ends a reply collection early: the reply awaited has come."""


def resolve_broker(settings: Settings) -> BrokerChoice:
    """One resolution for every command: -b, then CELERY_BROKER_URL/REDIS_URL from the environment or .env,
    then the app's own broker_url (for Django, from its settings). Only the last step imports the app."""
    if settings.broker_url:
        return BrokerChoice(settings.broker_url, "configured")
    app = load_app(settings)
    try:
        url = app.conf.broker_url
    except Exception as exc:  # Django settings that fail to load surface here
        raise AppImportError(f"app {settings.app!r} has no readable broker_url: {type(exc).__name__}: {exc}") from None
    options = brokerconf.options_from_conf(app.conf)
    if url:
        if not isinstance(url, str):  # a list of failover URLs
            url = url[0] if url else ""
        url = str(url).split(";", 1)[0].strip()
        redact.register(url)
        check_broker_url(url, f"the broker_url of app {settings.app}")
        brokerconf.register(url, options, "app")
        return BrokerChoice(url, "app", options)
    brokerconf.register(CELERY_DEFAULT_BROKER, options, "app")
    return BrokerChoice(CELERY_DEFAULT_BROKER, "default", options)


def resolve_broker_url(settings: Settings) -> str:
    return resolve_broker(settings).url


def broker_for_command(settings: Settings, app_first: bool = False) -> tuple[str, str | None]:
    """The broker URL of a command that talks to it (health, stop, ps --cluster, doctor), with the app's own
    connection settings registered for it (brokerconf.py): recorded by the project's launcher, or from the
    app (`app_first`: doctor, which checks the code as it is now). A note when only the URL is known."""
    from tlrun.launch.guard import lock_dir

    url = resolve_broker_url(settings)
    record = brokerconf.record_path(lock_dir(), settings.project_id)
    return url, brokerconf.learn(url, record, lambda: load_app(settings).conf, app_first)


def load_app(settings: Settings) -> Any:
    # Celery first, from tlrun's own environment: a project module named like it (a celery.py at the top)
    # must not shadow the real one.
    from celery.app.utils import find_app

    for folder in reversed(settings.import_path):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    root = " or ".join(map(str, settings.import_path))
    try:
        return find_app(settings.app)
    except ModuleNotFoundError as exc:
        top = settings.app.split(":", 1)[0].split(".", 1)[0]
        if (exc.name or "").split(".", 1)[0] != top:  # a dependency the app imports is missing
            raise AppImportError(f"app {settings.app!r} does not import: ModuleNotFoundError: {exc}") from None
        raise AppImportError(
            f"app {settings.app!r} does not import: {exc} (modules are looked up in {root})",
            hint=app_hint(settings),
        ) from None
    except SyntaxError as exc:
        raise AppImportError(
            f"app {settings.app!r} has a syntax error: {exc.filename}:{exc.lineno}: {exc.msg}"
        ) from None
    except Exception as exc:  # any error the app raises while importing is the user's to see
        raise AppImportError(f"app {settings.app!r} does not import: {type(exc).__name__}: {exc}") from None


def check_reachable(url: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Fail fast, before anything is stopped or started, when the broker does not answer.

    A Redis broker is checked with redis-py (PING after AUTH and SELECT): importing Celery costs about
    0.1 s, which this keeps off the path before the worker is spawned. Other brokers go through kombu.
    (A hand-written RESP exchange instead of redis-py was measured too: no gain in bench/run.py's ratios.)
    Another login user's listener on a local port gets no byte with a password (owner.refuse_foreign).
    """
    owner.refuse_foreign(brokerconf.targets(url), brokerconf.carries_secret(url))
    if urlsplit(url).scheme not in ("redis", "rediss") or not brokerconf.plain(url):
        with Broker(url, timeout) as broker:
            broker.connect()
        return
    try:
        import redis
    except ImportError as exc:
        raise transport_unloadable(url, exc) or exc from None

    started = time.monotonic()
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        try:
            client.ping()
        finally:
            client.close()
    except (redis.RedisError, ValueError, OSError) as exc:
        raise Broker.failure(url, exc, started) from None
    except TypeError as exc:  # redis-py hands every URL query parameter to its connection as a keyword
        import re

        from tlrun.errors import ConfigError

        unknown = re.search(r"unexpected keyword argument '([^']+)'", str(exc))
        name = unknown.group(1) if unknown else str(exc)
        raise ConfigError(
            f"broker URL {redact_url(url)} has a query parameter the Redis client does not know: {name}",
            hint="remove it, or check its spelling (redis-py's connection options)",
        ) from None


class Broker:
    """A throwaway Celery app, configured as the project's app is, used only for control messages (ping),
    queue lengths and connection checks."""

    def __init__(self, url: str, connect_timeout: float = CONNECT_TIMEOUT, socket_timeout: float | None = None) -> None:
        """Every connection takes the app's own settings registered for `url` (brokerconf.py).
        `socket_timeout` bounds every read on the connection (default: 5 s, or the connect timeout if longer);
        a probe with a deadline of its own (health --timeout) passes it."""
        from celery import Celery

        owner.refuse_foreign(brokerconf.targets(url), brokerconf.carries_secret(url))
        self.url = url
        conf = brokerconf.celery_conf(
            url, connect_timeout, socket_timeout if socket_timeout is not None else max(connect_timeout, 5.0)
        )
        self._target = conf["broker_url"]  # with the app's failover URLs after it
        self._app = Celery("tlrun-probe", broker=self._target, set_as_current=False)
        self._app.conf.update(conf)
        self._timeout = connect_timeout
        self._conn: Any = None

    @staticmethod
    def failure(url: str, exc: BaseException, started: float) -> BrokerError:
        return failure(url, exc, started)

    def _fail(self, exc: BaseException, started: float) -> BrokerError:
        return self.failure(self.url, exc, started)

    def connect(self) -> None:
        """Open the connection or raise BrokerError within about the connect timeout."""
        started = time.monotonic()
        try:
            # The URL is passed explicitly: Celery's conf prefers CELERY_BROKER_URL from the environment
            # over the constructor's broker, which would make `-b` lose to the shell's variable.
            conn = self._app.connection_for_write(self._target)
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=self._timeout)
        except Exception as exc:
            raise self._fail(exc, started) from None
        self._conn = conn

    def kombu_connection(self, heartbeat: float = 0) -> Any:
        """A new kombu connection (not yet connected) with the app's settings and tlrun's overrides: for the
        leases, which keep a connection of their own."""
        return self._app.connection_for_write(self._target, heartbeat=heartbeat)

    def ping(self, destination: list[str] | None = None, timeout: float = 1.0) -> list[str]:
        """Node names of the raw ping replies: a name that answers twice appears twice."""
        if self._conn is None:
            self.connect()
        started = time.monotonic()
        try:
            replies = self._app.control.ping(destination=destination, timeout=timeout, connection=self._conn)
        except Exception as exc:
            raise self._fail(exc, started) from None
        return [name for reply in replies or [] for name in reply]

    def answers_as(self, node: str, pid: int, timeout: float) -> bool:
        """Does process `pid` answer as `node` within `timeout`? tlrun's own ping (registered by the shim in
        the workers it runs) replies with the pid; another worker with that name answers the unknown command
        with an error, which never counts. Returns as soon as the right reply arrives."""
        if self._conn is None:
            self.connect()
        started = time.monotonic()

        def check(reply: Any) -> None:
            for answer in (reply or {}).values() if isinstance(reply, dict) else ():
                if isinstance(answer, dict) and answer.get("pid") == pid:
                    raise _Answered

        try:
            self._app.control.broadcast(
                "tlrun_ping",
                destination=[node],
                reply=True,
                timeout=timeout,
                limit=16,
                callback=check,
                connection=self._conn,
            )
        except _Answered:
            return True
        except Exception as exc:
            raise self._fail(exc, started) from None
        return False

    def active_queues(self, timeout: float = 1.0) -> list[tuple[str, list[str]]]:
        """(node, queue names) from each raw `active_queues` reply (a duplicated name appears twice)."""
        if self._conn is None:
            self.connect()
        started = time.monotonic()
        try:
            replies = self._app.control.broadcast("active_queues", reply=True, timeout=timeout, connection=self._conn)
        except Exception as exc:
            raise self._fail(exc, started) from None
        return [
            (node, [str(q.get("name")) for q in queues or [] if isinstance(q, dict)])
            for reply in replies or []
            for node, queues in reply.items()
        ]

    def ask(self, node: str, command: str, timeout: float, **arguments: Any) -> Any:
        """One control command to one node; its reply, or None when it did not answer within `timeout`
        (returns as soon as the node replies)."""
        if self._conn is None:
            self.connect()
        started = time.monotonic()
        try:
            replies = self._app.control.broadcast(
                command, arguments=arguments, destination=[node], reply=True, timeout=timeout, connection=self._conn
            )
        except Exception as exc:
            raise self._fail(exc, started) from None
        for reply in replies or []:
            if node in reply:
                return reply[node]
        return None

    def ask_each(self, nodes: list[str], command: str, timeout: float, **arguments: Any) -> dict[str, Any]:
        """One control command to several nodes at once: node -> its reply, for those that replied within
        `timeout` (returns as soon as every node replied)."""
        if self._conn is None:
            self.connect()
        started = time.monotonic()
        try:
            replies = self._app.control.broadcast(
                command, arguments=arguments, destination=nodes, reply=True, timeout=timeout, connection=self._conn
            )
        except Exception as exc:
            raise self._fail(exc, started) from None
        return {node: answer for reply in replies or [] for node, answer in reply.items() if node in nodes}

    def tell(self, nodes: list[str], command: str, **arguments: Any) -> None:
        """A control command without waiting for replies (each node's mailbox runs its commands in order)."""
        if self._conn is None:
            self.connect()
        started = time.monotonic()
        try:
            self._app.control.broadcast(command, arguments=arguments, destination=nodes, connection=self._conn)
        except Exception as exc:
            raise self._fail(exc, started) from None

    def revoke(self, task_id: str, confirm: list[str] | None = None, timeout: float = 1.0) -> set[str]:
        """Revoke a task id on every worker (its message, when delivered again, is discarded, not run).
        `confirm`: the nodes whose replies to wait for, up to `timeout` (a kill that follows must not bring the
        message back before they know); returns the nodes that confirmed."""
        if self._conn is None:
            self.connect()
        started = time.monotonic()
        try:
            if not confirm:
                self._app.control.revoke(task_id, connection=self._conn)
                return set()
            replies = self._app.control.revoke(task_id, connection=self._conn, reply=True, timeout=timeout)
        except Exception as exc:
            raise self._fail(exc, started) from None
        return {node for reply in replies or [] for node in reply if node in confirm}

    def queue_depth(self, queue: str) -> int | None:
        """Messages waiting in `queue` (Redis: kombu's count over the priority lists; RabbitMQ: a passive
        declare, which the broker answers); None when a RabbitMQ queue does not exist (on Redis an empty queue
        and a missing one are the same: 0)."""
        if self._conn is None:
            self.connect()
        started = time.monotonic()
        channel = self._conn.channel()
        try:
            if self._conn.transport.driver_type == "redis":
                # kombu's own count: every priority step's list, under the app's key prefix and separator (its
                # passive declare checks existence with an EXISTS that the prefix does not reach).
                return int(channel._size(queue))
            return int(channel.queue_declare(queue, passive=True).message_count)
        except Exception as exc:
            if "NOT_FOUND" in str(exc) or "no queue" in str(exc).lower():
                return None
            raise self._fail(exc, started) from None
        finally:
            try:
                channel.close()
            except Exception:
                pass

    def shutdown_nodes(self, names: list[str]) -> None:
        """Ask the named nodes to shut down (warm) through the broker."""
        if self._conn is None:
            self.connect()
        self._app.control.broadcast("shutdown", destination=names, connection=self._conn)

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.release()
            except Exception:
                pass
            self._conn = None

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
