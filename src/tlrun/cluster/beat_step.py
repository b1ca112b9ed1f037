"""The beat unit under the cluster's lease (lease.py): beat runs only while this launcher holds it."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from tlrun.cluster.lease import BeatLease, Holder, backend_for, lease_name
from tlrun.events import Notice
from tlrun.launch.steps import Step
from tlrun.launch.units import STANDBY

if TYPE_CHECKING:
    from tlrun.launch.launcher import Launcher


class LeaseStep(Step):
    """Take the lease and start beat, or stand by; renew it every turn of the loop that it is due."""

    name = "beat lease"

    def __init__(self) -> None:
        self.lease: BeatLease | None = None

    def started(self, launcher: Launcher) -> None:
        if launcher.beat is None:
            return
        s = launcher.s
        try:
            backend = backend_for(launcher.broker_url, lease_name(s.app, s.project_name), s.beat_lock_ttl)
        except ValueError as exc:
            launcher.report(Notice(f"{exc}: beat runs without a cluster-wide lease", "warning"))
            launcher.start_beat()
            return
        self.lease = BeatLease(backend, Holder.new(os.getpid(), launcher.hostname), s.beat_lock_ttl)
        self._tick(launcher)

    def poll(self, launcher: Launcher) -> bool:
        self._tick(launcher)  # cheap: the lease calls the broker only when a renewal or a retry is due
        return False

    def _tick(self, launcher: Launcher) -> None:
        beat = launcher.beat
        if self.lease is None or beat is None or not beat.alive or launcher.sup.stop_requested:
            return
        change = self.lease.tick(time.monotonic())
        if change.message:
            launcher.report(Notice(change.message, "warning" if change.action == "stop" else "info"))
        if change.action == "start":
            launcher.record(beat, beat_lease="held")
            launcher.start_beat()
        elif change.action == "stop":
            launcher.record(beat, beat_lease="lost")
            launcher.stop_beat(STANDBY, grace=self.lease.margin / 2)
        elif change.action == "standby" and beat.state != STANDBY:
            launcher.set_state(beat, STANDBY, beat_lease="standby")

    def held(self) -> bool | None:
        return self.lease.held if self.lease is not None else None

    def close(self, launcher: Launcher) -> None:
        if self.lease is not None:
            self.lease.release()
