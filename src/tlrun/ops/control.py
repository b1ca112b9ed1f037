"""Everyday controls: stop this project's processes, probe a node's health, apply doctor's fixes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

from tlrun.config import Settings
from tlrun.errors import BrokerError, TlrunError
from tlrun.launch import guard, launchers, procs, signals, sweep, unitstop
from tlrun.launch.broker import Broker, broker_for_command
from tlrun.launch.units import WAITING
from tlrun.ops import inventory


@dataclass(frozen=True)
class UnitStopped:
    launcher: int  # the launcher that stopped it and runs on
    kind: str  # the lock kind: worker-ROLE, worker, beat
    node: str


@dataclass(frozen=True)
class StopReport:
    launchers: tuple[int, ...]  # tlrun launchers asked to stop (they stop their own children)
    strays: tuple[sweep.Stray, ...]
    stopped: tuple[int, ...]
    killed: tuple[int, ...]
    survivors: tuple[int, ...]
    units: tuple[UnitStopped, ...] = ()  # units stopped inside a launcher that runs others too (stop --role)


def project_launchers(settings: Settings) -> list[psutil.Process]:
    """Live tlrun launchers of this project: lock holders, launchers named by the project's processes, and
    launchers running in the project's directory (one still starting has no lock record yet)."""
    identities: set[procs.Identity] = set()
    kinds = [r.lock_kind for r in settings.roles] + ([] if settings.role_filter else ["beat"])
    # Launchers that started before the project's directory was renamed or moved hold the old lock names.
    identities.update(
        h for _kind, h, _path in guard.moved_holders(settings.project_root, settings.app, settings.project_id, kinds)
    )
    for kind in kinds:
        try:
            holder = guard.holder_identity(guard.read_record(guard.lock_path(settings.project_id, kind)))
        except TlrunError:  # an unsafe lock directory: no record to trust
            holder = None
        if holder is not None:
            identities.add(holder)
    uid = os.getuid()
    for proc in procs.scan(("worker", "beat")):
        if (
            proc.launcher
            and procs.project_match(proc, settings.project_id, settings.app, settings.project_root, uid)
            and procs.serves_roles(proc, settings.role_filter)
        ):
            named = procs.Identity.decode(proc.launcher)
            if named is not None:
                identities.add(named)
    roles = None if settings.role_filter is None else [r.name for r in settings.roles]
    running = launchers.find_launchers(settings.project_root)
    identities.update(
        launcher.identity
        for launcher in guard.competing_launchers(running, settings.app, roles, roles is None, settings.beat)
    )
    found = {p.pid: p for p in map(signals.launcher_for, identities) if p is not None}
    return list(found.values())


def stop_project(settings: Settings, timeout: float) -> StopReport:
    """Launchers first (SIGTERM: each stops its children warm; after `timeout` the ladder kills the rest of
    its tree), then the strays, with the same ladder. With --role, a launcher that also runs other units
    stops only the role's unit (unitstop.py) and runs on. From inside a task: refused (it would stop the
    worker that runs it, or see nothing and say so)."""
    guard.check_env_guard(os.environ, "stop from inside a task")
    launchers = project_launchers(settings)
    units: list[UnitStopped] = []
    late: list[int] = []
    if settings.role_filter is not None:
        launchers, partial = _split_launchers(settings, launchers)
        for proc, kinds in partial:
            done = _stop_units(settings, proc, kinds, timeout + signals.KILL_WAIT + 5)
            units += done
            if len(done) < len(kinds):
                late.append(proc.pid)
    first = signals.stop_ladder(launchers, timeout) if launchers else signals.StopResult((), (), ())
    swept = sweep_project(settings, timeout)
    return StopReport(
        launchers=tuple(p.pid for p in launchers),
        strays=swept.found,
        stopped=first.stopped + swept.stopped,
        killed=first.killed + swept.killed,
        survivors=first.survivors + swept.survivors + tuple(late),
        units=tuple(units),
    )


