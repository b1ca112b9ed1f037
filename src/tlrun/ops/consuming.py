"""A worker that answers pings but no longer consumes (celery#10205, #10302, #8030: after a broker connection
drop, a cancelled consumer): health checks pass, queues grow, nothing runs.

A worker is *not consuming* a queue it must consume (its role's queues) when that queue has messages waiting
while the worker reports no active or reserved task, and either the queue is missing from its
`active_queues` (found at once), or this has lasted `stuck_after` seconds (`TLRUN_STUCK_AFTER`, default
60 s: needs a history, so the launcher's periodic check finds it and records it for doctor and health).
Cheap: one passive queue declare per queue (Redis LLEN; RabbitMQ counts itself) and three control
commands to the one node, each returning as soon as the node replies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Protocol

from tlrun.errors import BrokerError
from tlrun.launch.broker import Broker
from tlrun.launch.periodic import Periodic

STUCK_AFTER = 60.0
ENV_STUCK_AFTER = "TLRUN_STUCK_AFTER"
CHECK_EVERY = 30.0
ENV_CHECK_EVERY = "TLRUN_CONSUME_CHECK_EVERY"


@dataclass(frozen=True)
class NodeState:
    node: str
    consuming: frozenset[str] | None  # queues in its active_queues; None: it did not reply
    busy: int | None  # active + reserved tasks; None: it did not reply
    active: int | None = None  # tasks running now; None: it did not reply


@dataclass(frozen=True)
class NotConsuming:
    node: str
    queue: str
    waiting: int
    since: float  # epoch seconds: when the messages were first seen waiting on an idle worker
    reason: str

    def message(self) -> str:
        when = datetime.fromtimestamp(self.since, timezone.utc).isoformat(timespec="seconds")
        return (
            f"{self.node} answers pings but does not consume queue {self.queue}: {self.waiting} message(s) "
            f"waiting since {when} ({self.reason})"
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> NotConsuming | None:
        try:
            node, queue, reason = str(data["node"]), str(data["queue"]), str(data["reason"])
            return cls(node, queue, int(data["waiting"]), float(data["since"]), reason)
        except (KeyError, TypeError, ValueError):
            return None


def judge(
    state: NodeState,
    wanted: Iterable[str],
    depths: dict[str, int | None],
    now: float,
    first_seen: MutableMapping[tuple[str, str], float],
    stuck_after: float,
) -> list[NotConsuming]:
    """Pure: which of `wanted` the node fails to consume, given queue depths and its own replies.
    `first_seen` carries the history between checks (empty: one check, only the immediate rule)."""
    found = []
    for queue in sorted(set(wanted)):
        waiting = depths.get(queue) or 0
        key = (state.node, queue)
        if waiting <= 0 or state.busy is None or state.busy > 0 or state.consuming is None:
            first_seen.pop(key, None)
            continue
        since = first_seen.setdefault(key, now)
        if queue not in state.consuming:
            gone = "the queue is not in its active_queues: its consumer is gone"
            found.append(NotConsuming(state.node, queue, waiting, since, gone))
        elif now - since >= stuck_after:
            found.append(
                NotConsuming(
                    state.node, queue, waiting, since, f"it lists the queue but stayed idle for {now - since:.0f} s"
                )
            )
    return found


def node_state(broker: Broker, node: str, timeout: float = 1.0) -> NodeState:
    """The node's own view: the queues it consumes and how many tasks it holds. Raises BrokerError."""
    queues = broker.ask(node, "active_queues", timeout)
    active = broker.ask(node, "active", timeout)
    reserved = broker.ask(node, "reserved", timeout)
    consuming = (
        frozenset(str(q.get("name")) for q in queues if isinstance(q, dict)) if isinstance(queues, list) else None
    )
    busy = len(active) + len(reserved) if isinstance(active, list) and isinstance(reserved, list) else None
    return NodeState(node, consuming, busy, len(active) if isinstance(active, list) else None)


