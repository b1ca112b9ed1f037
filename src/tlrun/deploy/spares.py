"""tlrun dev --reload's spares: one held worker per role with Celery and the role's base (launch/base.py:
what its last worker imported from outside the project) imported before the next save, told at the save to
import the app. A spare is named `<unit>+spare` until a reload takes it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tlrun.events import Notice
from tlrun.launch.hold import Hold

if TYPE_CHECKING:
    from tlrun.launch.launcher import Launcher
    from tlrun.launch.units import WorkerUnit


class Spares:
    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.table: dict[str, tuple[str, Hold]] = {}  # unit child -> spare child, hold
        self.base = True  # spares import their role's base until one is impure

    def spawn(self, launcher: Launcher) -> None:
        """A spare for every live role that has none."""
        if launcher.sup.stop_requested or not self.keep:
            return
        for w in launcher.workers:
            if w.alive and w.child not in self.table:
                name, hold = f"{w.child}+spare", Hold(spare=True, base=self.base)
                w.spawn(launcher, name, hold, announce=False)
                self.table[w.child] = (name, hold)

    def orphaned(self, launcher: Launcher) -> list[str]:
        """Spares whose role's worker is gone (`tlrun stop ROLE`): nothing will take them."""
        alive = {w.child for w in launcher.workers if w.alive}
        return [owner for owner in self.table if owner not in alive]

    def prune(self, launcher: Launcher) -> None:
        for owner in self.orphaned(launcher):
            name, hold = self.table.pop(owner)
            hold.close()
            launcher.end_child(name)

    def take(self, launcher: Launcher, w: WorkerUnit, name: str) -> Hold | None:
        """The role's spare, told to import the app now and renamed `name`; None when there is none alive."""
        spare = self.table.pop(w.child, None)
        if spare is None:
            return None
        spare_name, hold = spare
        if launcher.sup.running(spare_name) and hold.load():
            launcher.sup.rename(spare_name, name)
            launcher.outputs.rename(spare_name, name)
            return hold
        hold.close()
        launcher.end_child(spare_name)
        return None

    def unusable(self, launcher: Launcher, spare: str, why: str) -> None:
        """A spare found its base stale (a `pip install`: the fresh worker that replaces it, and the spares
        after it, import the new versions) or impure (said once; spares import Celery only from now on)."""
        launcher.end_child(spare, settle=1.0)
        if why == "stale":
            launcher.report(Notice("reload: installed packages changed: a fresh worker imports them"))
        elif self.base:
            self.base = False
            launcher.report(
                Notice(
                    f"reload: spares pre-import Celery only from now on: importing {why.removeprefix('impure ')} "
                    "needs the project (a base of installed modules would not see its next save)",
                    "warning",
                )
            )
