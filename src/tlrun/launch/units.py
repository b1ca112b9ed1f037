"""Units: every process a launcher runs, each with one life cycle of its own.

A unit is one role's worker, or beat. It owns its lock (one per role, one for beat), its node name, its
log file, its state and what follows its stop; it knows nothing of the other units. The launcher starts,
verifies and stops units; steps (steps.py) decide what else happens to them (a reload, a restart).

States, as `tlrun ps` and `tlrun health` show them (the unit's lock record carries it):
starting -> ready -> stopping -> gone; a reload's `waiting for a good save` (its process exited and the next
good save starts it again); beat's `standing by` (another host holds the cluster's beat lease).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from tlrun.config import ENV_BROKER, ENV_GUARD, ENV_MARKER, Role
from tlrun.events import Spawned
from tlrun.launch import early, guard, procs, spawn
from tlrun.launch._child import GROUP_ENV, LOG_ENV
from tlrun.launch.hold import Hold
from tlrun.launch.procs import ENV_PROCESS
from tlrun.project.processes import ProcessSpec

if TYPE_CHECKING:
    from tlrun.launch.launcher import Launcher
    from tlrun.launch.startup import Startup

STARTING = "starting"
READY = "ready"
WAITING = "waiting for a good save"
STOPPING = "stopping"
STANDBY = "standing by"
GONE = "gone"

BANNER = " -------------- "  # the first line of a worker's start-up banner: it imported the app


BACKOFF = "restarting"  # a stack's process that crashed, waiting for its next start
NO_PROCESS = (GONE, WAITING, STANDBY, BACKOFF)  # a unit in these states has no process of its own


class Unit:
    kind = "unit"
    pid_field = "worker_pid"  # where its lock record names its process

    def __init__(self, child: str, lock_kind: str, label: str, node: str) -> None:
        self.child = child  # its name in the Supervisor
        self.lock_kind = lock_kind
        self.label = label  # `worker`, `worker of role reports`, `beat`
        self.node = node  # the node name, or "beat"
        self.state = STARTING
        self.announce_exit = False  # say "stopped" when its process is gone (a stop, not a reload's swap)
        self.after_stop: Callable[[Unit], None] | None = None  # what follows once its process is gone
        self.stop_began: float | None = None
        self.since = ""  # when the running process became ready (for "the worker of 10:42:07")
        # For the metrics endpoint:
        self.last_exit_code: int | None = None
        self.ready_seconds: float | None = None
        self.stop_seconds: float | None = None

    @property
    def alive(self) -> bool:
        """Still this launcher's business: running, starting, or waiting to run again."""
        return self.state != GONE


