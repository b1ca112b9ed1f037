"""The launch path every command shares: guard -> sweep -> spawn -> verify -> supervise, over units.

A `Launcher` runs its units (units.py: one worker per role, beat) and the steps a command attached
(steps.py). It holds the locks, the broker's address, the census and the children's output; it starts,
verifies and stops units, each on its own: a unit that waits for a running task does not hold up another.
Everything else (reload, the beat lease, restarts, the consumption watch, metrics, the private broker,
debug mode) is attached from dev/, cluster/, ops/ and deploy/ by tlrun/compose.py; this package imports
none of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlrun import redact
from tlrun.config import Settings
from tlrun.errors import AppImportError, StopError, WorkerStartError
from tlrun.events import Event, Exited, Notice, Reporter, StrayFound, WorkerOutput
from tlrun.launch import checks, guard, logfiles, owner, pid1, procs, sweep, tidy, unitctl, unitstop, verify
from tlrun.launch.broker import resolve_broker
from tlrun.launch.early import EarlyStart, remove_task_stats
from tlrun.launch.locks import UnitLocks
from tlrun.launch.outputs import Outputs
from tlrun.launch.startup import Startup
from tlrun.launch.steps import Step
from tlrun.launch.supervise import Supervisor, requeue_margin
from tlrun.launch.units import GONE, NO_PROCESS, READY, STARTING, STOPPING, BeatUnit, ProcessUnit, Unit, WorkerUnit
from tlrun.project.processes import ProcessSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchOptions:
    workers: bool = True
    beat: bool = False
    fast_stop: bool = False  # stop an idle worker by draining it, then SIGKILL (dev's default; worker --fast-stop)
    held: bool = False  # workers start through tlrun's entry module, held until released (dev)
    dev_poll: bool = False  # 0.1 s transport poll on Redis, where the app sets none (dev)
    init: bool = False  # --init: reap orphans and (Linux) be a subreaper, as PID 1 does
    is_pid1: bool = field(default_factory=pid1.is_pid1)  # a container's PID 1: also logs to stdout by default
    hup_reloads: bool = False  # SIGHUP asks the reload step for new code instead of a stop (tlrun worker)
    processes: tuple[ProcessSpec, ...] = ()  # the development stack's other processes (tlrun dev), Flower

    @property
    def init_duties(self) -> bool:
        return self.init or self.is_pid1

    @property
    def held_workers(self) -> bool:
        """Held workers report the transport's poll interval, which the fast stop needs."""
        return self.held or self.fast_stop or self.dev_poll


