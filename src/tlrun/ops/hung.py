"""HUNG_TASK: a task still running past the hard time limit it runs under, or past `hung_after` without one.

Celery enforces hard time limits only on the prefork pool; on threads, solo, gevent and eventlet a task stuck
in C (a `time.sleep`, a socket without a timeout) runs forever (celery#9203). The workers tlrun runs answer
`tlrun_active` (registered by its shim: `_celery_fix.active_tasks`) from their main process, with each task's
id, name, the pid running it, its runtime and its limit (the call's `time_limit`, the task's,
`task_time_limit` or --time-limit). Arguments are never asked for. An idle worker, and a task within its
limit, are never hung.

`HungStep` (tlrun worker, tlrun dev) asks its workers every check interval (`TLRUN_CONSUME_CHECK_EVERY`) on a
thread, reports each hung task once, records them in the unit's lock record (doctor, health and the metrics
read it) and, with --restart, recovers: on prefork it SIGKILLs that pool child only (Celery replaces it; with
late acks and `task_reject_on_worker_lost` the task goes back to the queue); on the other pools it restarts
the worker with the stop ladder, under the restart step's backoff and give-up rules.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from tlrun.errors import BrokerError
from tlrun.events import Notice
from tlrun.launch import heartbeat, signals
from tlrun.launch._celery_fix import ACTIVE_COMMAND
from tlrun.launch.broker import Broker
from tlrun.launch.periodic import Periodic
from tlrun.launch.steps import Step
from tlrun.launch.units import READY, Unit, WorkerUnit

if TYPE_CHECKING:
    from tlrun.deploy.restart import RestartStep
    from tlrun.launch.launcher import Launcher

log = logging.getLogger(__name__)

COMMAND = ACTIVE_COMMAND
ASK_TIMEOUT = 1.0


@dataclass(frozen=True)
class HungTask:
    node: str
    task: str  # the task's name
    id: str
    pid: int  # the process that runs it (a prefork pool child, else the worker's main process)
    runtime: float  # seconds
    limit: float | None  # its hard time limit; None: judged by hung_after
    pool_child: bool = False  # pid is a prefork pool child (killing it leaves the worker running)

    def message(self) -> str:
        over = f"its hard time limit of {self.limit:g} s" if self.limit else "hung_after (no time limit)"
        return f"task {self.task} [{self.id}] on {self.node} (pid {self.pid}) has run {self.runtime:.1f} s, past {over}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(data: Any) -> HungTask | None:
        try:
            return HungTask(
                str(data["node"]),
                str(data["task"]),
                str(data["id"]),
                int(data["pid"]),
                float(data["runtime"]),
                float(data["limit"]) if data.get("limit") is not None else None,
                bool(data.get("pool_child")),
            )
        except (KeyError, TypeError, ValueError):
            return None


def judge(node: str, tasks: Any, hung_after: float) -> list[HungTask]:
    """The hung ones among a node's `tlrun_active` tasks."""
    found = []
    for t in tasks if isinstance(tasks, list) else []:
        if not isinstance(t, dict):
            continue
        limit = t.get("limit")
        bound = float(limit) if isinstance(limit, (int, float)) and limit > 0 else hung_after
        runtime = t.get("runtime")
        if isinstance(runtime, (int, float)) and runtime > bound:
            hung = HungTask.from_dict({**t, "node": node, "task": t.get("name")})
            if hung is not None:
                found.append(hung)
    return found


def running(broker: Broker, nodes: list[str], timeout: float = ASK_TIMEOUT) -> dict[str, list[dict[str, Any]]]:
    """node -> the tasks it runs (its `tlrun_active` reply), for every node that answered."""
    replies = broker.ask_each(nodes, COMMAND, timeout)
    return {
        node: [t for t in reply.get("tasks") or [] if isinstance(t, dict)]
        for node, reply in replies.items()
        if isinstance(reply, dict)
    }