def depths(broker: Broker, queues: Iterable[str]) -> dict[str, int | None]:
    return {queue: broker.queue_depth(queue) for queue in set(queues)}


def check(
    broker: Broker,
    node: str,
    wanted: Iterable[str],
    now: float,
    first_seen: MutableMapping[tuple[str, str], float] | None = None,
    stuck_after: float = STUCK_AFTER,
) -> list[NotConsuming]:
    """One check of one node against the broker. [] when it cannot tell (no reply: that is health's job)."""
    wanted = list(wanted)
    try:
        waiting = depths(broker, wanted)
        if not any(waiting.values()):
            return []  # nothing waits: consuming or not, nothing is held up (and no control round trip)
        state = node_state(broker, node)
    except BrokerError:
        return []
    return judge(state, wanted, waiting, now, {} if first_seen is None else first_seen, stuck_after)


def wanted_queues(queue_set: frozenset[str] | None) -> list[str]:
    """A role's queues; Celery's default queue when the role names none."""
    from tlrun.launch.procs import DEFAULT_QUEUE

    return sorted(queue_set) if queue_set else [DEFAULT_QUEUE]


class Watch(Periodic):
    """The launcher's periodic check, on a thread with its own broker connection: every `every` seconds,
    each (node, queues) that `targets()` names is checked; `take()` hands the verdicts to the supervise loop."""

    name = "tlrun-consume-check"

    def __init__(
        self,
        url: str,
        targets: Callable[[], list[tuple[str, list[str]]]],
        every: float = CHECK_EVERY,
        stuck_after: float = STUCK_AFTER,
        sample: bool = False,
        queue_owner: QueueOwner | None = None,  # report queue lengths (one launcher per cluster)
        all_queues: Callable[[], list[str]] | None = None,  # the project's queues, every role's
        standalone: bool = False,
    ) -> None:
        """`sample`: ask every node for its state at every check (for metrics), not only when messages wait.
        `standalone`: a launcher without workers (tlrun beat) that publishes the queue lengths when it holds
        the lease: a role scaled to zero still has its queue length published (autoscaling wakes it)."""
        import threading

        super().__init__(every)
        self.standalone = standalone
        self.sample = sample
        self._queue_owner = queue_owner
        self._all_queues = all_queues
        self._states: dict[str, NodeState] = {}
        self._lengths: dict[str, int] = {}
        self.broker_up: bool | None = None  # the last round's answer (None: no round yet)
        self.url = url
        self.stuck_after = stuck_after
        self._targets = targets
        self._first_seen: dict[tuple[str, str], float] = {}  # the thread's own
        self._verdicts: dict[str, list[NotConsuming]] = {}
        self._forgotten: set[str] = set()
        self._lock = threading.Lock()

    def round(self) -> None:
        import time

        with self._lock:
            forgotten, self._forgotten = self._forgotten, set()
        for key in [k for k in self._first_seen if k[0] in forgotten]:
            del self._first_seen[key]
        try:
            targets = list(self._targets())
            if not targets and not self.standalone:
                # No worker of ours runs (it died; a restart may come): another launcher publishes the queue
                # lengths from now on, at once, not when our lease would expire.
                self._publish({}, owner=False)
                with Broker(self.url) as broker:
                    broker.connect()
                self.broker_up = True
                return
            lengths: dict[str, int | None] = {}
            with Broker(self.url) as broker:
                for node, queues in targets:
                    waiting = depths(broker, queues)
                    lengths.update(waiting)
                    if self.sample or any(waiting.values()):
                        state = node_state(broker, node)
                    else:
                        state = NodeState(node, None, None)  # nothing waits: no verdict, no history
                    found = judge(state, queues, waiting, time.time(), self._first_seen, self.stuck_after)
                    with self._lock:
                        self._verdicts[node] = found
                        if state.busy is not None:
                            self._states[node] = state
            owner = self._queue_owner() if self._queue_owner is not None else False
            if owner:  # every queue of the project, 0 when empty (as celery-exporter reports it)
                with Broker(self.url) as broker:
                    rest = [q for q in (self._all_queues() if self._all_queues else []) if q not in lengths]
                    lengths.update(depths(broker, rest))
            self.broker_up = True
            self._publish({q: n or 0 for q, n in lengths.items()}, owner)
        except BrokerError:
            # The broker is away: the worker's own reconnect logic is at work, not ours to judge. No queue length
            # is known now: none is published (a 0 would say "empty"), and the lease passes as it expires.
            self.broker_up = False
            with self._lock:
                self._lengths = {}

    def _publish(self, lengths: dict[str, int], owner: bool) -> None:
        if not owner and self._queue_owner is not None:
            self._queue_owner.release()
        with self._lock:
            self._lengths = lengths if owner else {}

    def take(self) -> dict[str, list[NotConsuming]]:
        with self._lock:
            verdicts, self._verdicts = self._verdicts, {}
        return verdicts

    def latest(self) -> tuple[dict[str, NodeState], dict[str, int]]:
        """The last node states and queue lengths, for metrics. The lengths only while this launcher may
        publish them (its lease still valid at this very moment: never two publishers at once)."""
        holds = self._queue_owner is not None and self._queue_owner.holds()
        with self._lock:
            return dict(self._states), dict(self._lengths) if holds else {}

    def forget(self, node: str) -> None:
        """A restarted worker starts with a clean history."""
        with self._lock:
            self._verdicts.pop(node, None)
            self._forgotten.add(node)