class WorkerUnit(Unit):
    """One role's worker: `<prefix><launcher pid>@host`, consuming the role's queues."""

    kind = "worker"

    def __init__(self, role: Role, hostname: str) -> None:
        token = spawn.node_token()
        super().__init__(
            f"worker:{role.name}",
            role.lock_kind,
            f"worker of role {role.name}" if role.declared else "worker",
            spawn.node_name(role.node_prefix, token, hostname),
        )
        self.role = role
        self.hostname = hostname
        self.token = token
        self.generation = 1  # a reload without downtime starts generation 2 beside it: `api4242-2@host`
        self.next_node: str | None = None  # the node name of a successor that runs beside it (a reload)
        self.next_heartbeat = ""  # that successor's liveness file, recorded once it takes over
        self.heartbeat = ""  # its worker's liveness file (heartbeat.py): also the tasks its main process runs
        self.renamed_from: str | None = None
        self.poll_interval: float | None = None  # its transport's poll interval on Redis, when known
        self.paused_at: float | None = None  # when it was seen consuming nothing, paused for a swap (unitstop.py)
        self.hold: Hold | None = None  # the hold of its last spawn (an adopted early worker brings its own)

    def rename(self, taken: set[str]) -> str:
        """Come back under a name nobody answers to: `api4242-1@host`."""
        self.renamed_from = self.node
        self.node = spawn.unique_node_name(self.role.node_prefix, self.token, self.hostname, taken)
        return self.node

    def generation_node(self, generation: int) -> str:
        """The node name of generation `generation` (2 and up) of this role's worker: `api4242-2@host`."""
        return spawn.node_name(self.role.node_prefix, self.token, self.hostname, generation)

    def spawn(
        self,
        launcher: Startup,
        name: str | None = None,
        hold: Hold | None = None,
        announce: bool = True,
        node: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start this role's worker as child `name` (default: the unit's own), or adopt the one the early
        start already runs held (early.py). With a hold it imports the new code and waits to be released
        (entry.py); its output is held until its banner shows. `node`: a successor's own node name, to run
        beside the unit's worker (a reload without downtime); the unit's record changes only when it takes over."""
        name = name or self.child
        s = launcher.s
        successor = node is not None and node != self.node
        node = node or self.node

        def plan(with_hold: Hold | None) -> early.Plan:
            return early.plan_worker(
                s,
                self.role,
                node,
                launcher.broker_url,
                guard.runtime_dir(os.environ),
                launcher.outputs.log_dir,
                with_hold,
                launcher.opts.dev_poll,
            )

        adopted = None
        if launcher.early is not None and name == self.child and hold is not None and not successor:
            adopted = launcher.early.take(self.role.name, node, launcher.broker_url, plan)
        if adopted is not None:
            if hold is not None:
                hold.close()  # the early worker has its own
            hold = adopted.hold
            chosen = adopted.plan
            child = launcher.sup.adopt(name, adopted.popen, requeue=True)
        else:
            chosen = plan(hold)
            fds = (hold.child_fd,) if hold is not None else ()
            child = launcher.sup.start(name, chosen.argv, chosen.env, s.project_root, pass_fds=fds, requeue=True)
            if hold is not None:
                hold.spawned()
        if successor:
            self.next_heartbeat = chosen.heartbeat
        else:
            self.hold = hold
            self.heartbeat = chosen.heartbeat
            launcher.record(self, heartbeat=chosen.heartbeat)
        own_log = LOG_ENV in chosen.env  # the worker writes its log itself (relay.py)
        log_path = launcher.outputs.attach(name, child, chosen.stem, label=node, hold_until=BANNER, own_log=own_log)
        if announce:
            launcher.report(Spawned("worker", node, child.pid, log_path, tuple(chosen.argv)))
        return child


class BeatUnit(Unit):
    """Celery beat, one per project (and, with the lease, one per cluster)."""

    kind = "beat"
    pid_field = "beat_pid"

    def __init__(self) -> None:
        super().__init__("beat", "beat", "beat", "beat")

    def spawn(self, launcher: Launcher) -> subprocess.Popen[bytes]:
        s = launcher.s
        argv = spawn.beat_argv(s.app, launcher.beat_schedule_path(), s.roles[0].worker.loglevel)
        env = spawn.worker_env(s, "beat", procs.Identity.of_self(), launcher.broker_url)
        env.update(launcher.beat_env)  # what a step runs inside beat (the lease's fence)
        stem = f"celery_beat_{os.getpid()}"
        env.update(launcher.outputs.child_env(stem))
        child = launcher.sup.start(self.child, argv, env, s.project_root)
        log_path = launcher.outputs.attach(self.child, child, stem, own_log=LOG_ENV in env)
        launcher.report(Spawned("beat", "beat", child.pid, log_path, tuple(argv)))
        return child


class ProcessUnit(Unit):
    """One process of the development stack (a web server, a frontend watcher, Flower): in its own session and
    process group behind a watchdog that stops the whole group with its stop signal (`_watchdog.run_group`),
    marked with the project and its name so that a stray one is found by ps, doctor and the sweep."""

    pid_field = "process_pid"

    def __init__(self, spec: ProcessSpec) -> None:
        super().__init__(f"process:{spec.name}", f"process-{spec.name}", f"{spec.kind} {spec.name}", spec.name)
        self.spec = spec
        self.kind = spec.kind
        self.port = spec.port  # "auto": picked by the launcher before the first start, then kept
        self.output_ready = threading.Event()  # its output matched `ready` (set on the output thread)
        self.starts = 0  # each start's number: a readiness check of an earlier start is stale
        self.started_at = 0.0

    @property
    def url(self) -> str | None:
        return f"http://127.0.0.1:{self.port}" if self.port is not None else None

    def environment(self, launcher: Startup) -> dict[str, str]:
        s = launcher.s
        env = dict(s.environ)
        for key in spawn.NOTIFY_ENV:
            env.pop(key, None)
        env.update(self.spec.env)
        if self.port is not None:
            env["PORT"] = str(self.port)
        if launcher.broker_url:  # the web app sends its tasks where the workers listen (dev's private broker)
            env[ENV_BROKER] = launcher.broker_url
        env[ENV_MARKER] = s.project_id
        env[ENV_GUARD] = procs.Identity.of_self().encode()
        env[ENV_PROCESS] = self.spec.name
        env[GROUP_ENV] = self.spec.stop_signal
        env["PYTHONUNBUFFERED"] = "1"
        env["PATH"] = spawn.project_path(env.get("PATH"))
        if spawn.environment_bin() is not None:
            env["VIRTUAL_ENV"] = sys.prefix  # as an activation sets it (tools that run `python` look at it)
        pythonpath = s.pythonpath(env.get("PYTHONPATH"))
        if pythonpath:
            env["PYTHONPATH"] = pythonpath
        return env

    def spawn(self, launcher: Startup) -> subprocess.Popen[bytes]:
        s = launcher.s
        argv = self.spec.command(self.port)
        cwd = s.project_root / self.spec.cwd if self.spec.cwd else s.project_root
        self.output_ready.clear()
        self.starts += 1
        stem = f"proc_{self.spec.name}_{os.getpid()}"
        env = {**self.environment(launcher), **launcher.outputs.child_env(stem)}  # its watchdog writes the log
        child = launcher.sup.start(self.child, argv, env, cwd, grace=self.spec.grace)
        pattern = self.spec.ready_pattern
        observe = None
        if pattern is not None:
            matcher = re.compile(pattern)

            def observe(lines: list[str]) -> None:
                if not self.output_ready.is_set() and any(matcher.search(line) for line in lines):
                    self.output_ready.set()

        own_log = LOG_ENV in env
        log_path = launcher.outputs.attach(
            self.child, child, stem, label=self.spec.name, observe=observe, own_log=own_log
        )
        launcher.report(Spawned(self.kind, self.spec.name, child.pid, log_path, tuple(argv)))
        return child
