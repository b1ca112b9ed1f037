"""Fast stop of an idle worker: drain it through the broker, prove it holds nothing, then it may be killed.

An idle prefork worker of Celery 5.7 takes about 2 s for a warm stop (its event loop notices SIGTERM only
when the transport's poll returns, each pool child sleeps 1 s after DEATH, the pool's stop sleeps 0.5 s).
Killing it instead is safe exactly when nothing can be lost or cut short:
1. cancel every queue it consumes, and see it report no queue left;
2. on Redis, wait longer than the transport's poll interval: a BRPOP already in flight can still pop a
   message after the cancel, and only a live worker puts such a message back;
3. see, in replies of that node, nothing active, reserved or scheduled.
Anything unexpected (no reply, a task, a reserved message, a failed command) says why, and the caller falls
back to the warm stop ladder. On AMQP the cancel is synchronous and unacked messages return on close.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from tlrun.errors import BrokerError
from tlrun.launch.broker import Broker

CONTROL_TIMEOUT = 1.0
POLL_MARGIN = 0.05  # how much longer than the poll interval to wait for an in-flight BRPOP
CELERY_POLL_INTERVAL = 1.0  # kombu's Redis BRPOP timeout when the app sets none (plain `celery worker`)


@dataclass(frozen=True)
class Drained:
    ok: bool
    why: str = ""  # why the worker may not be killed (ok False)


def drain(url: str, node: str, poll_interval: float | None) -> Drained:
    """Drain `node`; `poll_interval` is its transport's poll interval on Redis (None: not Redis)."""
    try:
        with Broker(url, socket_timeout=CONTROL_TIMEOUT + 1) as broker:
            queues = broker.ask(node, "active_queues", CONTROL_TIMEOUT)
            if queues is None:
                return Drained(False, "it did not answer active_queues")
            for queue in [q.get("name") for q in queues if isinstance(q, dict)]:
                answer = broker.ask(node, "cancel_consumer", CONTROL_TIMEOUT, queue=queue)
                if not (isinstance(answer, dict) and "ok" in answer):
                    return Drained(False, f"cancel_consumer {queue} failed: {answer!r}"[:200])
            left = broker.ask(node, "active_queues", CONTROL_TIMEOUT)
            if left is None or left:
                return Drained(False, "it still consumes after the cancel")
            if poll_interval is not None:
                time.sleep(poll_interval + POLL_MARGIN)
            for what in ("active", "reserved", "scheduled"):
                held = broker.ask(node, what, CONTROL_TIMEOUT)
                if held is None:
                    return Drained(False, f"it did not answer {what}")
                if held:
                    return Drained(False, f"{len(held)} task(s) {what}")
    except BrokerError as exc:
        return Drained(False, f"broker: {exc}")
    return Drained(True)
