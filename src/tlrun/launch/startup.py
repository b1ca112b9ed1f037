"""Steps 3 and 4 of the launch path for a launcher's workers: spawn (held until their code imported, where
asked), then verify: each answers a ping, and a census of raw replies counts every worker on the broker.
A mixin of `Launcher`: the reload and restart steps use these too."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from tlrun.config import Settings
from tlrun.errors import BrokerError, DuplicateNodeError
from tlrun.events import Counted, Event, Notice, Ready
from tlrun.launch import brokerconf, checks, guard, procs, verify
from tlrun.launch.broker import Broker
from tlrun.launch.hold import Hold
from tlrun.launch.outputs import Outputs
from tlrun.launch.supervise import Supervisor
from tlrun.launch.units import READY, STARTING, Unit, WorkerUnit

if TYPE_CHECKING:
    from tlrun.launch.early import EarlyStart
    from tlrun.launch.launcher import LaunchOptions
    from tlrun.launch.steps import Step
    from tlrun.launch.units import BeatUnit


class Startup:
    s: Settings
    sup: Supervisor
    opts: LaunchOptions
    outputs: Outputs
    broker_url: str
    workers: list[WorkerUnit]
    beat: BeatUnit | None
    census: list[str] | verify.Census[list[str]] | None
    steps: list[Step]
    early: EarlyStart | None
    pending_census: tuple[verify.Census[list[str]], float] | None  # deferred: the census and the verdict's seconds

    def report(self, event: Event) -> None:
        raise NotImplementedError

    def set_state(self, unit: Unit, state: str, **fields: object) -> None:
        raise NotImplementedError

    def record(self, unit: Unit, **fields: Any) -> None:
        raise NotImplementedError

    def sweep(self, units: Sequence[Unit]) -> None:
        raise NotImplementedError

    def alive(self, child: str) -> bool:
        return self.sup.running(child) and not self.sup.stop_requested

    def stop_asked(self) -> bool:
        return self.sup.stop_requested

    def end_child(self, name: str, settle: float = 0.0) -> tuple[int | None, tuple[str, ...]]:
        """End a child that never connected (a spare, a prepared worker): SIGKILL is safe, it holds nothing.
        With `settle`, first give it that long to exit on its own (to print why its app did not import).
        Returns its status and its last lines."""
        deadline = time.monotonic() + settle
        while self.sup.running(name) and time.monotonic() < deadline:
            time.sleep(0.05)
        code = self.sup.kill(name) if self.sup.running(name) else self.sup.reap(name)
        return code, self.outputs.detach(name)

    def learn_broker(self) -> None:
        """The app's own broker settings, before tlrun talks to the broker beyond a plain reachability check
        (brokerconf.py): from a held worker (which imports the app anyway), else the app imported here, else
        the settings recorded by the last launcher (a bad save), else the URL alone, said once. Recorded,
        secrets removed, for the commands that must not import the app (health, stop)."""
        url = self.broker_url
        if brokerconf.known(url):
            return
        deadline = time.monotonic() + self.s.ready_timeout
        options = self.early.broker_options(deadline) if self.early is not None and self.early.workers else None
        if options is not None:
            brokerconf.register(url, options, "worker")
        else:
            from tlrun.launch.broker import load_app

            record = brokerconf.record_path(guard.lock_dir(), self.s.project_id)
            try:
                brokerconf.register(url, brokerconf.options_from_conf(load_app(self.s).conf), "app")
            except Exception as exc:
                recorded = brokerconf.read_record(record, url)
                brokerconf.register(url, recorded or {}, "record" if recorded is not None else "url")
                if recorded is None:
                    self.report(Notice(f"{exc}: tlrun talks to the broker with its URL alone", "warning"))
                return
        self.keep_broker_options(brokerconf.options_for(url)[0])

    def check_broker(self) -> None:
        """The broker answers, before anything is stopped: a redis-py PING from the URL where that is enough;
        where it fails before the app's settings are known (TLS certificates, Sentinel), again with them."""
        from tlrun.launch.broker import check_reachable
        from tlrun.launch.brokerfail import TransportUnloadable
        from tlrun.launch.owner import ForeignBrokerError

        try:
            check_reachable(self.broker_url)
        except BrokerError as exc:
            if brokerconf.known(self.broker_url) or isinstance(exc, (TransportUnloadable, ForeignBrokerError)):
                raise
            self.learn_broker()
            check_reachable(self.broker_url)

    def keep_broker_options(self, options: dict[str, Any] | None) -> None:
        """Options a new generation of the workers said (a reload): they replace the launcher's, and the record."""
        if options is None:
            return
        brokerconf.register(self.broker_url, options, "worker")
        try:
            path = brokerconf.record_path(guard.lock_dir(), self.s.project_id)
            brokerconf.write_record(path, self.broker_url, options)
        except OSError:
            pass  # the commands that read it import the app instead

    def wait_ready(
        self, workers: Sequence[WorkerUnit], deadline: float, holds: Mapping[str, Hold] | None = None
    ) -> WorkerUnit | None:
        """Ping each worker until it answers; the first that does not (exited, or out of time), else None.
        `holds`: the released workers' holds, by child name (they say when they consume: pinged from then)."""
        with Broker(self.broker_url) as broker:
            for w in workers:
                alive = functools.partial(self.sup.running, w.child)
                hold = (holds or {}).get(w.child)
                said = functools.partial(hold.wait_consuming, alive=alive) if hold is not None else None
                answered = verify.wait_ready(
                    broker, w.node, deadline, alive, self.stop_asked, self.sup.pid(w.child), said=said
                )
                if hold is not None:
                    hold.close()  # its word came, or matters no more: not an open socket for the worker's life
                if not answered:
                    return w
                self.outputs.release(w.child)
                w.since = datetime.now().strftime("%H:%M:%S")
                self.set_state(w, READY, node=w.node, worker_pid=self.sup.pid(w.child), serving_since=time.time())
        return None

    def _spawn_and_wait(self, workers: list[WorkerUnit], census_first: bool = True) -> bool:
        """Spawn the workers, then wait for each one's first pong; False when a stop was asked meanwhile.
        A worker that never answers stops the others started with it and raises the error that explains it.
        `census_first`: the census is sent before the workers connect (else the caller sends it later)."""
        # Held, where the launcher asks for it or adopts an early start's worker (which is held).
        held = self.opts.held_workers or (self.early is not None and bool(self.early.workers))
        holds = {w.child: Hold() for w in workers} if held else {}
        for w in workers:
            self.set_state(w, STARTING)
            w.spawn(self, hold=holds.get(w.child))
            if w.hold is not None:
                holds[w.child] = w.hold
        if self.census is None and census_first:
            # Right after the spawn, so that importing Celery overlaps the worker's own start-up. The new
            # worker cannot answer it: it subscribes to its mailbox only after its own imports (> 0.3 s).
            self.census = verify.Census(self.broker_url, self.s.ping_window).start()
        deadline = time.monotonic() + self.s.ready_timeout
        for w in workers:
            hold = holds.get(w.child)
            if hold is not None:
                if hold.wait_prepared(deadline, functools.partial(self.alive, w.child)):
                    w.poll_interval = hold.poll_interval
                    self.keep_broker_options(hold.broker_options)
                    hold.release()
                else:
                    hold.close()  # a worker not prepared in time ends unconnected; its failure is reported below
            elif self.broker_url.startswith(("redis://", "rediss://")):
                w.poll_interval = 1.0  # kombu's BRPOP timeout when the app sets none
        failed = self.wait_ready(workers, deadline, holds)
        if self.sup.stop_requested:
            return False
        if failed is not None:
            timed_out = self.sup.running(failed.child)
            status = self.sup.stop(failed.child) if timed_out else self.sup.reap(failed.child)
            tail = list(self.outputs.detach(failed.child))
            others = [o.child for o in workers if o is not failed]
            self.sup.stop_each(others)
            for name in others:
                self.outputs.detach(name)
            raise checks.start_failure(self.s.app, self.s.ready_timeout, status, tail, timed_out)
        return True

    def start_workers(
        self, workers: list[WorkerUnit], started: float, allow_rename: bool = True, defer_census: bool = False
    ) -> verify.ReadyReport | None:
        """Spawn and verify `workers`; the report covers every worker of this launcher. None: stop asked.

        With `defer_census` (the first start, without --strict), the report is made as soon as each worker
        answered its own ping, while the census of the other workers still runs its window: its findings
        follow from the supervise loop (`census_arrived`)."""
        self.learn_broker()
        self.claim_names(workers)
        defer = defer_census and self.census is None and not self.s.strict
        if not self._spawn_and_wait(workers, census_first=not defer):
            return None
        if defer:
            seconds = time.monotonic() - started
            for w in workers:
                w.ready_seconds = round(seconds, 3)
            # Sent now that each of ours answered: ours answer it too (and are taken out of it), so that
            # nothing depends on the census leaving before a worker subscribes.
            self.pending_census = (verify.Census(self.broker_url, self.s.ping_window).start(), seconds)
            running = [w for w in self.workers if self.sup.running(w.child)]
            return dataclasses.replace(self.ready_report(running, seconds), census_pending=True)
        census = self.census
        assert census is not None
        replies = self.census = census if isinstance(census, list) else census.result(self.stop_asked)
        if not self._rename_taken(workers if allow_rename else [], replies):
            return None
        for w in workers:
            w.ready_seconds = round(time.monotonic() - started, 3)
        ours = {w.node for w in self.workers}
        others = [name for name in replies if name not in ours]
        running = [w for w in self.workers if self.sup.running(w.child)]
        local = procs.pids_by_node(procs.main_processes(procs.scan(("worker",))), self.s.app) if others else {}
        return self.ready_report(running, time.monotonic() - started, replies, local)

    def _rename_taken(self, workers: Sequence[WorkerUnit], replies: Sequence[str]) -> bool:
        """A worker elsewhere already answers to one of our names: stop ours and come back under a unique
        one. False when a stop was asked meanwhile."""
        taken = [w for w in workers if w.node in replies]
        if not taken:
            return True
        self.sup.stop_each([w.child for w in taken])
        for w in taken:
            self.outputs.detach(w.child)
            old = w.node
            new = w.rename(set(replies))
            self.report(Notice(f"node name {old} already answers on the broker: restarting as {new}", "warning"))
        return self._spawn_and_wait(taken)

    def census_done(self) -> bool:
        """The deferred census has ended: `census_arrived` has its findings to report."""
        return self.pending_census is not None and self.pending_census[0].done()

    def census_arrived(self) -> None:
        """The deferred census ended (see start_workers): rename a worker whose name another one answers to
        (and verify it again), then say what the census adds to the verdict, or refuse a duplicate."""
        assert self.pending_census is not None
        census, seconds = self.pending_census
        self.pending_census = None
        try:
            replies = list(census.result())
        except BrokerError as exc:
            self.census = []
            self.report(Notice(f"the census of the broker's workers failed: {exc}", "warning"))
            return
        running = [w for w in self.workers if self.sup.running(w.child)]
        for w in running:  # our own answers (a busy solo worker may miss the census: then none)
            if w.node in replies:
                replies.remove(w.node)
        self.census = replies
        renamed = any(w.node in replies for w in running)
        if not self._rename_taken(running, replies):
            return
        ours = {w.node for w in self.workers}
        others = [name for name in replies if name not in ours]
        running = [w for w in self.workers if self.sup.running(w.child)]
        local = procs.pids_by_node(procs.main_processes(procs.scan(("worker",))), self.s.app) if others else {}
        report = self.ready_report(running, seconds, replies, local)
        if renamed:  # restarted under a unique name: a verdict of its own
            self.verdict(report)
            return
        for node in report.duplicated:
            raise DuplicateNodeError(f"{node.replies} workers answer as {node.node}: node names must be unique")
        if report.others or not report.as_expected:
            self.report(Counted(report))

    def claim_names(self, workers: Sequence[WorkerUnit]) -> None:
        """Before a worker starts, its node name must be free on the broker (a step claims it there): a name
        another launcher holds is renamed, even when that one's worker does not answer yet."""
        for w in workers:
            refused: set[str] = set()
            while not all(step.claim(self, w.node) for step in self.steps):  # type: ignore[arg-type]
                refused.add(w.node)
                old = w.node
                new = w.rename(refused)
                self.report(Notice(f"node name {old} is claimed by another launcher: starting as {new}", "warning"))

    def ready_report(
        self,
        workers: Sequence[WorkerUnit],
        seconds: float,
        replies: Sequence[str] = (),
        local: dict[str, list[int]] | None = None,
    ) -> verify.ReadyReport:
        nodes = [
            verify.ReadyNode(w.role.name, w.node, self.sup.pid(w.child) or 0, renamed_from=w.renamed_from)
            for w in workers
        ]
        # Declared roles are counted each by its node names, unless --expected set one total.
        per_role = [r for r in self.s.roles if r.declared]
        if self.s.expected_workers != sum(r.expected for r in self.s.roles):
            per_role = []
        roles = [(r.name, r.owns_node, r.expected) for r in per_role]
        return verify.build_report(nodes, seconds, replies, self.s.expected_workers, local or {}, roles)

    def verdict(self, ready: verify.ReadyReport) -> None:
        for node in ready.duplicated:
            raise DuplicateNodeError(f"{node.replies} workers answer as {node.node}: node names must be unique")
        self.report(Ready(ready))
        if self.s.strict and not ready.as_expected:
            if ready.roles:
                wrong = "; ".join(
                    f"role {r.role}: {r.answering} answer, expected {r.expected}" for r in ready.miscounted
                )
                raise DuplicateNodeError(f"--strict: {wrong}")
            n = ready.answering
            answer = f"{n} worker{'s answer' if n != 1 else ' answers'}"
            raise DuplicateNodeError(f"--strict: {answer}, expected {self.s.expected_workers}")

    def restart_worker(self, w: WorkerUnit) -> None:
        """Start a worker of this launcher again (a restart step): guard, sweep, spawn and verify as at first."""
        note = guard.check_env_guard(os.environ)  # the lock is still ours; the guard is checked again
        if note is not None:
            self.report(Notice(note.message, "warning"))
        self.sweep([w])
        ready = self.start_workers([w], time.monotonic(), allow_rename=False)
        if ready is not None:
            self.report(Ready(ready))
