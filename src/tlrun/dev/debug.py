"""Debug mode: the worker runs inside the tlrun process (solo pool), so a breakpoint in a task stops in the
IDE's debugger with no subprocess-following setting.

Guard and sweep have run already. Verification runs on a thread with a connection of its own (never the
worker's), and it only reports: a worker paused at a breakpoint does not answer pings, and nothing here
treats that as dead.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import TYPE_CHECKING

from tlrun.config import Settings, WorkerOptions
from tlrun.errors import BrokerError
from tlrun.events import Notice, Ready, Reporter
from tlrun.launch import procs, spawn, verify
from tlrun.launch.broker import Broker, load_app
from tlrun.launch.units import READY

if TYPE_CHECKING:
    from tlrun.launch.launcher import Launcher


def node_for_roles(hostname: str) -> str:
    """With several roles, the one in-process worker serves them all under its own name."""
    return spawn.node_name(DEBUG_PREFIX, spawn.node_token(), hostname)


DEBUG_PREFIX = "debug"


def debug_options(settings: Settings) -> WorkerOptions:
    """The first role's options, consuming every role's queues: one process, so that a breakpoint in any
    task stops in the debugger."""
    options = settings.roles[0].worker
    if len(settings.roles) == 1:
        return options
    queues: list[str] = []
    for role in settings.roles:
        queues += [q for q in sorted(role.queue_set or {procs.DEFAULT_QUEUE}) if q not in queues]
    return dataclasses.replace(options, queues=",".join(queues))


def worker_args(settings: Settings, node: str) -> list[str]:
    """The `celery worker` arguments for the in-process worker: solo pool, our node name, extras last."""
    argv = spawn.worker_argv(settings.app, debug_options(settings), node)
    args = argv[argv.index("worker") :]
    if "--pool" in args:  # only the solo pool runs tasks in this very process
        i = args.index("--pool")
        del args[i : i + 2]
    return [*args, "--pool", "solo"]


def _verify_in_background(settings: Settings, node: str, url: str, report: Reporter, started: float) -> None:
    census: verify.Census[list[str]] = verify.Census(url, settings.ping_window).start()
    try:
        with Broker(url) as broker:
            deadline = time.monotonic() + settings.ready_timeout
            answered = verify.wait_ready(broker, node, deadline, lambda: True, lambda: False)
        if not answered:
            report(
                Notice(
                    f"{node} has not answered a ping within {settings.ready_timeout:g} s (paused in the "
                    "debugger? tlrun leaves it alone)",
                    "warning",
                )
            )
            return
        replies = census.result()
        report(
            Ready(
                verify.build_report(
                    [
                        verify.ReadyNode(
                            settings.roles[0].name if len(settings.roles) == 1 else DEBUG_PREFIX, node, os.getpid()
                        )
                    ],
                    time.monotonic() - started,
                    replies,
                    settings.expected_workers,
                    {},
                )
            )
        )
    except BrokerError as exc:
        report(Notice(f"verification skipped: {exc}", "warning"))


def run_in_process(settings: Settings, report: Reporter, node: str, broker_url: str) -> int:
    started = time.monotonic()
    # The same environment a spawned worker gets: markers for the sweep and the nested-launch guard.
    role = settings.roles[0].name if len(settings.roles) == 1 else None
    os.environ.update(spawn.worker_env(settings, node, procs.Identity.of_self(), broker_url, role))
    app = load_app(settings)
    from tlrun.launch import _celery_fix, brokerconf

    brokerconf.register(broker_url, brokerconf.options_from_conf(app.conf), "app")

    # The remote-control commands a spawned worker's shim registers: ps, doctor and health ask them.
    _celery_fix.register_ping()
    _celery_fix.register_active()
    serving = "" if role else f", serving roles {', '.join(r.name for r in settings.roles)}"
    report(Notice(f"debug mode: worker {node} runs in this process (pid {os.getpid()}, solo pool{serving})"))
    threading.Thread(
        target=_verify_in_background,
        args=(settings, node, broker_url, report, started),
        name="tlrun-verify",
        daemon=True,
    ).start()
    try:
        app.worker_main(argv=worker_args(settings, node))
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


def serve_in_process(launcher: Launcher) -> int:
    """The launcher's guard and sweep have run: serve every role in this very process. Each role's lock
    record names this process and its node, so that ps, health and doctor count it as serving that role.
    Beat and the stack's processes stay supervised children, looked after by a companion thread while the
    worker has the main thread (a breakpoint pauses only that thread)."""
    workers = launcher.workers
    node = workers[0].node if len(workers) == 1 else node_for_roles(launcher.hostname)
    for w in workers:
        launcher.set_state(w, READY, node=node, worker_pid=os.getpid(), in_process=True)
    done = threading.Event()
    companion = threading.Thread(target=_look_after, args=(launcher, done), name="tlrun-units", daemon=True)
    companion.start()
    try:
        return run_in_process(launcher.s, launcher.report, node, launcher.broker_url)
    finally:
        done.set()
        companion.join(COMPANION_JOIN)


COMPANION_TURN = 0.1
COMPANION_JOIN = 5.0


def _look_after(launcher: Launcher, done: threading.Event) -> None:
    """The launcher's loop for the units beside the in-process worker: their steps (the beat lease's state,
    the processes' readiness and restarts) and their exits. The main thread touches none of this until the
    worker returns, and then waits for this thread before the launcher closes."""
    turned = time.monotonic()

    def wake() -> bool:
        return done.is_set() or time.monotonic() - turned >= COMPANION_TURN

    while not done.is_set():
        got = launcher.sup.wait(interrupt=wake)
        if got is not None:
            launcher.child_exited(*got)
            continue
        turned = time.monotonic()
        if not done.is_set():
            launcher.turn()
