"""Each launching command as a composition: the launch core's units plus the steps that command attaches.

The launch core (tlrun/launch/) imports none of dev/, ops/, cluster/ or deploy/; this module is where a
command picks its steps from them, so that `tlrun dev`, `tlrun worker` and `tlrun beat` share one launch
path and differ only here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tlrun.config import Settings
from tlrun.deploy.restart import RestartSettings
from tlrun.events import Reporter
from tlrun.launch.launcher import LaunchOptions, run
from tlrun.launch.steps import Step

if TYPE_CHECKING:
    from tlrun.cluster.beat_step import LeaseStep
    from tlrun.launch.early import EarlyStart


def worker(
    settings: Settings,
    report: Reporter,
    *,
    beat: bool = False,
    restart: RestartSettings | None = None,
    fast_stop: bool = False,
    init: bool = False,
    metrics_port: int | None = None,
    metrics_addr: str = "0.0.0.0",
    early: EarlyStart | None = None,
) -> int:
    """tlrun worker: every role (or --role's), beat only when asked; restarts, the consumption watch and
    metrics as steps."""
    from tlrun.cluster.names import NodeClaimStep
    from tlrun.deploy.restart import RestartStep
    from tlrun.deploy.swap import ReloadStep
    from tlrun.ops.hung import HungStep
    from tlrun.ops.memory import MemoryStep
    from tlrun.ops.steps import ConsumeStep, MetricsStep

    # New code without downtime: SIGHUP or `tlrun reload` starts each role's next generation beside the old.
    steps: list[Step] = [NodeClaimStep(), ReloadStep(overlap=True)]
    lease = _lease(steps) if beat else None
    restarter = RestartStep(restart) if restart is not None else None
    if restarter is not None:
        steps.append(restarter)
    consume = ConsumeStep(restarter, sample=metrics_port is not None)
    hung = HungStep(restarter, settings.hung_after, settings.consume_check_every)
    memory = MemoryStep()
    steps += [consume, hung, memory]
    if metrics_port is not None:
        steps.append(MetricsStep(metrics_port, metrics_addr, consume, restarter, lease, hung, memory))
    _systemd(steps)
    opts = LaunchOptions(beat=beat, fast_stop=fast_stop, init=init, hup_reloads=True)
    return run(settings, report, opts, steps, early=early)


def dev(
    settings: Settings,
    report: Reporter,
    *,
    beat: bool,
    reload: bool = False,
    managed_broker: bool = True,
    debug: bool = False,
    fast_stop: bool = True,
    early: EarlyStart | None = None,
    workers: bool = True,
) -> int:
    """tlrun dev: a private broker when none answers, reload, beat under its lease, or debug mode; the
    project's processes (and Flower) beside the workers, each a unit (dev/stack.py)."""
    from tlrun.cluster.names import NodeClaimStep
    from tlrun.dev.brokerd import PrivateBrokerStep
    from tlrun.events import Notice

    for note in settings.stack_notes:
        report(Notice(note))
    steps: list[Step] = [PrivateBrokerStep()] if managed_broker else []
    steps.append(NodeClaimStep())
    if beat:
        _lease(steps)
    processes = settings.processes
    if processes or settings.release is not None:
        from tlrun.dev.stack import StackStep  # http.client and the rest: only for a project with processes

        steps.append(StackStep(reload=reload))
    if debug:
        from tlrun.dev.debug import serve_in_process

        opts = LaunchOptions(beat=beat, processes=processes)
        return run(settings, report, opts, steps, in_process=serve_in_process)
    from tlrun.deploy.swap import ReloadStep

    watcher = None
    if reload:
        from tlrun.dev.reload import Watcher

        ignore: list[Path] = [settings.log_dir]
        watcher = Watcher(settings.project_root, ignore)
    steps.append(ReloadStep(watcher))  # on a save with --reload; `tlrun reload` always
    from tlrun.ops.hung import HungStep

    steps.append(HungStep(None, settings.hung_after, settings.consume_check_every))  # reported, never killed
    opts = LaunchOptions(workers=workers, beat=beat, fast_stop=fast_stop, held=True, dev_poll=True, processes=processes)
    return run(settings, report, opts, steps, early=early)


def beat(
    settings: Settings,
    report: Reporter,
    *,
    init: bool = False,
    metrics_port: int | None = None,
    metrics_addr: str = "0.0.0.0",
) -> int:
    """tlrun beat: beat alone, one per cluster through the lease; with a metrics endpoint when asked. SIGHUP
    and `tlrun reload` restart beat with the schedule now on disk (a supervisor's or systemd's reload)."""
    from tlrun.deploy.swap import ReloadStep
    from tlrun.ops.steps import ConsumeStep, MetricsStep

    steps: list[Step] = [ReloadStep()]
    lease = _lease(steps)
    if metrics_port is not None:
        consume = ConsumeStep(None, sample=True)  # no workers here: it watches nothing
        steps += [consume, MetricsStep(metrics_port, metrics_addr, consume, None, lease)]
    _systemd(steps)
    return run(settings, report, LaunchOptions(workers=False, beat=True, init=init, hup_reloads=True), steps)


def _systemd(steps: list[Step]) -> None:
    """Under systemd (a Type=notify unit sets $NOTIFY_SOCKET): READY, RELOADING, STOPPING, WATCHDOG."""
    import os

    if os.environ.get("NOTIFY_SOCKET"):
        from tlrun.deploy.systemd import SystemdStep

        steps.append(SystemdStep())


def _lease(steps: list[Step]) -> LeaseStep:
    from tlrun.cluster.beat_step import LeaseStep

    lease = LeaseStep()
    steps.append(lease)
    return lease
