"""Steps: what a command adds to the launcher, attached from outside the launch core.

The launcher (launcher.py) runs units (units.py) through guard -> sweep -> spawn -> verify -> supervise and
knows nothing of reload, the beat lease, the consumption watch, metrics or restarts. Each of those is a
`Step` that a command composes onto it (tlrun/compose.py), the way Celery builds its worker from bootsteps:
a step is called at fixed points of the launcher's life and acts through the launcher's public methods.

Hooks, in the order they are first called (each does nothing unless a step overrides it):
- `validate`: before anything is stopped or started; raise a TlrunError to refuse the launch;
- `prepare`: the project's locks are held, nothing is swept yet (the private broker starts here);
- `on_start_failed`: the workers' first start failed (their app does not import): True when the step
  takes it (a reload waits for a good save); otherwise the launcher ends with that error;
- `started`: the units had their first start (a reload watcher, the beat lease, a consumption watch);
- `poll`: every turn of the supervise loop (about 20 a second): cheap, True when `act` has work;
- `act`: the loop's turn for this step (a reload, a stuck worker's restart);
- `on_exit`: a unit's process ended on its own (not asked to stop): True when the step took care of it
  (restarted it, or keeps it waiting for a good save); when no step does, the launcher ends;
- `on_child_exit`: a child that is no unit's ended (a reload's spare): True when it was the step's;
- `stopping`: the launcher begins its own stop (a signal): before its units are stopped;
- `close`: the launcher is done (its children are stopped); in reverse order of attachment.
- `observe`: every event the launcher reports (a verdict, a reload), after the reporter had it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tlrun.events import Event
    from tlrun.launch.launcher import Launcher
    from tlrun.launch.units import Unit


class Step:
    name = "step"

    def validate(self, launcher: Launcher) -> None:
        pass

    def prepare(self, launcher: Launcher) -> None:
        pass

    def on_start_failed(self, launcher: Launcher, error: Exception) -> bool:
        return False

    def started(self, launcher: Launcher) -> None:
        pass

    def poll(self, launcher: Launcher) -> bool:
        return False

    def act(self, launcher: Launcher) -> None:
        pass

    def claim(self, launcher: Launcher, node: str) -> bool:
        """May a worker start under this node name? False: another launcher claimed it (then it is renamed)."""
        return True

    def explains_exit(self, launcher: Launcher, unit: Unit, status: int) -> bool:
        """An exit the step expected and handles in on_exit (a beat that lost its lease): not reported as a
        unit that ended on its own."""
        return False

    def on_exit(self, launcher: Launcher, unit: Unit, status: int, tail: tuple[str, ...]) -> bool:
        return False

    def on_child_exit(self, launcher: Launcher, child: str, status: int) -> bool:
        return False

    def stopping(self, launcher: Launcher) -> None:
        pass

    def observe(self, launcher: Launcher, event: Event) -> None:
        pass

    def close(self, launcher: Launcher) -> None:
        pass