class Launcher(Startup):
    """One launcher's units, steps and children, from the first spawn to the last reap."""

    def __init__(
        self, settings: Settings, report: Reporter, sup: Supervisor, opts: LaunchOptions, steps: Sequence[Step] = ()
    ) -> None:
        self.s = settings
        self._reporter = report
        self.sup = sup
        self.opts = opts
        self.steps = list(steps)
        self.beat_env: dict[str, str] = {}  # added to beat's environment by steps (the lease's fence)
        self.hostname = socket.gethostname()
        self.workers = [WorkerUnit(role, self.hostname) for role in settings.roles] if opts.workers else []
        self.beat = BeatUnit() if opts.beat else None
        self.processes = [ProcessUnit(spec) for spec in opts.processes]
        self.broker_url = ""
        self.broker_source = ""
        self.broker_provided = False  # a step starts the broker (dev's private redis-server): do not check it yet
        self.status = 0
        # As a container's PID 1, stdout is the log (the runtime collects it) unless a log directory is set.
        # As a container's init (PID 1 or --init) the output goes to stdout, where the runtime collects it, and
        # no log file is written unless a log directory was set: the image's files may be read-only to us.
        self.log_dir = None if opts.init_duties and not settings.log_dir_given else settings.log_dir
        self.outputs = Outputs(
            self.log_dir,
            lambda label, lines: report(WorkerOutput(label, tuple(lines))),
            lambda msg: report(Notice(msg, "warning")),
            lambda: [
                *redact.secrets_of(self.broker_url),
                *redact.secrets_of(settings.broker_url),
                *redact.registered(),
            ],
        )
        self.census: list[str] | verify.Census[list[str]] | None = None
        self.unit_stops = unitstop.Requests(settings.project_id)
        self._stopping = False  # the launcher's own stop (a signal) has been acted on
        self._woken: list[Step] = []
        self.locks = UnitLocks(settings, report, self.hostname)
        self.early: EarlyStart | None = None
        self.pending_census: tuple[verify.Census[list[str]], float] | None = None

    def report(self, event: Event) -> None:
        """Say what happened (the reporter renders it); the steps observe it too (systemd's notifications)."""
        self._reporter(event)
        for step in self.steps:
            step.observe(self, event)

    @property
    def units(self) -> list[Unit]:
        return [*self.workers, *([self.beat] if self.beat is not None else []), *self.processes]

    def unit_for(self, child: str) -> Unit | None:
        return next((u for u in self.units if u.child == child), None)

    def beat_schedule_path(self) -> Path:
        return guard.runtime_dir(os.environ) / f"{self.s.project_id}.celerybeat-schedule"

    # -- guard: the units' locks and records (locks.py) --------------------------------------------
    def record(self, unit: Unit, **fields: Any) -> None:
        """Update the unit's lock record (what ps, health, doctor and stop read)."""
        self.locks.record(unit.lock_kind, **fields)

    def set_state(self, unit: Unit, state: str, **fields: Any) -> None:
        unit.state = state
        if state in NO_PROCESS:
            fields.setdefault(unit.pid_field, None)
        self.record(unit, state=state, **fields)

    # -- validation and broker ---------------------------------------------------------------------
    def validate(self) -> None:
        """Everything that can fail, before anything is stopped (--replace, the sweep) or started: the log
        directory, the app's module, the broker (resolved, and answering unless a step provides it)."""
        if self.log_dir is not None:
            logfiles.check_log_dir(self.log_dir)
        checks.check_app_module(self.s)
        choice = resolve_broker(self.s)
        checks.refuse_unshareable(choice.url)
        self.broker_url, self.broker_source = choice.url, choice.source
        for step in self.steps:
            step.validate(self)
        if not self.broker_provided:
            self.check_broker()
            stranger = owner.foreign_listener(self.broker_url)
            if stranger is not None:
                where = redact.redact_url(self.broker_url)
                self.report(
                    Notice(
                        f"the broker at {where} is run by {owner.user_name(stranger)}, another local user: they can "
                        "read every message and feed your workers tasks (use a broker of your own)",
                        "warning",
                    )
                )

    # -- sweep ---------------------------------------------------------------------------------------
    def sweep(self, units: Sequence[Unit]) -> None:
        workers = [u for u in units if isinstance(u, WorkerUnit)]
        # A stack's stray process (its launcher SIGKILLed) is a marked leftover, as a task's subprocess is.
        leftovers = workers or any(isinstance(u, ProcessUnit) for u in units)
        kinds = (["worker"] if workers else []) + ([procs.LEFTOVER] if leftovers else [])
        kinds += ["beat"] if self.beat in units else []
        if not self.s.sweep or not kinds:
            return
        result = sweep.sweep(
            self.s.project_id,
            self.s.app,
            self.s.project_root,
            self.s.stop_grace,
            kinds=kinds,
            roles=[w.role for w in workers],
            keep=self.early.pids() if self.early is not None else (),
            on_found=lambda stray: self.report(StrayFound(stray)),
            on_step=lambda msg: self.report(Notice(msg)),
        )
        if result.survivors:
            raise StopError(f"stray process(es) survived SIGKILL: {', '.join(map(str, result.survivors))}")

    # -- beat ----------------------------------------------------------------------------------------
    def start_beat(self) -> None:
        assert self.beat is not None
        child = self.beat.spawn(self)
        self.set_state(self.beat, READY, beat_pid=child.pid)

    def stop_beat(self, state: str, grace: float | None = None) -> None:
        """Stop beat now and wait for it (a lost lease, a reload); the unit stays this launcher's."""
        assert self.beat is not None
        self.beat.state = STOPPING
        self.sup.stop(self.beat.child, grace=grace)
        self.outputs.detach(self.beat.child)
        self.set_state(self.beat, state)

    # -- stop ----------------------------------------------------------------------------------------
    def stop_units(
        self, units: Sequence[Unit], why: str, then: Callable[[Unit], None] | None = None, announce: bool = False
    ) -> None:
        """Stop units, each the fastest safe way and all at once: idle workers drained together through the
        broker and killed (with fast stop), anything else with the warm ladder, whose end the supervise loop
        sees. `then(unit)` runs once the unit's process is gone."""
        running = [u for u in units if self.sup.running(u.child)]
        for u in units:
            if u not in running:
                self._stopped(u, None, then)
        for u in running:
            u.state, u.stop_began, u.announce_exit, u.after_stop = STOPPING, time.monotonic(), announce, then
        workers = [u for u in running if isinstance(u, WorkerUnit)]
        self.sup.begin_stop([u.child for u in running if u not in workers])  # beat: at once, not after drains
        drained = unitstop.drain_all(self, workers)
        idle = [u for u in workers if u.child in drained and drained[u.child].ok]
        self.sup.kill_each([u.child for u in idle])  # they hold nothing: every group at once, then each reaped
        for u in idle:
            self.outputs.detach(u.child)
            self.report(Notice(f"{why}: {u.node} was idle: drained and stopped in {drained[u.child].seconds:.2f} s"))
            self._stopped(u, 0)
        warm = [u for u in workers if u not in idle]
        for u in warm:
            if u.child in drained:
                self.report(Notice(f"{why}: {u.node} gets the warm stop ladder ({drained[u.child].why})"))
        self.sup.begin_stop([u.child for u in warm])

    def _stopped(self, unit: Unit, status: int | None, then: Callable[[Unit], None] | None = None) -> None:
        """A unit's process is gone after a stop was asked (of it, or of the launcher)."""
        then = then or unit.after_stop
        unit.after_stop = None
        if status is not None:
            unit.last_exit_code = status
            if unit.stop_began is not None:
                unit.stop_seconds = round(time.monotonic() - unit.stop_began, 3)
            if unit.announce_exit or self.sup.stop_requested:
                self.report(Exited(unit.node, status, True))
            if self._stopping and (isinstance(unit, WorkerUnit) or (unit is self.beat and not self.workers)):
                self.status = self.status or status
        self.set_state(unit, GONE)
        if then is not None:
            then(unit)

    def _serve_unit_stops(self) -> None:
        """`tlrun stop --role R` asked this launcher to stop some of its units and keep the others."""
        names = self.unit_stops.take()
        units = [u for u in self.units if u.alive and ((u.kind == "beat" and "beat" in names) or u.node in names)]
        units += [w for w in self.workers if w.alive and w.role.name in names and w not in units]

        def done(unit: Unit) -> None:
            self.locks.release(unit.lock_kind)
            self.report(Notice(f"stop: the {unit.label} {unit.node} stopped on request; the other units run on"))

        if units:
            self.stop_units(units, "stop", then=done, announce=True)
        unitctl.serve_restarts(self)

    def close(self) -> None:
        """The children are stopped first (a beat before its lease is released), then each step closes."""
        self.sup.stop_all()
        for step in reversed(self.steps):
            step.close(self)
        roles = [r.name for r in self.s.all_roles]
        remove_task_stats(guard.runtime_dir(os.environ), self.s.project_id, roles, os.getpid())

    # -- supervise -----------------------------------------------------------------------------------
    def _wake(self) -> bool:
        if self.sup.stop_requested:
            return not self._stopping or not self.sup.has_running()
        if self.unit_stops.pending() or self.census_done():
            return True
        self._woken = [step for step in self.steps if step.poll(self)]
        return bool(self._woken) or not any(u.alive for u in self.units)

    def loop(self) -> int:
        """Until every unit is gone, or the launcher was asked to stop and every child has; the exit status."""
        while True:
            got = self.sup.wait(interrupt=self._wake)
            if got is None:
                if self.sup.stop_requested:
                    if not self._stopping:
                        # The launcher's stop: every unit at once (drain the idle, warm ladder for the rest).
                        self._stopping = True
                        for step in self.steps:
                            step.stopping(self)
                        self.stop_units([u for u in self.units if u.alive], "stop", announce=True)
                        self.sup.escalate()
                    elif not self.sup.has_running():
                        break
                    continue
                if self.census_done():
                    self.census_arrived()
                if self.unit_stops.pending():
                    self._serve_unit_stops()
                for step in self._woken:
                    step.act(self)
                self._woken = []
                if not any(u.alive for u in self.units):
                    break
                continue
            if self.child_exited(*got):
                break
        self.sup.stop_all()
        return self.status

    def turn(self) -> None:
        """One turn of the steps without the loop (debug mode, whose main thread runs the worker)."""
        for step in self.steps:
            if step.poll(self):
                step.act(self)

    def child_exited(self, name: str, code: int) -> bool:
        """A child has exited (reaped): tell its unit and the steps. True when the launcher's loop ends."""
        tail = self.outputs.detach(name)
        unit = self.unit_for(name)
        if unit is None:  # a step's child (a reload's spare)
            for step in self.steps:
                if step.on_child_exit(self, name, code):
                    break
            return self.sup.stop_requested and not self.sup.has_running()
        unit.last_exit_code = code
        if unit.state == STOPPING or self.sup.stop_requested:
            self._stopped(unit, code)
            if self.sup.stop_requested:
                return not self.sup.has_running()
            return not any(u.alive for u in self.units)
        if not any(step.explains_exit(self, unit, code) for step in self.steps):
            self.report(Exited(unit.node, code, False, tail))
        if any(step.on_exit(self, unit, code, tail) for step in self.steps):
            return False
        self.status = code  # a clean exit of its own (a remote shutdown) is not a crash
        return True


