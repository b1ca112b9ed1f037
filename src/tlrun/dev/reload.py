"""Watch the project's Python files (watchfiles) on a background thread; the main thread swaps workers.

Only the main thread spawns (the parent-death signal is tied to the thread that forks), so the watcher
just collects changes and the supervisor loop picks them up.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tlrun.events import Notice, Reloaded
from tlrun.launch import checks
from tlrun.launch.hold import Hold
from tlrun.launch.steps import Step
from tlrun.launch.units import READY, STARTING, STOPPING, WAITING, Unit, WorkerUnit

if TYPE_CHECKING:
    from tlrun.launch.launcher import Launcher

IGNORED_DIRS = (
    "venv",
    "env",
    ".venv",
    ".env",
    "build",
    "dist",
    ".ruff_cache",
    ".eggs",
    ".nox",
    "site-packages",
    "logs",
)


class Watcher:
    def __init__(self, root: Path, ignore_paths: Sequence[Path] = (), debounce_ms: int = 1600, step_ms: int = 50):
        self.root = root
        self._ignore = [str(p) for p in ignore_paths]
        self._debounce = debounce_ms
        self._step = step_ms
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._changed: set[str] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tlrun-reload", daemon=True)

    def start(self) -> Watcher:
        self._thread.start()
        self._ready.wait(5)
        return self

    def _run(self) -> None:
        from watchfiles import PythonFilter, watch

        class ProjectFilter(PythonFilter):
            ignore_dirs = (*PythonFilter.ignore_dirs, *IGNORED_DIRS)

        self._ready.set()
        # A burst of saves arrives as one set: watchfiles waits `step` ms for quiet, `debounce` ms at most.
        for changes in watch(
            self.root,
            watch_filter=ProjectFilter(ignore_paths=self._ignore),
            debounce=self._debounce,
            step=self._step,
            stop_event=self._stop,
            raise_interrupt=False,
        ):
            with self._lock:
                self._changed.update(os.path.relpath(path, self.root) for _, path in changes)

    def pending(self) -> bool:
        with self._lock:
            return bool(self._changed)

    def take(self) -> list[str]:
        with self._lock:
            changed, self._changed = sorted(self._changed), set()
        return changed

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2)


class ReloadStep(Step):
    """tlrun dev --reload: on a save, each role's next worker imports the new code (app and task modules)
    while the old one serves; only then is the old one stopped, each role on its own: an idle worker is
    drained and swapped at once, a busy one finishes its tasks (warm ladder) while the other roles have
    swapped already. A save that does not import leaves every old worker serving. Beat restarts after the
    workers' check passed (its schedule lives in the code), keeping the cluster's lease.

    Spares: one held worker per role with Celery imported and the app not yet, so that a save costs only the
    import of the new code."""

    name = "reload"

    def __init__(self, root: Path, ignore: Sequence[Path]) -> None:
        self.watcher = Watcher(root, ignore)
        self._spares: dict[str, tuple[str, Hold]] = {}  # unit child -> spare child, hold
        self._next: dict[str, tuple[str, Hold]] = {}  # unit child -> prepared successor waiting for the old one
        self._changes: list[str] = []
        self._started = 0.0
        self._count = 0
        self._released: list[WorkerUnit] = []  # successors released, to be verified on the loop's next turn

    # -- the step's hooks ------------------------------------------------------------------------------
    def prepare(self, launcher: Launcher) -> None:
        self.watcher.start()  # before the first start: a save made while the workers start is seen

    def started(self, launcher: Launcher) -> None:
        self._spawn_spares(launcher)

    def on_start_failed(self, launcher: Launcher, error: Exception) -> bool:
        launcher.report(Notice(f"{error}; fix it and save: tlrun restarts the worker on the next change", "warning"))
        for w in launcher.workers:
            launcher.set_state(w, WAITING)
        return True

    def poll(self, launcher: Launcher) -> bool:
        return bool(self._released) or self.watcher.pending()

    def act(self, launcher: Launcher) -> None:
        if self._released:
            self._verify_released(launcher)
        if self.watcher.pending():
            self.reload(launcher)

    def on_exit(self, launcher: Launcher, unit: Unit, status: int, tail: tuple[str, ...]) -> bool:
        launcher.set_state(unit, WAITING)
        launcher.report(Notice(f"waiting for a change to start the {unit.label} again"))
        return True

    def on_child_exit(self, launcher: Launcher, child: str, status: int) -> bool:
        """A spare or a prepared successor exited (killed at a stop, or it died): forget it."""
        for table in (self._spares, self._next):
            for owner, (name, hold) in list(table.items()):
                if name == child:
                    hold.close()
                    del table[owner]
                    return True
        return "+spare" in child or "+next" in child

    def close(self, launcher: Launcher) -> None:
        self.watcher.close()
        for _name, hold in [*self._spares.values(), *self._next.values()]:
            hold.close()

    # -- a reload ------------------------------------------------------------------------------------
    def reload(self, launcher: Launcher) -> None:
        self._changes = self.watcher.take()
        self._started = time.monotonic()
        workers = [w for w in launcher.workers if w.alive]
        prepared = {w.child: self._prepare(launcher, w) for w in workers}
        deadline = time.monotonic() + launcher.s.ready_timeout
        for w in workers:
            name, hold = prepared[w.child]
            if not hold.wait_prepared(deadline, functools.partial(launcher.alive, name)):
                self._abandon(launcher, prepared, failed=w)
                return
        # The new code imports: swap. A successor still waiting from an earlier save has older code.
        for w in workers:
            stale = self._next.pop(w.child, None)
            if stale is not None:
                stale[1].close()
                launcher.end_child(stale[0])
            self._next[w.child] = prepared[w.child]
        if launcher.beat is not None and launcher.sup.running(launcher.beat.child):
            # Holding the lease or a warm standby: the new beat takes the lease again (the old one releases it
            # on its way out); the lease step reads its state.
            launcher.stop_beat(launcher.beat.state)
            launcher.start_beat()
        elif launcher.beat is not None and launcher.beat.state == WAITING:
            launcher.start_beat()
        launcher.stop_units(
            [w for w in workers if w.state != STOPPING], "reload", then=lambda unit: self._release(launcher, unit)
        )
        if not self._released:  # else after their verification: a spare's start would slow theirs
            self._spawn_spares(launcher)

    def _prepare(self, launcher: Launcher, w: WorkerUnit) -> tuple[str, Hold]:
        """The role's spare, told to import the app now; else a new held worker. Either is named
        `<unit>+next.N` until it takes the unit's name (a new spare may start meanwhile)."""
        self._count += 1
        name = f"{w.child}+next.{self._count}"
        spare = self._spares.pop(w.child, None)
        if spare is not None:
            spare_name, hold = spare
            if launcher.sup.running(spare_name) and hold.load():
                launcher.sup.rename(spare_name, name)
                launcher.outputs.rename(spare_name, name)
                return name, hold
            hold.close()
            launcher.end_child(spare_name)
        hold = Hold()
        w.spawn(launcher, name, hold, announce=False)
        return name, hold

    def _release(self, launcher: Launcher, unit: Unit) -> None:
        """The old worker is gone: its successor takes its name and connects. It is verified on the loop's
        next turn, together with every successor released meanwhile (their starts overlap)."""
        assert isinstance(unit, WorkerUnit)
        successor = self._next.pop(unit.child, None)
        if successor is None:
            return
        name, hold = successor
        if launcher.sup.stop_requested or not launcher.sup.running(name):
            hold.close()
            launcher.end_child(name)
            return
        launcher.sup.rename(name, unit.child)
        launcher.outputs.rename(name, unit.child)
        unit.poll_interval = hold.poll_interval
        launcher.set_state(unit, STARTING)
        hold.release()
        self._released.append(unit)

    def _verify_released(self, launcher: Launcher) -> None:
        released, self._released = self._released, []
        deadline = time.monotonic() + launcher.s.ready_timeout
        for unit in released:
            if launcher.wait_ready([unit], deadline) is not None:
                if not launcher.sup.stop_requested:
                    launcher.report(Notice(f"reload: {unit.node} did not answer after its release", "warning"))
                continue
            report = launcher.ready_report([unit], time.monotonic() - self._started)
            launcher.report(Reloaded(tuple(self._changes), time.monotonic() - self._started, report))
        self._spawn_spares(launcher)

    def _abandon(self, launcher: Launcher, prepared: dict[str, tuple[str, Hold]], failed: WorkerUnit) -> None:
        """A prepared worker did not import: end every prepared one unconnected; the old ones keep serving."""
        status: int | None = None
        tail: list[str] = []
        for child, (name, hold) in prepared.items():
            hold.close()
            code, lines = launcher.end_child(name, settle=5.0 if child == failed.child else 0.0)
            if child == failed.child:
                status, tail = code, list(lines)
        if launcher.sup.stop_requested:
            return
        error = checks.start_failure(launcher.s.app, launcher.s.ready_timeout, status, tail, status is None)
        old = [w for w in launcher.workers if w.state == READY]
        keeps = (
            f"the worker of {old[0].since} keeps running the previous code"
            if len(old) == 1
            else f"{len(old)} workers keep running the previous code"
            if old
            else "no worker runs until the next good save"
        )
        launcher.report(Notice(f"reload failed: {error}; {keeps}", "warning"))
        self._spawn_spares(launcher)

    def _spawn_spares(self, launcher: Launcher) -> None:
        if launcher.sup.stop_requested:
            return
        for w in launcher.workers:
            if w.alive and w.child not in self._spares:
                name, hold = f"{w.child}+spare", Hold(spare=True)
                w.spawn(launcher, name, hold, announce=False)
                self._spares[w.child] = (name, hold)
