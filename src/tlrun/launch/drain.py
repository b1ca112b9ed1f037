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

A reload in place on Redis takes step 1 early (`pause`), while the successors import the new code, so that
the wait of step 2 is over by then; a successor that does not import `resume`s them (add_consumer).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

from tlrun.errors import BrokerError
from tlrun.launch.broker import Broker

CONTROL_TIMEOUT = 1.0
POLL_MARGIN = 0.05  # how much longer than the poll interval to wait for an in-flight BRPOP
CANCEL_POLL = 0.02  # between two looks at a node's queues while its cancel is pending
CELERY_POLL_INTERVAL = 1.0  # kombu's Redis BRPOP timeout when the app sets none (plain `celery worker`)


@dataclass(frozen=True)
class Drained:
    ok: bool
    why: str = ""  # why the worker may not be killed (ok False)


@dataclass(frozen=True)
class Paused:
    """Nodes whose queues were cancelled ahead of their stop (pause), with what they consumed, to resume."""

    queues: dict[str, list[dict[str, Any]]]  # node -> the queues it consumed (active_queues' replies)
    at: float  # when every one of them was seen consuming nothing (monotonic)


def pause(url: str, nodes: list[str]) -> Paused | None:
    """Stop `nodes` fetching (step 1 of the drain) ahead of their stop, while their successors import: None
    unless every one answered and consumes nothing now. What it cancelled is in the answer, for `resume`."""
    try:
        with Broker(url, socket_timeout=CONTROL_TIMEOUT + 1) as broker:
            queues = broker.ask_each(nodes, "active_queues", CONTROL_TIMEOUT)
            if set(queues) != set(nodes):
                return None
            consumed = {n: [q for q in queues[n] or [] if isinstance(q, dict) and q.get("name")] for n in nodes}
            at = _cancel(broker, consumed)
            if at is None:
                resume(url, Paused(consumed, time.monotonic()), broker)
                return None
            return Paused(consumed, at)
    except BrokerError:
        return None


def _cancel(broker: Broker, consumed: dict[str, list[dict[str, Any]]]) -> float | None:
    """Cancel every queue the nodes consume; when each reports none left (Celery's cancel_consumer only
    schedules the cancel for the worker's next loop turn), or None."""
    by_queue: dict[str, list[str]] = {}
    for node, queues in consumed.items():
        for q in queues:
            by_queue.setdefault(str(q["name"]), []).append(node)
    for queue, consumers in by_queue.items():
        broker.tell(consumers, "cancel_consumer", queue=queue)
    deadline = time.monotonic() + CONTROL_TIMEOUT
    while True:
        after = broker.ask_each(list(consumed), "active_queues", CONTROL_TIMEOUT)
        if set(after) == set(consumed) and not any(after.values()):
            return time.monotonic()
        if time.monotonic() >= deadline:
            return None
        time.sleep(CANCEL_POLL)


def resume(url: str, paused: Paused, broker: Broker | None = None) -> None:
    """The paused nodes consume again what they consumed (their successors did not import): each queue as
    the node declared it (Redis keeps no queue arguments; pause is for Redis)."""
    keys = ("queue_arguments", "binding_arguments", "consumer_arguments", "durable", "exclusive", "auto_delete")
    try:
        with contextlib.ExitStack() as stack:
            if broker is None:
                broker = stack.enter_context(Broker(url, socket_timeout=CONTROL_TIMEOUT + 1))
            for node, queues in paused.queues.items():
                for q in queues:
                    found = q.get("exchange")
                    exchange: dict[str, Any] = found if isinstance(found, dict) else {}
                    broker.tell(
                        [node],
                        "add_consumer",
                        queue=q["name"],
                        exchange=exchange.get("name"),
                        exchange_type=exchange.get("type"),
                        routing_key=q.get("routing_key"),
                        **{k: q[k] for k in keys if q.get(k) is not None},
                    )
    except BrokerError:
        pass  # the broker is gone: the workers reconnect and consume what they are configured to


def drain_many(url: str, nodes: dict[str, float | None], paused_at: float | None = None) -> dict[str, Drained]:
    """Drain several nodes at once, over one connection: each step is one broadcast to all of them (it returns
    when every node replied), so draining six costs about what draining one does. node -> its verdict.
    `paused_at`: when `pause` saw them consume nothing; the wait for an in-flight BRPOP counts from there."""
    verdicts: dict[str, Drained] = {}
    left = dict(nodes)

    def fail(node: str, why: str) -> None:
        verdicts[node] = Drained(False, why)
        left.pop(node, None)

    try:
        with Broker(url, socket_timeout=CONTROL_TIMEOUT + 1) as broker:
            queues = broker.ask_each(list(left), "active_queues", CONTROL_TIMEOUT)
            for node in [n for n in left if n not in queues]:
                fail(node, "it did not answer active_queues")
            by_queue: dict[str, list[str]] = {}
            for node in left:
                for name in [q.get("name") for q in queues[node] or [] if isinstance(q, dict)]:
                    by_queue.setdefault(str(name), []).append(node)
            quiet_since = paused_at if paused_at is not None and not by_queue else None
            for queue, consumers in by_queue.items():
                broker.tell(consumers, "cancel_consumer", queue=queue)
            # Celery's cancel_consumer only schedules the cancel (call_soon) for the worker's next loop turn,
            # and a mailbox may answer the next command in the same turn: ask until no queue is left.
            deadline = time.monotonic() + CONTROL_TIMEOUT
            while True:
                after = broker.ask_each(list(left), "active_queues", CONTROL_TIMEOUT)
                if not any(after.get(node) for node in left) or time.monotonic() >= deadline:
                    break
                time.sleep(CANCEL_POLL)
            for node in list(left):
                if node not in after:
                    fail(node, "it did not answer active_queues")
                elif after[node]:
                    fail(node, "it still consumes after the cancel")
            polls = [p for p in left.values() if p is not None]
            if left and polls:
                since = time.monotonic() - (quiet_since if quiet_since is not None else time.monotonic())
                time.sleep(max(0.0, max(polls) + POLL_MARGIN - since))
            for what in ("active", "reserved", "scheduled"):
                if not left:
                    break
                held = broker.ask_each(list(left), what, CONTROL_TIMEOUT)
                for node in list(left):
                    if node not in held:
                        fail(node, f"it did not answer {what}")
                    elif held[node]:
                        fail(node, f"{len(held[node])} task(s) {what}")
    except BrokerError as exc:
        for node in list(left):
            fail(node, f"broker: {exc}")
    for node in left:
        verdicts[node] = Drained(True)
    return verdicts
