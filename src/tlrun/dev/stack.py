"""The development stack's processes beside the workers (tlrun dev): readiness, restart with backoff after a
crash, a restart on a save where the process asks for it, and Flower.

The launch core starts and stops them (they are units: launch/units.py ProcessUnit, launch/unitctl.py);
this step watches them. A crash of one is reported and retried after a delay that doubles up to 30 s, and
never takes the workers down; a clean exit of its own is reported and not retried (`tlrun restart NAME`).
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from tlrun.errors import ConfigError, ReleaseError
from tlrun.events import Event, Notice, Saved, Spawned, UnitReady
from tlrun.launch import spawn, unitctl
from tlrun.launch.steps import Step
from tlrun.launch.units import BACKOFF, GONE, READY, STARTING, ProcessUnit, Unit
from tlrun.project.processes import ProcessSpec

if TYPE_CHECKING:
    from tlrun.launch.launcher import Launcher

FIRST_DELAY = 1.0
MAX_DELAY = 30.0
STEADY = 30.0  # a process that ran this long before it crashed starts again after the first delay
CHECK_EVERY = 0.1


def _answers(unit: ProcessUnit) -> bool:
    """One readiness check of the unit's current start."""
    how = unit.spec.readiness
    if how == "output":
        return unit.output_ready.is_set()
    if how is None or unit.port is None:
        return True
    if how == "port":
        try:
            with socket.create_connection(("127.0.0.1", unit.port), timeout=0.5):
                return True
        except OSError:
            return False
    conn = http.client.HTTPConnection("127.0.0.1", unit.port, timeout=2.0)
    try:
        conn.request("GET", "/")
        conn.getresponse().read(0)
        return True  # any answer: a 404 or a login page is a server that serves
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


class _Check(threading.Thread):
    """Checks one start of a unit until it is ready or the start is over (never blocks the launcher)."""

    def __init__(self, unit: ProcessUnit) -> None:
        super().__init__(name=f"tlrun-ready-{unit.spec.name}", daemon=True)
        self.unit = unit
        self.start_no = unit.starts
        self.ready = False
        self.done = threading.Event()
        self.cancel = threading.Event()

    def run(self) -> None:
        while not self.cancel.is_set():
            if _answers(self.unit):
                self.ready = True
                break
            self.cancel.wait(CHECK_EVERY)
        self.done.set()


class StackStep(Step):
    """Readiness and restarts of the launcher's processes (ProcessUnit)."""

    name = "stack"

    def __init__(self, reload: bool = False) -> None:
        self.reload = reload  # --reload: processes with `reload = true` restart on a save
        self._checks: dict[str, _Check] = {}
        self._due: dict[str, float] = {}  # unit child -> when its next start is due (after a crash)
        self._delay: dict[str, float] = {}
        self._saved = False
        self._slow: set[tuple[str, int]] = set()  # (unit child, start) already said to be slow to get ready

    def _watch(self, launcher: Launcher) -> None:
        for unit in launcher.processes:
            check = self._checks.get(unit.child)
            if unit.state == STARTING and self._unchecked(unit):
                if check is not None:
                    check.cancel.set()
                check = self._checks[unit.child] = _Check(unit)
                check.start()

    def started(self, launcher: Launcher) -> None:
        self._watch(launcher)

    def poll(self, launcher: Launcher) -> bool:
        now = time.monotonic()
        return (
            self._saved
            or any(c.done.is_set() for c in self._checks.values())
            or any(now >= due for due in self._due.values())
            or any(u.state == STARTING and self._unchecked(u) for u in launcher.processes)
            or any(self._late(launcher, u, now) for u in launcher.processes)
        )

    def _late(self, launcher: Launcher, unit: ProcessUnit, now: float) -> bool:
        return (
            unit.state == STARTING
            and now - unit.started_at > launcher.s.ready_timeout
            and (unit.child, unit.starts) not in self._slow
        )

    def _unchecked(self, unit: ProcessUnit) -> bool:
        check = self._checks.get(unit.child)
        return check is None or check.start_no != unit.starts

    def act(self, launcher: Launcher) -> None:
        now = time.monotonic()
        for unit in launcher.processes:
            check = self._checks.get(unit.child)
            if check is not None and check.done.is_set():
                del self._checks[unit.child]
                if check.ready and check.start_no == unit.starts and unit.state == STARTING:
                    self._ready(launcher, unit, time.monotonic() - unit.started_at)
            due = self._due.get(unit.child)
            if due is not None and now >= due and unit.state == BACKOFF and not launcher.stop_asked():
                del self._due[unit.child]
                unitctl.start_process(launcher, unit)
        for unit in launcher.processes:
            if self._late(launcher, unit, now):
                self._slow.add((unit.child, unit.starts))
                what = {"http": f"an HTTP answer on {unit.url}", "port": f"a connection to port {unit.port}"}.get(
                    unit.spec.readiness or "", f"a line matching {unit.spec.ready_pattern!r}"
                )
                launcher.report(
                    Notice(
                        f"{unit.spec.name} is not ready after {launcher.s.ready_timeout:g} s (waiting for {what}); "
                        f"its log: tlrun logs {unit.spec.name}",
                        "warning",
                    )
                )
        if self._saved:
            self._saved = False
            wanted = [u for u in launcher.processes if u.spec.reload and u.state in (STARTING, READY)]
            for unit in wanted:
                launcher.report(Notice(f"reload: restarting {unit.spec.name} (reload = true)"))
            if wanted:
                launcher.stop_units(wanted, "reload", then=self._again(launcher))
        self._watch(launcher)

    @staticmethod
    def _again(launcher: Launcher) -> Callable[[Unit], None]:
        def again(unit: Unit) -> None:
            assert isinstance(unit, ProcessUnit)
            unitctl.start_process(launcher, unit)

        return again

    def _ready(self, launcher: Launcher, unit: ProcessUnit, seconds: float) -> None:
        pid = launcher.sup.pid(unit.child) or 0
        launcher.set_state(unit, READY, since=time.strftime("%H:%M:%S"))
        how = unit.spec.readiness if unit.port is not None or unit.spec.readiness == "output" else None
        launcher.report(UnitReady(unit.spec.name, unit.kind, pid, unit.url, round(seconds, 2), how))

    def on_exit(self, launcher: Launcher, unit: Unit, status: int, tail: tuple[str, ...]) -> bool:
        if not isinstance(unit, ProcessUnit):
            return False
        check = self._checks.pop(unit.child, None)
        if check is not None:
            check.cancel.set()
        if status == 0:
            launcher.set_state(unit, GONE)
            launcher.report(Notice(f"{unit.spec.name} ended (status 0): not restarted (tlrun restart {unit.node})"))
            return True
        ran = time.monotonic() - unit.started_at
        delay = FIRST_DELAY if ran >= STEADY else min(MAX_DELAY, self._delay.get(unit.child, FIRST_DELAY / 2) * 2)
        self._delay[unit.child] = delay
        self._due[unit.child] = time.monotonic() + delay
        launcher.set_state(unit, BACKOFF)
        launcher.report(
            Notice(f"{unit.spec.name} crashed (status {status}): starting it again in {delay:g} s", "warning")
        )
        return True

    def observe(self, launcher: Launcher, event: Event) -> None:
        if isinstance(event, Saved) and self.reload:
            self._saved = True
        if isinstance(event, Spawned) and event.kind in ("process", "flower"):
            unit = next((u for u in launcher.processes if u.spec.name == event.node), None)
            if unit is not None:  # checked from its spawn on, while the workers start
                unit.state = STARTING
                self._watch(launcher)

    def stopping(self, launcher: Launcher) -> None:
        self._due.clear()
        for check in self._checks.values():
            check.cancel.set()

    def validate(self, launcher: Launcher) -> None:
        check_commands(launcher)

    def prepare(self, launcher: Launcher) -> None:
        if launcher.s.release is not None:
            run_release(launcher, launcher.s.release)

    def close(self, launcher: Launcher) -> None:
        self.stopping(launcher)