def _split_launchers(
    settings: Settings, launchers: list[psutil.Process]
) -> tuple[list[psutil.Process], list[tuple[psutil.Process, dict[str, str]]]]:
    """(launchers to stop whole, [(launcher, {lock kind: node} to stop inside it)]): a launcher whose lock
    records show units beyond the roles asked for, and that listens for unit stops, keeps those units."""
    wanted = {r.lock_kind for r in settings.roles}
    # The stack's processes are units too: a launcher that runs one beside the role keeps running it.
    every = [r.lock_kind for r in settings.all_roles] + ["beat", "process-flower"]
    every += [f"process-{p.name}" for p in settings.processes]
    held: dict[int, dict[str, dict[str, Any]]] = {}
    for kind, record, holder in guard.live_records(settings.project_id, every):
        held.setdefault(holder.pid, {})[kind] = record
    whole, partial = [], []
    for proc in launchers:
        records = held.get(proc.pid, {})
        mine = {k: str(r.get("node") or k) for k, r in records.items() if k in wanted}
        others = set(records) - wanted
        if records and not mine:
            continue  # it runs other units only (it gave ours up, or never ran them)
        if mine and others and all(unitstop.listens(r) for r in records.values()):
            partial.append((proc, mine))
        else:
            whole.append(proc)
    return whole, partial


def _stop_units(settings: Settings, proc: psutil.Process, kinds: dict[str, str], wait: float) -> list[UnitStopped]:
    """Ask `proc` to stop the units holding `kinds`; wait until it let go of their locks (it does once each
    unit's process is gone). The units stopped in time."""
    role_of = {r.lock_kind: r.name for r in settings.all_roles}
    if not unitstop.ask(proc, settings.project_id, [role_of.get(k, k) for k in kinds]):
        return []
    deadline = time.monotonic() + wait
    left = dict(kinds)
    while left and time.monotonic() < deadline:
        live = {
            kind for kind, _r, holder in guard.live_records(settings.project_id, list(left)) if holder.pid == proc.pid
        }
        for kind in [k for k in left if k not in live]:
            del left[kind]
        if left:
            time.sleep(0.05)
    return [UnitStopped(proc.pid, kind, node) for kind, node in kinds.items() if kind not in left]


def sweep_project(
    settings: Settings,
    timeout: float | None = None,
    dry_run: bool = False,
    on_found: Callable[[sweep.Stray], None] | None = None,
) -> sweep.SweepResult:
    """The project's strays (workers and beats no live launcher owns) of every role, or of --role: tlrun
    sweep, doctor --fix and the second half of stop. Launchers are left alone."""
    return sweep.sweep(
        settings.project_id,
        settings.app,
        settings.project_root,
        settings.stop_grace if timeout is None else timeout,
        kinds=("worker", "beat", procs.LEFTOVER),
        roles=settings.role_filter,
        dry_run=dry_run,
        on_found=on_found,
    )


@dataclass(frozen=True)
class Health:
    node: str
    state: str  # "alive" | "not_consuming" | "hung" | "unknown" | "waiting" | "dead"
    detail: str
    attempts: int
    seconds: float


def default_nodes(settings: Settings) -> list[tuple[str, str | None]]:
    """(role, node) of each role's tlrun worker on this host, from the role's lock record; node None when no
    live launcher of that role runs here."""
    nodes: list[tuple[str, str | None]] = []
    for role in settings.roles:
        record = guard.read_record(guard.lock_path(settings.project_id, role.lock_kind))
        holder = guard.holder_identity(record)
        alive = record and holder is not None and holder.is_alive() and record.get("node")
        nodes.append((role.name, str(record["node"]) if alive and record else None))
    return nodes


