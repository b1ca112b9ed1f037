"""The process model: which processes are Celery workers or beats, and which belong to this project.

Parsing and matching are pure functions; `scan` is the one place that walks the process table.
A process is recognised by its argv (never by name alone) and tied to a project by tlrun's marker in its
environment, or by the exact app plus working directory.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import psutil

from tlrun.config import ENV_GUARD, ENV_MARKER, ENV_NODE, ENV_ROLE
from tlrun.launch.argv import (
    SHIM_MODULE,
    CeleryCommand,
    expand_node_name,
    parse_celery_argv,
    tlrun_index,
    unwrap_shim,
)
from tlrun.launch.identity import Identity

if TYPE_CHECKING:
    from tlrun.config import Role

ENV_PROCESS = "TLRUN_PROCESS"  # the stack's process a child runs (units.py sets it)

# Command-line reading moved to argv.py; these names stay importable from here.
__all__ = [
    "SHIM_MODULE",
    "CeleryCommand",
    "Identity",
    "expand_node_name",
    "parse_celery_argv",
    "unwrap_shim",
]


@dataclass(frozen=True)
class CeleryProcess:
    """One local Celery process as seen in the process table."""

    pid: int
    ppid: int
    create_time: float
    uid: int
    role: str  # "worker", "beat", or another Celery sub-command
    app: str | None
    node: str | None  # expanded node name (workers only)
    cwd: str | None
    marker: str | None  # tlrun's project id, when tlrun started it
    launcher: str | None  # tlrun's guard value "<pid>:<create_time>", when tlrun started it
    role_name: str | None = None  # the role tlrun started it for (TLRUN_ROLE)
    queues: frozenset[str] | None = None  # from -Q; None: Celery's default queue
    spare: bool = False  # started as tlrun dev's spare (it may have become the worker since)
    command: str | None = None  # a leftover's program name (`sleep`)
    process: str | None = None  # the stack's process it runs (TLRUN_PROCESS: `web`, `flower`), else None


def project_match(proc: CeleryProcess, project_id: str, app: str, root: Path, uid: int) -> bool:
    """Is this process one of this project's? Marker first; otherwise exact app and directory."""
    if proc.uid != uid:
        return False
    if proc.marker is not None:
        return proc.marker == project_id
    if proc.app != app or proc.cwd is None:
        return False
    return os.path.realpath(proc.cwd) == os.path.realpath(root)


DEFAULT_QUEUE = "celery"  # Celery's task_default_queue, for a worker started without -Q


def role_of(proc: CeleryProcess, roles: Sequence[Role]) -> str | None:
    """Which of the project's roles a worker serves: tlrun's role marker, else the first role whose queues
    it consumes (a hand-started worker). None: no role matches (or the process is a beat)."""
    if proc.role != "worker":
        return None
    names = [r.name for r in roles]
    if proc.role_name is not None:
        return proc.role_name if proc.role_name in names else None
    consumed = proc.queues or frozenset({DEFAULT_QUEUE})
    for role in roles:
        wanted = role.queue_set
        if wanted is None or wanted & consumed:
            return role.name
    return None


def serves_roles(proc: CeleryProcess, roles: Sequence[Role] | None) -> bool:
    """Does this worker compete with one of `roles`? (None: every role.) A beat serves no role: True.

    A marker without a role (an older tlrun) counts for every role; a hand-started worker counts for each
    role whose queues it consumes."""
    if roles is None or proc.role != "worker":
        return True
    if proc.role_name is not None:
        return proc.role_name in {r.name for r in roles}
    consumed = proc.queues or frozenset({DEFAULT_QUEUE})
    return any(r.queue_set is None or r.queue_set & consumed for r in roles)


def protected_pids() -> frozenset[int]:
    """Never signalled: pid 0 and 1, this process and its ancestors."""
    pids = {0, 1, os.getpid()}
    try:
        pids.update(p.pid for p in psutil.Process().parents())
    except psutil.Error:
        pids.add(os.getppid())
    return frozenset(pids)