def ask(broker: Broker, nodes: list[str], hung_after: float) -> dict[str, list[HungTask]]:
    """node -> its hung tasks, for every node that answered."""
    return {node: judge(node, tasks, hung_after) for node, tasks in running(broker, nodes).items()}


def from_heartbeat(node: str, path: str | None, hung_after: float, now: float | None = None) -> list[HungTask]:
    """The hung ones among the tasks a worker runs in its main process (solo, threads), from its heartbeat
    file: no remote-control answer needed (a busy solo worker gives none)."""
    found = heartbeat.running_tasks(path)
    if found is None:
        return []
    pid, tasks = found
    now = time.time() if now is None else now
    return judge(node, [{**t, "pid": pid, "runtime": now - t["started"]} for t in tasks], hung_after)


def merged(*verdicts: dict[str, list[HungTask]]) -> dict[str, list[HungTask]]:
    """node -> its hung tasks, one entry per task id, from several sources."""
    out: dict[str, dict[str, HungTask]] = {}
    for source in verdicts:
        for node, tasks in source.items():
            out.setdefault(node, {}).update({h.id: h for h in tasks})
    return {node: list(tasks.values()) for node, tasks in out.items()}


def recorded(settings: Any) -> list[HungTask]:
    """What this host's launchers found, from their lock records."""
    from tlrun.ops.consuming import recorded_items

    return [h for h in map(HungTask.from_dict, recorded_items(settings, "hung")) if h is not None]


def project_check(settings: Any, url: str | None, nodes: list[str]) -> list[HungTask]:
    """The project's hung tasks: what its launchers here recorded, plus a live look at each answering node of
    its roles (when the broker answers: `url`). One entry per task id."""
    found = {h.id: h for h in recorded(settings)}
    ours = [n for n in nodes if any(r.owns_node(n) for r in settings.all_roles)]
    if url is not None and ours:
        try:
            with Broker(url) as broker:
                for tasks in ask(broker, ours, settings.hung_after).values():
                    for h in tasks:
                        found[h.id] = h
        except BrokerError:
            pass  # doctor and health report the broker themselves
    return list(found.values())


class Watch(Periodic):
    """Asks the targets every `every` seconds; `take()` gives the latest verdicts."""

    name = "tlrun-hung"

    def __init__(self, url: str, targets: Callable[[], list[tuple[str, str]]], every: float, hung_after: float) -> None:
        super().__init__(every)
        self.url, self.targets, self.hung_after = url, targets, hung_after
        self._lock = threading.Lock()
        self._verdicts: dict[str, list[HungTask]] | None = None

    def round(self) -> None:
        """Each worker's heartbeat file (tasks in its main process), then a remote-control question (prefork's
        pool children); a broker that does not answer leaves the files' verdicts."""
        targets = self.targets()
        if not targets:
            return
        local = {node: from_heartbeat(node, path, self.hung_after) for node, path in targets}
        try:
            with Broker(self.url) as broker:
                asked = ask(broker, [node for node, _ in targets], self.hung_after)
        except BrokerError as exc:
            log.debug("hung-task check failed: %s", exc)
            asked = {}
        with self._lock:
            self._verdicts = merged(local, asked)

    def take(self) -> dict[str, list[HungTask]] | None:
        with self._lock:
            verdicts, self._verdicts = self._verdicts, None
        return verdicts