def probe(settings: Settings, node: str, timeout: float, retries: int) -> Health:
    started = time.monotonic()
    url, _ = broker_for_command(settings)
    attempts = 0
    # The probe's own deadline bounds the connection too: a hung broker must not hold a probe for 5 s.
    with Broker(url, connect_timeout=timeout, socket_timeout=timeout) as broker:
        for attempts in range(1, retries + 2):
            try:
                if node in broker.ping(destination=[node], timeout=timeout):
                    stuck = _not_consuming(settings, broker, node)
                    if stuck is not None:
                        return Health(node, "not_consuming", stuck, attempts, time.monotonic() - started)
                    hung = _hung(settings, broker, node)
                    if hung is not None:
                        return Health(node, "hung", hung, attempts, time.monotonic() - started)
                    return Health(node, "alive", "answered a ping", attempts, time.monotonic() - started)
            except BrokerError as exc:
                return Health(node, "unreachable", f"broker unreachable: {exc}", attempts, time.monotonic() - started)
    # No answer. A local process with that name may be stopped or busy (a solo pool running a task, a
    # debugger): that is not the same as dead. A debug-mode worker is its launcher itself.
    for row in inventory.held_units(settings):
        if row.node == node and row.state == WAITING:
            return Health(
                node,
                "waiting",
                f"its launcher pid {row.pid} waits for a good save (the last one does not import): no worker runs",
                attempts,
                time.monotonic() - started,
            )
    for row in inventory.in_process_workers(settings):
        if row.node == node:
            return Health(
                node,
                "unknown",
                f"pid {row.pid} (tlrun dev --debug: the worker runs in the launcher) exists here but did not "
                "answer: busy with a task or paused in the debugger",
                attempts,
                time.monotonic() - started,
            )
    hung = _hung_here(settings, node)  # a busy solo worker cannot answer: its heartbeat file names the task
    if hung is not None:
        return Health(node, "hung", hung, attempts, time.monotonic() - started)
    for proc in procs.scan(("worker",)):
        if proc.node == node:
            try:
                state = psutil.Process(proc.pid).status()
            except psutil.Error:
                continue
            why = "stopped (SIGSTOP)" if state == psutil.STATUS_STOPPED else f"{state}, busy or not ready"
            return Health(
                node,
                "unknown",
                f"pid {proc.pid} exists here but did not answer: {why}",
                attempts,
                time.monotonic() - started,
            )
    return Health(
        node,
        "dead",
        f"no answer in {attempts} attempt(s) and no such process here",
        attempts,
        time.monotonic() - started,
    )


def _hung(settings: Settings, broker: Broker, node: str) -> str | None:
    """HUNG_TASK of `node`: a task past its hard time limit (or hung_after), live or as its launcher recorded."""
    from tlrun.ops import hung

    found = [h for h in hung.recorded(settings) if h.node == node]
    try:
        found += hung.ask(broker, [node], settings.hung_after).get(node, [])
    except BrokerError:
        pass
    return f"HUNG_TASK: {found[0].message()}" if found else None


def _hung_here(settings: Settings, node: str) -> str | None:
    """HUNG_TASK of `node` from this host alone: its launcher's record, and its heartbeat file."""
    from tlrun.ops import hung

    found = [h for h in hung.recorded(settings) if h.node == node]
    for role in settings.roles:
        record = guard.read_record(guard.lock_path(settings.project_id, role.lock_kind)) or {}
        if record.get("node") == node:
            found += hung.from_heartbeat(node, record.get("heartbeat"), settings.hung_after)
    return f"HUNG_TASK: {found[0].message()}" if found else None


def _not_consuming(settings: Settings, broker: Broker, node: str) -> str | None:
    """A pong is not enough (celery#10205): does the node consume its role's queues? What it does not, else None.
    The launcher's own finding (its longer history) counts too."""
    from tlrun.ops import consuming

    for nc in consuming.recorded(settings):
        if nc.node == node:
            return nc.message()
    role = next((r for r in settings.all_roles if r.owns_node(node)), None)
    if role is None:
        return None
    found = consuming.check(broker, node, consuming.wanted_queues(role.queue_set), time.time())
    return found[0].message() if found else None


def shutdown_remote(settings: Settings, nodes: list[str]) -> None:
    """Ask nodes on other hosts to shut down (warm), through the broker. Only on explicit request."""
    with Broker(broker_for_command(settings)[0]) as broker:
        broker.shutdown_nodes(nodes)
