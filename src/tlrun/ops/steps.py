"""What `tlrun worker` adds for operations: the consumption watch (NOT_CONSUMING) and the metrics endpoint."""

from __future__ import annotations

import functools
import os
import threading
from typing import TYPE_CHECKING, Any

from tlrun.config import Role
from tlrun.errors import UsageError
from tlrun.events import Notice
from tlrun.launch.steps import Step
from tlrun.launch.units import Unit, WorkerUnit
from tlrun.ops import consuming

if TYPE_CHECKING:
    from tlrun.cluster.beat_step import LeaseStep
    from tlrun.deploy.restart import RestartStep
    from tlrun.launch.launcher import Launcher
    from tlrun.ops import metrics
    from tlrun.ops.hung import HungStep
    from tlrun.ops.memory import MemoryStep


class ConsumeStep(Step):
    """Every `consume_check_every` seconds, check that each worker consumes its role's queues; one that answers
    pings but does not is reported, recorded for doctor and health and, with a restart step, restarted."""

    name = "consumption watch"

    def __init__(self, restart: RestartStep | None, sample: bool) -> None:
        self.restart = restart
        self.sample = sample
        self.watch: consuming.Watch | None = None
        self.queue_lease: QueueMetricsLease | None = None
        self.not_consuming: dict[str, tuple[str, ...]] = {}  # node -> queues, for metrics
        self._recorded: set[str] = set()  # nodes whose lock record names queues they do not consume
        self._stuck: dict[str, list[consuming.NotConsuming]] = {}

    def started(self, launcher: Launcher) -> None:
        standalone = not launcher.workers and launcher.beat is not None and self.sample  # tlrun beat --metrics-port
        if not launcher.workers and not standalone:
            return

        def targets() -> list[tuple[str, list[str]]]:
            return [
                (w.node, consuming.wanted_queues(w.role.queue_set))
                for w in launcher.workers
                if launcher.sup.running(w.child)
            ]

        self.watch = consuming.Watch(
            launcher.broker_url,
            targets,
            launcher.s.consume_check_every,
            launcher.s.stuck_after,
            sample=self.sample,
            queue_owner=self._owner(launcher) if self.sample else None,
            all_queues=lambda: sorted({q for r in launcher.s.all_roles for q in consuming.wanted_queues(r.queue_set)}),
            standalone=standalone,
        ).start()

    def _owner(self, launcher: Launcher) -> QueueMetricsLease:
        self.queue_lease = QueueMetricsLease(launcher)
        return self.queue_lease

    def poll(self, launcher: Launcher) -> bool:
        if self.watch is not None:
            self._stuck.update(self.watch.take())
        return bool(self._stuck)

    def act(self, launcher: Launcher) -> None:
        verdicts, self._stuck = self._stuck, {}
        for node, found in verdicts.items():
            w = next((w for w in launcher.workers if w.node == node), None)
            if w is None:
                continue
            self.not_consuming[node] = tuple(nc.queue for nc in found)
            if found or node in self._recorded:
                launcher.record(w, not_consuming=[nc.as_dict() for nc in found])
                if found:
                    self._recorded.add(node)
                else:
                    self._recorded.discard(node)
            if not found:
                continue
            for nc in found:
                launcher.report(Notice(nc.message(), "warning"))
            if self.restart is None or launcher.sup.stop_requested:
                continue
            assert self.watch is not None
            self.watch.forget(node)
            why = f"{w.label} {node} does not consume {found[0].queue}"
            launcher.stop_units([w], "not consuming", then=functools.partial(self._again, launcher, node, why))

    def _again(self, launcher: Launcher, node: str, why: str, unit: Unit) -> None:
        """The worker that did not consume is stopped: start it again under the restart policy."""
        assert self.restart is not None and isinstance(unit, WorkerUnit)
        self.not_consuming[node] = ()
        self._recorded.discard(node)
        launcher.record(unit, not_consuming=[])
        self.restart.schedule(launcher, unit, why)

    def close(self, launcher: Launcher) -> None:
        if self.watch is not None:
            self.watch.close()
        if self.queue_lease is not None:
            self.queue_lease.close()  # the next launcher publishes the queue lengths at once


class QueueMetricsLease:
    """celery_queue_length comes from one launcher per cluster (hosts would repeat it), elected with the
    broker lease beat uses, on a key of its own: with beat or without, someone publishes it. Asked by the
    consumption watch's thread after each check: the lease renews itself there (ttl: three checks)."""

    def __init__(self, launcher: Launcher) -> None:
        from tlrun.cluster.backends import backend_for
        from tlrun.cluster.lease import BeatLease, Holder, lease_name

        s = launcher.s
        ttl = max(3 * s.consume_check_every, 2.0)
        name = lease_name(s.app, s.project_name)
        self.lease: Any = None
        try:
            backend = backend_for(launcher.broker_url, name, ttl, prefix="tlrun:queue-metrics")
        except ValueError:
            return  # a transport without a lease: no queue lengths from tlrun
        self.lease = BeatLease(backend, Holder.new(os.getpid(), launcher.hostname), ttl)

    def __call__(self) -> bool:
        from tlrun.cluster.fence import clock

        if self.lease is None:
            return False
        self.lease.tick(clock())
        return bool(self.lease.valid(clock()))

    def holds(self) -> bool:
        from tlrun.cluster.fence import clock

        return self.lease is not None and bool(self.lease.valid(clock()))

    def release(self) -> None:
        if self.lease is not None and self.lease.held:
            self.lease.release()

    def close(self) -> None:
        if self.lease is not None:
            self.lease.release()


