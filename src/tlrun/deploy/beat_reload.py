"""Beat on a reload: `beat_schedule` is beat's code, so a reload starts beat again with the code on disk.

`tlrun beat` takes SIGHUP (systemd's ExecReload, supervisorctl signal HUP) and `tlrun reload` as exactly
that; a launcher that also runs workers restarts its beat with their reload (swap.py).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from tlrun.events import Reloading
from tlrun.launch.units import WAITING

if TYPE_CHECKING:
    from tlrun.launch.launcher import Launcher


def restart_beat(launcher: Launcher) -> bool:
    """Beat again with the code (its beat_schedule) now on disk. Holding the lease or a warm standby: the old
    beat saves its schedule and releases the lease on its way out, the new one takes it again unless a
    standby elsewhere took it first (then this one stands by: never two beats); the lease step reads its
    state. True when a beat was started."""
    beat = launcher.beat
    if beat is not None and launcher.sup.running(beat.child):
        launcher.stop_beat(beat.state)
    elif beat is None or beat.state != WAITING:
        return False
    launcher.start_beat()
    return True


def reload_beat_alone(launcher: Launcher, why: str, request: str) -> None:
    """A launcher that runs beat and no worker (`tlrun beat`): restart it, and answer a `tlrun reload`
    request in beat's lock record."""
    assert launcher.beat is not None
    launcher.report(Reloading(why or "a save"))
    began = time.monotonic()
    ok = restart_beat(launcher)
    pid = launcher.sup.pid(launcher.beat.child)
    message = f"beat (pid {pid}) started again in {time.monotonic() - began:.2f} s" if ok else "beat is not running"
    launcher.report(Reloading(why, done=True, ok=ok))
    if request:
        launcher.record(launcher.beat, reload={"id": request, "ok": ok, "message": message})