def _read_env(proc: psutil.Process) -> Mapping[str, str]:
    try:
        return proc.environ()
    except (psutil.Error, OSError):
        return {}


LEFTOVER = "leftover"  # the kind of a marked process that is not Celery: what a task started, left behind


_MARKER_BYTES = ENV_MARKER.encode() + b"="


def _has_marker(pid: int) -> bool:
    """Does the process's environment hold tlrun's project marker? On Linux one raw read of
    /proc/<pid>/environ; elsewhere psutil."""
    data = _read_proc(pid, "environ")
    if data is None:
        if not _PROCFS:  # no procfs (macOS): ask psutil
            try:
                return ENV_MARKER in _read_env(psutil.Process(pid))
            except psutil.Error:
                return False
        return False
    return _MARKER_BYTES in data


_PROCFS = os.path.isdir("/proc/self") and os.path.exists("/proc/self/cmdline")


def _read_proc(pid: int, name: str) -> bytes | None:
    """The whole of /proc/<pid>/<name> in as few reads as it takes; None when it cannot be read."""
    try:
        fd = os.open(f"/proc/{pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 65536)
        if len(data) == 65536:
            parts = [data]
            while chunk := os.read(fd, 65536):
                parts.append(chunk)
            data = b"".join(parts)
        return data
    except OSError:
        return None
    finally:
        os.close(fd)


Table = Sequence[tuple[int, bytes]]  # a snapshot of the process table: (pid, its argv joined by NULs)


def process_table(table: Table | None = None) -> Iterable[tuple[int, list[str]]]:
    """(pid, argv) of every process: on Linux straight from /proc (one read of each cmdline, about a third
    of what psutil's Process objects cost), elsewhere through psutil. Kernel threads (no argv) are left out.
    `table`: a snapshot already read (one read of the table serves a command's every look at it)."""
    for pid, raw in _raw_table() if table is None else table:
        yield pid, _argv(raw)


def snapshot() -> Table:
    """The process table read once, for a command that looks at it more than once (doctor)."""
    return list(_raw_table())


def _raw_table() -> Iterable[tuple[int, bytes]]:
    """(pid, its argv joined by NULs, undecoded): a scan looks for a word in it before it pays for decoding."""
    if not _PROCFS:
        for proc in psutil.process_iter(["cmdline"]):
            argv = proc.info.get("cmdline")
            if argv:
                yield proc.pid, "\0".join(argv).encode("utf-8", "surrogateescape")
        return
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        data = _read_proc(pid, "cmdline")
        if data:
            yield pid, data


def _argv(raw: bytes) -> list[str]:
    return raw.decode("utf-8", "surrogateescape").rstrip("\0").split("\0")


def _leftover(pid: int, argv: Sequence[str], uid: int, marked: bool = False) -> CeleryProcess | None:
    """A process of the current user that carries a tlrun marker but runs no Celery command (a task's
    subprocess, an orphan): a leftover once its launcher is gone. `marked`: its marker was seen already."""
    if tlrun_index(argv) is not None or not (marked or _has_marker(pid)):
        return None  # tlrun itself (run from a task), or unmarked (another user's environment is unreadable)
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            if proc.uids().real != uid or proc.status() == psutil.STATUS_ZOMBIE:
                return None
            env = _read_env(proc)
            ppid, create_time, cwd = proc.ppid(), proc.create_time(), proc.cwd()
    except (psutil.Error, OSError):
        return None
    return CeleryProcess(
        pid=proc.pid,
        ppid=ppid,
        create_time=create_time,
        uid=uid,
        role=LEFTOVER,
        app=None,
        node=None,
        cwd=cwd,
        marker=env.get(ENV_MARKER),
        launcher=env.get(ENV_GUARD),
        role_name=env.get(ENV_ROLE),
        command=os.path.basename(argv[0]) if argv else proc.name(),
        process=env.get(ENV_PROCESS),
    )


def scan(
    roles: Iterable[str] = ("worker", "beat"), hostname: str | None = None, table: Table | None = None
) -> list[CeleryProcess]:
    """Every Celery process with one of `roles` on this machine (all users; callers filter by uid), and
    with LEFTOVER among `roles`, the current user's marked processes that run no Celery command.

    Reads argv for every process (cheap) and the environment and cwd only for Celery ones (and, for
    leftovers, the environment of the current user's other processes).
    """
    wanted = set(roles)
    host = hostname or socket.gethostname()
    found: list[CeleryProcess] = []
    # argv only for every process (one read of /proc/<pid>/cmdline); the rest only for Celery ones.
    leftovers = LEFTOVER in wanted
    uid = os.getuid()
    for pid, raw in _raw_table() if table is None else table:
        if b"celery" not in raw and b"tlrun" not in raw:
            # Most processes name neither Celery nor tlrun anywhere: no decoding, no parsing; a leftover
            # only when its environment holds the marker (one read), the rest only for those.
            if leftovers and _has_marker(pid):
                left = _leftover(pid, unwrap_shim(_argv(raw)), uid, marked=True)
                if left is not None:
                    found.append(left)
            continue
        argv = _argv(raw)
        cmd = parse_celery_argv(argv)
        if cmd is not None and cmd.subcommand not in ("worker", "beat"):
            cmd = None  # `celery flower`, `celery inspect`: no worker nor beat; marked, a leftover or a process
        if cmd is None and leftovers:
            left = _leftover(pid, unwrap_shim(argv), uid)
            if left is not None:
                found.append(left)
            continue
        if cmd is None or cmd.subcommand not in wanted:
            continue
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                ppid, create_time, uid = proc.ppid(), proc.create_time(), proc.uids().real
        except (psutil.Error, OSError):
            continue
        env = _read_env(proc)
        try:
            cwd: str | None = proc.cwd()
        except (psutil.Error, OSError):
            cwd = None
        if cmd.workdir:
            cwd = os.path.join(cwd or "/", cmd.workdir)
        node = env.get(ENV_NODE) or (expand_node_name(cmd.node, host) if cmd.subcommand == "worker" else None)
        found.append(
            CeleryProcess(
                pid=proc.pid,
                ppid=ppid,
                create_time=create_time,
                uid=uid,
                role=cmd.subcommand,
                app=cmd.app,
                node=node,
                cwd=cwd,
                marker=env.get(ENV_MARKER),
                launcher=env.get(ENV_GUARD),
                role_name=env.get(ENV_ROLE),
                queues=cmd.queues,
                spare=bool(env.get("TLRUN_SPARE")),
            )
        )
    return found


class _Named(Protocol):
    @property
    def pid(self) -> int: ...
    @property
    def node(self) -> str | None: ...
    @property
    def app(self) -> str | None: ...


def pids_by_node(processes: Iterable[_Named], app: str) -> dict[str, list[int]]:
    """Local pids for each node name, to show beside a broker's replies. A node name alone is not enough:
    two projects on one host both answer as `celery@host` (Celery's default), each on its own broker. So a
    name's pids are its processes running this app; only when none does (an app named otherwise on the
    command line, say through CELERY_APP), all processes with that name."""
    named: dict[str, list[_Named]] = {}
    for proc in processes:
        if proc.node:
            named.setdefault(proc.node, []).append(proc)
    return {node: [p.pid for p in ([p for p in group if p.app == app] or group)] for node, group in named.items()}


def main_processes(procs: Sequence[CeleryProcess]) -> list[CeleryProcess]:
    """The processes whose parent is not in the set: worker main processes and orphaned pool children."""
    pids = {p.pid for p in procs}
    return [p for p in procs if p.ppid not in pids]


def same_host_namespace(pid: int) -> bool:
    """On Linux a process in another UTS namespace has its own host name: another host, as far as locks and
    node names go (tests simulate hosts that way). Elsewhere there are no such namespaces."""
    try:
        return os.readlink(f"/proc/{pid}/ns/uts") == os.readlink("/proc/self/ns/uts")
    except OSError:
        return True
