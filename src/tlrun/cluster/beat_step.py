"""The beat unit under the cluster's lease: the beat process takes, renews and checks the lease itself
(fence.py); this step starts it warm, reads what it says about the lease, and starts a standby again when
a beat stops because it lost the lease. The launcher holds nothing: a paused launcher cannot make two
beats send."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from tlrun.cluster.backends import backend_for
from tlrun.cluster.fence import CONFIG_ENV, EXIT_LEASE_LOST
from tlrun.cluster.lease import lease_name
from tlrun.events import Notice
from tlrun.launch import brokerconf, guard
from tlrun.launch._child import HOOKS_ENV
from tlrun.launch.steps import Step
from tlrun.launch.units import READY, STANDBY

if TYPE_CHECKING:
    from tlrun.launch.launcher import Launcher
    from tlrun.launch.units import Unit

FENCE_MODULE = "tlrun.cluster.fence"


class LeaseStep(Step):
    """Beat under the lease: warm standby until its own process takes the lease."""

    name = "beat lease"

    def __init__(self) -> None:
        self.status_path: Path | None = None
        self._seen: tuple[float, int] | None = None  # the status file's (mtime, size) last read
        self.state: str | None = None  # held | standby | lost, as the beat last said
        self._message: str | None = None

    def started(self, launcher: Launcher) -> None:
        beat = launcher.beat
        if beat is None:
            return
        s = launcher.s
        name = lease_name(s.app, s.project_name)
        launcher.learn_broker()  # the lease's key and connection as the app's (a key prefix, TLS, Sentinel)
        try:
            backend_for(launcher.broker_url, name, s.beat_lock_ttl).close()
        except ValueError as exc:
            launcher.report(Notice(f"{exc}: beat runs without a cluster-wide lease", "warning"))
            launcher.start_beat()
            return
        self.status_path = guard.runtime_dir(os.environ) / f"{s.project_id}.beat-lease.{os.getpid()}.json"
        config = {
            "name": name,
            "ttl": s.beat_lock_ttl,
            "host": launcher.hostname,
            "status": str(self.status_path),
            "broker_options": brokerconf.options_for(launcher.broker_url)[0],
        }
        launcher.beat_env.update({HOOKS_ENV: FENCE_MODULE, CONFIG_ENV: json.dumps(config)})
        self._start(launcher, beat)

    def _start(self, launcher: Launcher, beat: Unit) -> None:
        self._forget()
        launcher.start_beat()
        launcher.set_state(beat, STANDBY, beat_pid=launcher.sup.pid(beat.child), beat_lease="standby")

    def _forget(self) -> None:
        if self.status_path is not None:
            self.status_path.unlink(missing_ok=True)
        self._seen, self.state = None, None

    def poll(self, launcher: Launcher) -> bool:
        beat = launcher.beat
        if beat is not None and launcher.sup.running(beat.child):
            self._read(launcher, beat)
        return False

    def _read(self, launcher: Launcher, beat: Unit) -> None:
        if self.status_path is None:
            return
        try:
            info = self.status_path.stat()
            if self._seen == (info.st_mtime, info.st_size):
                return
            self._seen = (info.st_mtime, info.st_size)
            said = json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return
        state, message = said.get("state"), said.get("message")
        if message and (state, message) != (self.state, self._message):
            launcher.report(Notice(str(message), "warning" if state == "lost" else "info"))
        self.state, self._message = state, message
        pid = launcher.sup.pid(beat.child)
        if state == "held" and beat.state != READY:
            launcher.set_state(beat, READY, beat_pid=pid, beat_lease="held")
        elif state in ("standby", "lost") and beat.state != STANDBY:
            launcher.set_state(beat, STANDBY, beat_pid=pid, beat_lease=state)

    def explains_exit(self, launcher: Launcher, unit: Unit, status: int) -> bool:
        return unit is launcher.beat and status == EXIT_LEASE_LOST and self.status_path is not None

    def on_exit(self, launcher: Launcher, unit: Unit, status: int, tail: tuple[str, ...]) -> bool:
        if not self.explains_exit(launcher, unit, status):
            return False
        self._read(launcher, unit)
        launcher.report(Notice("beat stopped: it lost the lease; a standby beat waits for it"))
        self._start(launcher, unit)
        return True

    def held(self) -> bool | None:
        return None if self.status_path is None else self.state == "held"

    def close(self, launcher: Launcher) -> None:
        self._forget()