class MetricsStep(Step):
    """tlrun worker --metrics-port: Prometheus metrics in celery-exporter's names plus tlrun's own."""

    name = "metrics"

    def __init__(
        self,
        port: int,
        addr: str,
        consume: ConsumeStep,
        restart: RestartStep | None,
        lease: LeaseStep | None,
        hung: HungStep | None = None,
        memory: MemoryStep | None = None,
    ) -> None:
        self.port, self.addr = port, addr
        self.consume, self.restart, self.lease, self.hung = consume, restart, lease, hung
        self.memory = memory
        self._server: Any = None
        self._tasks: dict[str, Any] = {}  # role -> taskmetrics.RoleTasks
        self._tasks_lock = threading.Lock()  # scrapes come on threads of their own

    def validate(self, launcher: Launcher) -> None:
        """A port already taken fails here, before anything is stopped."""
        from tlrun.ops import metrics

        try:
            self._server = metrics.serve(self.port, self.addr, lambda: self.sample(launcher))
        except OSError as exc:
            raise UsageError(
                f"cannot serve metrics on {self.addr}:{self.port}: {exc.strerror or exc}",
                hint="choose another --metrics-port",
            ) from None
        launcher.report(Notice(f"metrics on http://{self.addr}:{self.port}/metrics"))

    def close(self, launcher: Launcher) -> None:
        if self._server is not None:
            self._server.shutdown()
        for tasks in self._tasks.values():
            tasks.remove()

    def _task_totals(self, launcher: Launcher) -> tuple[tuple[str, str, Any], ...]:
        """Each role's task counts (read at scrape time from its workers' files), labelled like its workers."""
        from tlrun.launch import guard
        from tlrun.launch.early import task_stats_prefix
        from tlrun.ops import metrics, taskmetrics

        live = launcher.sup.running_pids()
        out = []
        for w in launcher.workers:
            with self._tasks_lock:
                tasks = self._tasks.get(w.role.name)
                if tasks is None:
                    prefix = task_stats_prefix(
                        guard.runtime_dir(os.environ), launcher.s.project_id, w.role.name, os.getpid()
                    )
                    tasks = self._tasks[w.role.name] = taskmetrics.RoleTasks(prefix)
            out.append((w.role.name, metrics.host_of(w.node), tasks.totals(live.__contains__)))
        return tuple(out)

    def sample(self, launcher: Launcher) -> metrics.LauncherSample:
        from tlrun.ops import metrics

        watch = self.consume.watch
        states, lengths = watch.latest() if watch is not None else ({}, {})
        broker_up = watch.broker_up if watch is not None else None
        samples = []
        for w in launcher.workers:
            pid = launcher.sup.pid(w.child) if launcher.sup.running(w.child) else None
            state = states.get(w.node)
            pool_running, rss = _pool_and_rss(pid)
            samples.append(
                metrics.WorkerSample(
                    node=w.node,
                    role=w.role.name,
                    # Up: its process runs, it answered once, and the broker it works through answers.
                    up=pid is not None and w.ready_seconds is not None and broker_up is not False,
                    # A dead worker runs nothing (its last reply said otherwise); unknown until it replies.
                    tasks_active=(state.active if state is not None else None) if pid is not None else 0,
                    restarts=self.restart.restarts(w) if self.restart is not None else 0,
                    last_exit_code=w.last_exit_code,
                    ready_seconds=w.ready_seconds,
                    stop_seconds=w.stop_seconds,
                    pool_expected=_pool_expected(w.role),
                    pool_running=pool_running,
                    rss_bytes=rss,
                    not_consuming=self.consume.not_consuming.get(w.node, ()),
                    hung_tasks=len(self.hung.hung.get(w.node, ())) if self.hung is not None else 0,
                    tasks_busy=state.busy if state is not None and pid is not None else None,
                    concurrency=_pool_expected(w.role) or w.role.worker.concurrency,
                )
            )
        held = self.lease.held() if self.lease is not None else None
        recoveries = self.hung.recoveries if self.hung is not None else 0
        kills = dict(self.memory.kills_by_task) if self.memory is not None else {}
        return metrics.LauncherSample(
            tuple(samples),
            dict(lengths),
            held,
            launcher.hostname,
            recoveries,
            kills,
            broker_up=broker_up,
            app=launcher.s.app,
            project=launcher.s.project_name or launcher.s.app,
            tasks=self._task_totals(launcher),
        )


def _pool_expected(role: Role) -> int | None:
    """Prefork pool size: --concurrency, else Celery's default (the number of CPUs); None for other pools."""
    if (role.worker.pool or "prefork") not in ("prefork", "processes"):
        return None
    return role.worker.concurrency or os.cpu_count() or 1


def _pool_and_rss(pid: int | None) -> tuple[int | None, int | None]:
    """The worker's pool processes (children running its own command line) and its main process's RSS."""
    if pid is None:
        return None, None
    import psutil

    try:
        proc = psutil.Process(pid)
        argv = proc.cmdline()
        children = sum(1 for c in proc.children() if c.cmdline() == argv)
        return children, proc.memory_info().rss
    except psutil.Error:
        return None, None