class QueueOwner(Protocol):
    """Who publishes the queue lengths (one launcher per cluster, by a lease on the broker)."""

    def __call__(self) -> bool:
        """Take or renew the lease (a broker call); may this launcher publish?"""

    def holds(self) -> bool:
        """May it publish at this moment (no broker call)?"""

    def release(self) -> None:
        """Let another launcher publish, now."""


def recorded_items(settings: Any, key: str) -> list[Any]:
    """The items of list `key` in the lock records of this host's live launchers of the project's roles."""
    from tlrun.launch import guard

    kinds = [r.lock_kind for r in settings.all_roles]
    return [
        item
        for _kind, record, _holder in guard.live_records(settings.project_id, kinds)
        for item in record.get(key) or []
    ]


def recorded(settings: Any) -> list[NotConsuming]:
    """What this host's launchers found with their history (the `stuck_after` rule), from their lock records."""
    return [nc for nc in map(NotConsuming.from_dict, recorded_items(settings, "not_consuming")) if nc is not None]


def project_queues(settings: Any) -> list[str]:
    return sorted({q for role in settings.all_roles for q in wanted_queues(role.queue_set)})


def project_check(
    settings: Any, url: str, nodes: Iterable[str], waiting: dict[str, int | None] | None = None
) -> list[NotConsuming]:
    """Every answering node of the project's roles (by node name), checked once, plus the launchers'
    records; one entry per (node, queue). `waiting`: queue depths already known (DepthProbe): when nothing
    waits, no node is asked anything."""
    import time

    found_recorded = recorded(settings)
    if waiting is not None and not any(waiting.values()):
        return found_recorded
    targets = []
    for node in nodes:
        role = next((r for r in settings.all_roles if r.owns_node(node)), None)
        if role is not None:
            targets.append((node, wanted_queues(role.queue_set)))
    found: dict[tuple[str, str], NotConsuming] = {(nc.node, nc.queue): nc for nc in found_recorded}
    if targets:
        try:
            with Broker(url) as broker:
                for node, queues in targets:
                    for nc in check(broker, node, queues, time.time()):
                        found.setdefault((nc.node, nc.queue), nc)
        except BrokerError:
            pass  # doctor and health report the broker themselves
    return list(found.values())