def run(
    settings: Settings,
    report: Reporter,
    opts: LaunchOptions | None = None,
    steps: Sequence[Step] = (),
    in_process: Callable[[Launcher], int] | None = None,
    early: EarlyStart | None = None,
) -> int:
    """Run the project's units (a worker per role, beat) with `steps` until they stop; the exit status.
    `in_process` (debug mode) serves the workers in this very process after the guard and the sweep.
    `early`: the workers the CLI started held before validation (early.py), adopted by the first spawn."""
    opts = opts or LaunchOptions()
    started = time.monotonic()
    reaper = None
    if opts.init_duties:
        if not opts.is_pid1:
            pid1.become_subreaper()
        reaper = pid1.Reaper()
    with contextlib.ExitStack() as stack:
        sup = stack.enter_context(
            Supervisor(
                settings.stop_grace,
                lambda msg: report(Notice(msg)),
                defer_first_stop=opts.fast_stop,
                reaper=reaper,
                requeue_margin=requeue_margin(settings.stop_grace, checks.celery_version()),
                lifeline=early.lifeline if early is not None else None,
                hup_reloads=opts.hup_reloads,
            )
        )
        if early is not None:
            stack.callback(early.discard)  # a held worker not adopted (a failure, a stop) ends unconnected
        launcher = Launcher(settings, report, sup, opts, steps)
        launcher.early = early
        stack.callback(launcher.close)
        # Validate, guard, prepare, sweep: nothing is stopped before everything that can fail was checked. A
        # stop asked for meanwhile ends the launch before anything is spawned.
        launcher.validate()
        launcher.locks.take(stack, launcher.units)
        tidy.tidy(guard.runtime_dir(os.environ))  # what SIGKILLed launchers and old projects left behind
        stack.enter_context(launcher.unit_stops.listen())
        for unit in launcher.units:
            launcher.record(unit, unit_stop=True)  # `tlrun stop --role` may ask for this unit alone
        for step in launcher.steps:
            if not sup.stop_requested:
                step.prepare(launcher)
        if not sup.stop_requested:
            launcher.sweep(launcher.units)
        if sup.stop_requested:
            return 128 + (sup.stop_signal or signal.SIGINT)
        for unit in launcher.processes:  # they start while the workers do, and never wait for them
            if not sup.stop_requested:
                unitctl.start_process(launcher, unit)
        if launcher.workers and in_process is None:  # debug mode serves them in this process, below
            try:
                ready = launcher.start_workers(launcher.workers, started, defer_census=True)
            except (AppImportError, WorkerStartError) as exc:
                if not any(step.on_start_failed(launcher, exc) for step in launcher.steps):
                    raise
                ready = None
            if ready is not None:
                launcher.verdict(ready)
        for step in launcher.steps:
            if not sup.stop_requested:
                step.started(launcher)
        if launcher.beat is not None and launcher.beat.state == STARTING and not sup.stop_requested:
            launcher.start_beat()  # no step took charge of beat (the lease does, where there is one)
        return launcher.loop() if in_process is None else in_process(launcher)