def check_commands(launcher: Launcher) -> None:
    """Every process's folder exists and its program can be run (a shell line's `sh` at least): a ConfigError
    before anything is stopped or started, never a traceback later."""
    root = launcher.s.project_root
    for unit in launcher.processes:
        spec = unit.spec
        cwd = root / spec.cwd if spec.cwd else root
        if not cwd.is_dir():
            raise ConfigError(f"process {spec.name}: its folder {cwd} does not exist ({spec.source})")
        program = spec.argv[0]
        if "/" in program:
            path = program if os.path.isabs(program) else str(cwd / program)
            if not (os.path.isfile(path) and os.access(path, os.X_OK)):
                raise ConfigError(f"process {spec.name}: {program} is not an executable file ({spec.source})")
        elif shutil.which(program, path=spawn.project_path(launcher.s.environ.get("PATH"))) is None:
            raise ConfigError(
                f"process {spec.name}: {program!r} is not on PATH ({spec.source})",
                hint="install it, or give its full path in the command",
            )


RELEASE_CHILD = "process:release"


def run_release(launcher: Launcher, spec: ProcessSpec) -> None:
    """Heroku's release phase: the Procfile's `release` command (migrations, say) once, in the stack's
    environment, to its end, before any process starts and before the workers connect; a failure ends the
    launch with ReleaseError and nothing else started. Its output goes to the console and its log like any
    process's; a stop asked for meanwhile stops it with the stop ladder."""
    unit = ProcessUnit(spec)
    cwd = launcher.s.project_root
    launcher.report(Notice(f"release: running `{spec.argv[-1]}` once before the stack starts"))
    child = launcher.sup.start(RELEASE_CHILD, spec.command(None), unit.environment(launcher), cwd, grace=spec.grace)
    launcher.outputs.attach(RELEASE_CHILD, child, f"proc_release_{os.getpid()}", label="release")
    began = time.monotonic()
    while launcher.sup.running(RELEASE_CHILD) and not launcher.stop_asked():
        time.sleep(CHECK_EVERY)
    if launcher.sup.running(RELEASE_CHILD):
        launcher.sup.stop(RELEASE_CHILD)
    status = launcher.sup.reap(RELEASE_CHILD)
    tail = launcher.outputs.detach(RELEASE_CHILD)
    if launcher.stop_asked():
        return  # the launch ends as any stopped launch does
    if status != 0:
        raise ReleaseError(
            f"the release command failed (status {status}): nothing else was started",
            hint=tail[-1] if tail else f"{spec.source}: {spec.argv[-1]}",
        )
    launcher.report(Notice(f"release: done in {time.monotonic() - began:.1f} s"))
