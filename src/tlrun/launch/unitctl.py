"""One unit at a time, in the launch core: a stack's process started (its port, its spawn, its record), and
`tlrun restart NAME` served (a request file of kind `restart`, unitstop.py), for any unit of the launcher:

- a worker role that runs gets the reload path (its new worker beside the old one; deploy/swap.py answers);
- a process that runs gets its stop ladder, then a fresh start;
- a unit stopped earlier (`tlrun stop NAME`) takes its lock again and starts as at the launch.

The answer goes into every lock record the launcher holds (`restart`: id, name, ok, message), where the
asking `tlrun restart` reads it.
"""

from __future__ import annotations

import contextlib
import socket
import time
from typing import TYPE_CHECKING, Any

from tlrun.errors import TlrunError
from tlrun.events import Notice
from tlrun.launch.units import GONE, STARTING, ProcessUnit, Unit, WorkerUnit

if TYPE_CHECKING:
    from tlrun.launch.launcher import Launcher


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the kernel's choice); a process keeps it across its restarts."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Nothing listens on the port (a listener on 0.0.0.0 holds it on 127.0.0.1 too). With SO_REUSEADDR, as
    every server binds: connections of the last run in TIME_WAIT do not count (they make a plain bind fail for
    a minute, though the server itself would listen)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def start_process(launcher: Launcher, unit: ProcessUnit) -> bool:
    """Start (or start again) one of the stack's processes; its readiness is a step's business (dev/stack.py).
    False when it could not be started (its folder removed since the launch): said, and the unit is gone."""
    if unit.spec.auto_port and unit.port is None:
        unit.port = free_port()
    elif unit.port is not None and unit.starts == 0 and not port_free(unit.port):
        launcher.report(
            Notice(
                f"port {unit.port} of {unit.label} is already in use on this host (not by this project's units: "
                "they were swept): it will likely fail to listen",
                "warning",
            )
        )
    unit.state = STARTING
    try:
        child = unit.spawn(launcher)
    except OSError as exc:
        launcher.set_state(unit, GONE)
        launcher.report(Notice(f"{unit.label} could not start: {exc.strerror or exc}", "warning"))
        return False
    unit.started_at = time.monotonic()
    launcher.set_state(unit, STARTING, process_pid=child.pid, port=unit.port, url=unit.url, since=None)
    return True


def find(launcher: Launcher, name: str) -> Unit | None:
    """The unit `tlrun stop/restart NAME` means: a process, a role (by name or node name), beat."""
    for unit in launcher.units:
        if unit.node == name or (isinstance(unit, WorkerUnit) and unit.role.name == name):
            return unit
        if unit.kind == "beat" and name == "beat":
            return unit
    return None


def answer(launcher: Launcher, request: str, name: str, ok: bool, message: str) -> None:
    launcher.locks.record_all(restart={"id": request, "name": name, "ok": ok, "message": message})
    launcher.report(Notice(f"restart {name}: {message}", "info" if ok else "warning"))


def serve_restarts(launcher: Launcher) -> None:
    """Every `tlrun restart` request read since the last turn."""
    while launcher.unit_stops.restarts:
        request = launcher.unit_stops.restarts.pop(0)
        rid = str(request.get("id") or "")
        names = request.get("units")
        for name in names if isinstance(names, list) else []:
            unit = find(launcher, str(name))
            if unit is not None:
                restart(launcher, unit, str(name), rid)


def restart(launcher: Launcher, unit: Unit, name: str, rid: str) -> None:
    if isinstance(unit, WorkerUnit) and unit.alive:
        # The reload path: the new worker imports the code beside the running one; the reload step answers.
        launcher.unit_stops.reloads.append({"id": rid, "roles": [unit.role.name], "why": "tlrun restart"})
        return
    if not isinstance(unit, (WorkerUnit, ProcessUnit)):
        answer(launcher, rid, name, False, f"the {unit.label} restarts with its launcher only")
        return
    if unit.state == GONE:  # stopped by `tlrun stop NAME`: its lock was let go
        try:
            launcher.locks.retake(unit)
        except TlrunError as exc:
            answer(launcher, rid, name, False, str(exc))
            return
    if isinstance(unit, WorkerUnit):
        try:
            launcher.restart_worker(unit)
        except TlrunError as exc:  # its app does not import now: the unit stays stopped, the launcher runs on
            launcher.set_state(unit, GONE)
            launcher.locks.release(unit.lock_kind)
            answer(launcher, rid, name, False, str(exc))
            return
        ok = launcher.sup.running(unit.child)
        answer(launcher, rid, name, ok, f"{unit.node} ready" if ok else f"{unit.node} did not start")
        return

    def again(u: Unit) -> None:
        assert isinstance(u, ProcessUnit)
        if start_process(launcher, u):
            answer(launcher, rid, name, True, f"{u.label} started again (pid {launcher.sup.pid(u.child)})")
        else:
            answer(launcher, rid, name, False, f"{u.label} could not start: see the warning above")

    if launcher.sup.running(unit.child):
        launcher.stop_units([unit], "restart", then=again)
    else:  # gone, or waiting for its backoff
        again(unit)


def record_fields(unit: Unit) -> dict[str, Any]:
    """What a unit's lock record says of it beyond the launcher (ps, stop NAME, restart NAME read it)."""
    if isinstance(unit, WorkerUnit):
        return {"role": unit.role.name, "node": unit.node, "unit": unit.role.name, "kind": "worker"}
    if isinstance(unit, ProcessUnit):
        return {"unit": unit.spec.name, "kind": unit.kind, "node": unit.spec.name, "port": unit.port}
    return {"unit": unit.node, "kind": unit.kind}
