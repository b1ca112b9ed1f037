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

import psutil

from tlrun.config import ENV_GUARD, ENV_MARKER, ENV_NODE

# Celery's global options that take a value (they come before the sub-command).
_GLOBAL_VALUE_OPTS = {
    "-A",
    "--app",
    "-b",
    "--broker",
    "--result-backend",
    "--loader",
    "--config",
    "--workdir",
}
_PY_VALUE_FLAGS = {"-W", "-X", "-Q"}  # python interpreter flags that take a value


@dataclass(frozen=True)
class Identity:
    """A process named so that a reused pid does not match: pid plus its create time."""

    pid: int
    create_time: float

    @classmethod
    def of_self(cls) -> Identity:
        return cls(os.getpid(), psutil.Process().create_time())

    def encode(self) -> str:
        return f"{self.pid}:{self.create_time:.2f}"

    @classmethod
    def decode(cls, value: str) -> Identity | None:
        try:
            pid, ctime = value.split(":", 1)
            identity = cls(int(pid), float(ctime))
        except (ValueError, AttributeError):
            return None
        return identity if identity.pid > 0 else None

    def is_alive(self) -> bool:
        try:
            proc = psutil.Process(self.pid)
            return abs(proc.create_time() - self.create_time) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


@dataclass(frozen=True)
class CeleryCommand:
    """What a Celery command line says: the app, the sub-command, the node name, the workdir."""

    app: str | None
    subcommand: str
    node: str | None = None
    workdir: str | None = None


def _celery_index(argv: Sequence[str]) -> int | None:
    """Index of the first argument after `celery` itself, or None when argv is not a Celery command."""
    if not argv:
        return None
    head = os.path.basename(argv[0])
    if head == "celery":
        return 1
    if not head.startswith(("python", "pypy")):
        return None
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "-m":
            return i + 2 if i + 1 < len(argv) and argv[i + 1] == "celery" else None
        if arg.startswith("-m"):
            return i + 1 if arg[2:] == "celery" else None
        if arg in _PY_VALUE_FLAGS:
            i += 2
            continue
        if arg.startswith("-"):
            i += 1
            continue
        # The first positional argument is the script: `python /venv/bin/celery ...`.
        return i + 1 if os.path.basename(arg) == "celery" else None
    return None


def _option_value(args: Sequence[str], i: int, short: str, long: str) -> tuple[str | None, int]:
    """(value, next index) when args[i] is `short VALUE`, `shortVALUE`, `long VALUE` or `long=VALUE`."""
    arg = args[i]
    if arg in (short, long):
        return (args[i + 1] if i + 1 < len(args) else None), i + 2
    if arg.startswith(long + "="):
        return arg[len(long) + 1 :], i + 1
    if short and arg.startswith(short) and not arg.startswith("--") and len(arg) > len(short):
        return arg[len(short) :], i + 1
    return None, -1


def parse_celery_argv(argv: Sequence[str]) -> CeleryCommand | None:
    """Parse a command line; None unless it runs a Celery sub-command."""
    start = _celery_index(argv)
    if start is None:
        return None
    args = list(argv[start:])
    app = workdir = None
    i = 0
    while i < len(args):
        arg = args[i]
        value, nxt = _option_value(args, i, "-A", "--app")
        if nxt > 0:
            app, i = value, nxt
            continue
        value, nxt = _option_value(args, i, "", "--workdir")
        if nxt > 0:
            workdir, i = value, nxt
            continue
        if arg in _GLOBAL_VALUE_OPTS:
            i += 2
            continue
        if arg.startswith("-"):
            i += 1
            continue
        break
    if i >= len(args):
        return None
    subcommand, rest = args[i], args[i + 1 :]
    node = None
    j = 0
    while j < len(rest):
        value, nxt = _option_value(rest, j, "-n", "--hostname")
        if nxt > 0:
            node, j = value, nxt
        else:
            j += 1
    return CeleryCommand(app=app, subcommand=subcommand, node=node, workdir=workdir)


def expand_node_name(name: str | None, hostname: str) -> str:
    """Celery's node-name expansion: default `celery@%h`, `%h` host, `%n` short name, `%d` domain."""
    name = name or "celery@%h"
    if "@" not in name:
        name = f"{name}@{hostname}"
    short, _, domain = hostname.partition(".")
    return name.replace("%h", hostname).replace("%n", short).replace("%d", domain).replace("%%", "%")


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


def project_match(proc: CeleryProcess, project_id: str, app: str, root: Path, uid: int) -> bool:
    """Is this process one of this project's? Marker first; otherwise exact app and directory."""
    if proc.uid != uid:
        return False
    if proc.marker is not None:
        return proc.marker == project_id
    if proc.app != app or proc.cwd is None:
        return False
    return os.path.realpath(proc.cwd) == os.path.realpath(root)


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


def scan(roles: Iterable[str] = ("worker", "beat"), hostname: str | None = None) -> list[CeleryProcess]:
    """Every Celery process with one of `roles` on this machine (all users; callers filter by uid).

    Reads argv for every process (cheap) and the environment and cwd only for Celery ones.
    """
    wanted = set(roles)
    host = hostname or socket.gethostname()
    found: list[CeleryProcess] = []
    # argv only for every process (one read of /proc/<pid>/cmdline); the rest only for Celery ones.
    for proc in psutil.process_iter(["cmdline"]):
        cmd = parse_celery_argv(proc.info.get("cmdline") or ())
        if cmd is None or cmd.subcommand not in wanted:
            continue
        try:
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
            )
        )
    return found


def main_processes(procs: Sequence[CeleryProcess]) -> list[CeleryProcess]:
    """The processes whose parent is not in the set: worker main processes and orphaned pool children."""
    pids = {p.pid for p in procs}
    return [p for p in procs if p.ppid not in pids]
