"""When to restart a crashed worker: exponential backoff with jitter, and a rule for giving up.

The policy is pure logic: the clock and the random source are passed in, so it is tested without waiting.
`RestartStep` attaches it to the launcher.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tlrun.errors import AppImportError, RestartGiveUpError, WorkerStartError
from tlrun.events import Notice
from tlrun.launch.steps import Step
from tlrun.launch.units import STARTING, Unit, WorkerUnit

if TYPE_CHECKING:
    from tlrun.launch.launcher import Launcher


@dataclass(frozen=True)
class RestartSettings:
    first_delay: float = 1.0  # seconds before the first restart
    max_delay: float = 60.0  # the backoff never waits longer
    give_up_crashes: int = 5  # give up after this many crashes ...
    give_up_window: float = 300.0  # ... within this many seconds
    max_restarts: int = 0  # 0: no limit on restarts in total
    jitter: float = 0.25  # each delay is stretched by up to this fraction, at random


@dataclass
class RestartPolicy:
    settings: RestartSettings
    clock: Callable[[], float] = time.monotonic
    rand: Callable[[], float] = random.random
    restarts: int = 0
    _crashes: deque[float] = field(default_factory=deque)

    def on_crash(self) -> float | None:
        """Record a crash; the delay before the next start, or None when it is time to give up."""
        s = self.settings
        now = self.clock()
        self._crashes.append(now)
        while self._crashes and now - self._crashes[0] > s.give_up_window:
            self._crashes.popleft()
        if len(self._crashes) >= s.give_up_crashes:
            return None
        if s.max_restarts and self.restarts >= s.max_restarts:
            return None
        # Crashes in a row (within the window) double the delay: 1, 2, 4 ... up to max_delay.
        base = min(s.max_delay, s.first_delay * 2.0 ** (len(self._crashes) - 1))
        self.restarts += 1
        return float(base * (1 + s.jitter * self.rand()))

    def why_given_up(self) -> str:
        s = self.settings
        if s.max_restarts and self.restarts >= s.max_restarts:
            return f"{self.restarts} restarts, the --max-restarts limit"
        return f"{len(self._crashes)} crashes within {s.give_up_window:g} s"


class RestartStep(Step):
    """tlrun worker --restart: a worker that exits abnormally starts again (guard, sweep, spawn, verify)
    after its policy's delay; the other units run on meanwhile. RestartGiveUpError ends the launcher."""

    name = "restart"

    def __init__(self, settings: RestartSettings) -> None:
        self.settings = settings
        self._policies: dict[str, RestartPolicy] = {}
        self._due: dict[str, tuple[float, WorkerUnit]] = {}

    def restarts(self, unit: Unit) -> int:
        policy = self._policies.get(unit.child)
        return policy.restarts if policy is not None else 0

    def on_exit(self, launcher: Launcher, unit: Unit, status: int, tail: tuple[str, ...]) -> bool:
        if not isinstance(unit, WorkerUnit) or status == 0:
            return False  # a clean exit of its own (a remote shutdown) is not a crash
        self.schedule(launcher, unit, f"{unit.label} exited with status {status}")
        return True

    def schedule(self, launcher: Launcher, unit: WorkerUnit, why: str) -> None:
        policy = self._policies.setdefault(unit.child, RestartPolicy(self.settings))
        delay = policy.on_crash()
        if delay is None:
            raise RestartGiveUpError(f"giving up on the {unit.label} after {policy.why_given_up()}")
        launcher.report(Notice(f"{why}: restart {policy.restarts} in {delay:.1f} s", "warning"))
        launcher.set_state(unit, STARTING)
        self._due[unit.child] = (time.monotonic() + delay, unit)

    def poll(self, launcher: Launcher) -> bool:
        now = time.monotonic()
        return any(due <= now for due, _unit in self._due.values())

    def act(self, launcher: Launcher) -> None:
        now = time.monotonic()
        for child, (due, unit) in list(self._due.items()):
            if due > now or launcher.sup.stop_requested:
                continue
            del self._due[child]
            try:
                launcher.restart_worker(unit)
            except (AppImportError, WorkerStartError) as exc:
                launcher.report(Notice(f"restart failed: {exc}", "warning"))
                self.schedule(launcher, unit, f"{unit.label} exited with status {WorkerStartError.exit_code}")
