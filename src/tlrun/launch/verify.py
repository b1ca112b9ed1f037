"""Step 4 of the launch path: the new node answers, and exactly the expected workers answer.

Counting uses raw ping replies (`control.ping()` returns a list); `inspect().ping()` folds replies into
a dict keyed by node name and would hide a duplicate. The census broadcast is sent right after the worker
is spawned, so its full reply window overlaps the worker's start-up instead of adding to it; the new worker
cannot answer it (it is not subscribed yet), so the census counts everything *else* on the broker.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from tlrun.errors import BrokerError
from tlrun.launch.broker import Broker

T = TypeVar("T")

# One readiness ping returns as soon as the node answers (a destination-limited ping stops at its one
# reply), or after this long. A ping sent before the new worker subscribed to its mailbox is lost (fanout),
# so a short poll keeps that loss to 25 ms (the bench's outside probe pings every 20 ms).
READY_POLL = 0.025
# A worker that says when it consumes (a held one: hold.py) is pinged from then on; until then only this
# often, in case its word is lost (each ping costs the launcher milliseconds of CPU in Celery's control code).
UNSAID_POLL = 0.5


@dataclass(frozen=True)
class NodeSeen:
    name: str
    replies: int
    local_pids: tuple[int, ...]  # processes on this host with that node name

    @property
    def duplicated(self) -> bool:
        return self.replies > 1


@dataclass(frozen=True)
class ReadyNode:
    """One node this launcher started, with how many raw replies carry its name (1: ours alone)."""

    role: str
    node: str
    pid: int
    replies: int = 1
    renamed_from: str | None = None


@dataclass(frozen=True)
class RoleCount:
    """How many workers of one role answer across the cluster (node names `<prefix><pid>[-N]@host`)."""

    role: str
    answering: int
    expected: int


@dataclass(frozen=True)
class ReadyReport:
    nodes: tuple[ReadyNode, ...]  # ours, one per role
    seconds: float
    others: tuple[NodeSeen, ...]
    expected: int
    roles: tuple[RoleCount, ...] = ()  # declared roles: counted each by its node names; empty: count every reply
    # The census of the other workers has not ended yet: this report knows only ours (they answered their
    # own pings); the census's findings follow when its window ends (`Counted`).
    census_pending: bool = False

    @property
    def node(self) -> str:
        return self.nodes[0].node

    @property
    def worker_pid(self) -> int:
        return self.nodes[0].pid

    @property
    def answering(self) -> int:
        return sum(n.replies for n in self.nodes) + sum(o.replies for o in self.others)

    @property
    def duplicated(self) -> tuple[ReadyNode, ...]:
        return tuple(n for n in self.nodes if n.replies > 1)

    @property
    def as_expected(self) -> bool:
        if self.census_pending:
            return True  # nothing known yet against it
        if self.duplicated:
            return False
        if self.roles:
            return all(r.answering == r.expected for r in self.roles)
        return self.answering == self.expected

    @property
    def miscounted(self) -> tuple[RoleCount, ...]:
        if self.census_pending:
            return ()
        return tuple(r for r in self.roles if r.answering != r.expected)


class Census(Generic[T]):
    """One broadcast over a full reply window, on its own connection and thread: by default a ping, whose
    result is the node names of the raw replies; `call(broker, window)` runs another (doctor's
    `active_queues`)."""

    def __init__(self, url: str, window: float, call: Callable[[Broker, float], T] | None = None) -> None:
        # Built here, on the caller's thread: Celery's package swaps itself for a lazy module while it is
        # imported, and a second thread importing it at the same moment (the user's app, in doctor) fails
        # with "cannot import name 'Celery'". Import first, then start threads.
        self._broker = Broker(url)
        self._window = window
        self._call: Callable[[Broker, float], Any] = call or (lambda broker, window: broker.ping(timeout=window))
        self.replies: T = cast(T, [])
        self.error: BrokerError | None = None
        self.connected = threading.Event()  # set once connected (or failed): the broadcast follows at once
        self._thread = threading.Thread(target=self._run, name="tlrun-census", daemon=True)

    def start(self) -> Census[T]:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            with self._broker as broker:
                try:
                    broker.connect()
                finally:
                    self.connected.set()
                self.replies = self._call(broker, self._window)
        except BrokerError as exc:
            self.error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self, should_stop: Callable[[], bool] = lambda: False) -> T:
        while self._thread.is_alive() and not should_stop():
            self._thread.join(0.05)
        if self.error is not None:
            raise self.error
        return self.replies


def wait_ready(
    broker: Broker,
    node: str,
    deadline: float,
    still_running: Callable[[], bool],
    should_stop: Callable[[], bool],
    pid: int | None = None,
    said: Callable[[float], bool] | None = None,
) -> bool:
    """Ping the node until it answers (True); False when the worker exited, a stop was asked, or time ran out.
    With `pid`, only a reply from that process counts (tlrun's own ping, answered with the pid by the workers
    its shim runs): another worker already answering with the same name never passes for ours. `said(t)`:
    waits up to t seconds for the worker's own word that it consumes; until it comes, one ping per UNSAID_POLL
    instead of one per READY_POLL."""
    while True:
        if should_stop() or not still_running():
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if said is not None and not said(min(UNSAID_POLL, remaining)):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or should_stop() or not still_running():
                return False
        if pid is not None:
            if broker.answers_as(node, pid, min(READY_POLL, remaining)):
                return True
        elif broker.ping(destination=[node], timeout=min(READY_POLL, remaining)):
            return True


def build_report(
    started: Sequence[ReadyNode],
    seconds: float,
    census: Sequence[str],
    expected: int,
    local_nodes: Mapping[str, Iterable[int]],
    roles: Sequence[tuple[str, Callable[[str], bool], int]] = (),
) -> ReadyReport:
    """Pure: each of our nodes answered once (readiness); the census adds every other reply, duplicates kept.
    `roles` (declared roles: name, whose node names, expected) are counted each on its own: a worker of
    another role, or of another app on the same broker, is listed but does not count against a role."""
    counts = collections.Counter(census)
    ours = tuple(dataclasses.replace(n, replies=1 + counts.pop(n.node, 0)) for n in started)
    others = tuple(NodeSeen(name, n, tuple(sorted(local_nodes.get(name, ())))) for name, n in sorted(counts.items()))
    every = [(n.node, n.replies) for n in ours] + [(o.name, o.replies) for o in others]
    per_role = tuple(
        RoleCount(name, sum(replies for node, replies in every if owns(node)), want) for name, owns, want in roles
    )
    return ReadyReport(ours, seconds, others, expected, per_role)