class HungStep(Step):
    name = "hung tasks"

    def __init__(self, restart: RestartStep | None, hung_after: float, every: float) -> None:
        self.restart = restart
        self.hung_after = hung_after
        self.every = every
        self.watch: Watch | None = None
        self.hung: dict[str, list[HungTask]] = {}  # node -> its hung tasks now (metrics)
        self.recoveries = 0
        self._said: set[str] = set()  # task ids already reported
        self._times: dict[str, int] = {}  # task id -> how often it was recovered
        self._dealt: dict[str, int] = {}  # task id -> the process of its last recovery
        self.given_up: set[str] = set()  # task ids revoked and hung again: left alone, reported
        self._verdicts: dict[str, list[HungTask]] | None = None

    def started(self, launcher: Launcher) -> None:
        if not launcher.workers:
            return

        def targets() -> list[tuple[str, str]]:
            return [(w.node, w.heartbeat) for w in list(launcher.workers) if w.state == READY]

        self.watch = Watch(launcher.broker_url, targets, self.every, self.hung_after).start()

    def poll(self, launcher: Launcher) -> bool:
        if self.watch is not None and self._verdicts is None:
            self._verdicts = self.watch.take()
        return self._verdicts is not None

    def act(self, launcher: Launcher) -> None:
        verdicts, self._verdicts = self._verdicts or {}, None
        for node, found in verdicts.items():
            w = next((w for w in launcher.workers if w.node == node), None)
            if w is None:
                continue
            if found or self.hung.get(node):
                launcher.record(w, hung=[h.as_dict() for h in found])
            self.hung[node] = found
            for h in found:
                if h.id not in self._said:
                    self._said.add(h.id)
                    launcher.report(Notice(f"HUNG_TASK: {h.message()}", "warning"))
            if found and self.restart is not None and not launcher.sup.stop_requested:
                self._recover(launcher, w, found)

    def _recover(self, launcher: Launcher, w: WorkerUnit, found: list[HungTask]) -> None:
        """Prefork: SIGKILL the task's pool child and everything it started; solo and threads: restart the
        worker. The second time one task id is recovered, it is revoked first (late acks would bring it back
        for ever); found hung once more after that, tlrun gives up on it with a finding."""
        main = launcher.sup.pid(w.child)
        # A verdict of a round that began before the last recovery names the process already dealt with.
        found = [h for h in found if h.id not in self.given_up and self._dealt.get(h.id) != h.pid]
        for h in found:
            self._dealt[h.id] = h.pid
            self._times[h.id] = self._times.get(h.id, 0) + 1
            if self._times[h.id] == 2:
                self._revoke(launcher, h)
            elif self._times[h.id] > 2:
                self.given_up.add(h.id)
                launcher.report(
                    Notice(f"HUNG_TASK: gave up on {h.task} [{h.id}]: revoked, and hung again on {w.node}", "warning")
                )
        found = [h for h in found if h.id not in self.given_up]
        if not found:
            return
        children = [h for h in found if h.pool_child and h.pid != main]
        if children and len(children) == len(found):
            for h in children:
                if signals.kill_pool_child(main, h.pid):
                    self.recoveries += 1
                    said = f"hung task {h.task} [{h.id}]: SIGKILL to pool child {h.pid} of {w.node}"
                    launcher.report(Notice(f"{said} and its subprocesses"))
            return
        assert self.restart is not None
        self.recoveries += 1
        why = f"hung task {found[0].task} [{found[0].id}] on {w.node}"
        launcher.report(Notice(f"{why}: restarting the worker with the stop ladder"))
        launcher.stop_units([w], "hung task", then=functools.partial(self._again, launcher, why))

    def _revoke(self, launcher: Launcher, h: HungTask) -> None:
        """Revoke by id (every worker of the app keeps it and drops the message when it comes back)."""
        try:
            with Broker(launcher.broker_url) as broker:
                broker.revoke(h.id, confirm=[h.node])
        except BrokerError as exc:
            launcher.report(Notice(f"hung task {h.task} [{h.id}]: could not revoke it: {exc}", "warning"))
            return
        launcher.report(Notice(f"hung task {h.task} [{h.id}] hung twice: revoked"))

    def _again(self, launcher: Launcher, why: str, unit: Unit) -> None:
        assert self.restart is not None and isinstance(unit, WorkerUnit)
        self.hung[unit.node] = []
        launcher.record(unit, hung=[])
        self.restart.schedule(launcher, unit, why)

    def close(self, launcher: Launcher) -> None:
        if self.watch is not None:
            self.watch.close()
