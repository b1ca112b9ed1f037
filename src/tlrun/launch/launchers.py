"""tlrun launchers in the process table: what each one's command line says it runs (`tlrun worker|dev|beat`),
for the guard's second check and for stop. Pure parsing, plus one scan."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from tlrun.launch.argv import tlrun_index
from tlrun.launch.procs import Identity, Table, process_table, protected_pids, same_host_namespace

LAUNCH_COMMANDS = ("worker", "dev", "beat")
_TLRUN_VALUE_OPTS = {
    "-A",
    "--app",
    "-b",
    "--broker",
    "--project-dir",
    "--role",
    "--grace",
    "--node-prefix",
    "--log-dir",
    "--expected",
    "--ready-timeout",
    "--ping-window",
    "-c",
    "--concurrency",
    "-Q",
    "--queues",
    "-P",
    "--pool",
    "-l",
    "--loglevel",
    "--max-tasks-per-child",
    "--max-memory-per-child",
    "--prefetch-multiplier",
    "--time-limit",
    "--soft-time-limit",
    "--restart-delay",
    "--restart-max-delay",
    "--give-up-crashes",
    "--give-up-window",
    "--max-restarts",
}


@dataclass(frozen=True)
class LauncherCommand:
    """What a tlrun launcher's command line says (`tlrun worker|dev|beat ...`)."""

    command: str
    app: str | None
    project_dir: str | None
    role: str | None
    beat: bool | None  # dev's --beat/--no-beat; None: not given (the project file decides)


def parse_tlrun_argv(argv: Sequence[str]) -> LauncherCommand | None:
    """Parse a command line; None unless it runs `tlrun worker`, `dev` or `beat`."""
    start = tlrun_index(argv)
    if start is None:
        return None
    args = list(argv[start:])
    while args and args[0].startswith("-"):  # global options: -v
        args.pop(0)
    if not args or args[0] not in LAUNCH_COMMANDS:
        return None
    found: dict[str, str] = {}
    beat: bool | None = None
    i = 1
    while i < len(args):
        arg = args[i]
        if arg == "--":
            break
        if arg in ("--beat", "--no-beat"):
            beat = arg == "--beat"
        key, _, inline = arg.partition("=")
        if key in _TLRUN_VALUE_OPTS:
            value = inline if inline else (args[i + 1] if i + 1 < len(args) else "")
            found.setdefault(key, value)
            i += 1 if inline else 2
            continue
        i += 1
    return LauncherCommand(
        command=args[0],
        app=found.get("-A") or found.get("--app"),
        project_dir=found.get("--project-dir"),
        role=found.get("--role"),
        beat=beat,
    )


@dataclass(frozen=True)
class Launcher:
    """A live tlrun launcher of this user on this host, with the project root it runs in."""

    identity: Identity
    cmd: LauncherCommand
    root: str


def find_launchers(root: Path, table: Table | None = None) -> list[Launcher]:
    """Live tlrun launchers (worker, dev, beat) of the current user, running in project `root` on this host;
    never this process or its ancestors. `table`: a snapshot of the process table already read."""
    uid = os.getuid()
    protected = protected_pids()
    want = os.path.realpath(root)
    found = []
    for pid, argv in process_table(table):
        cmd = parse_tlrun_argv(argv) if any("tlrun" in a for a in argv) else None
        if cmd is None or pid in protected:
            continue
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                if proc.uids().real != uid or proc.status() == psutil.STATUS_ZOMBIE:
                    continue
                cwd, create_time = proc.cwd(), proc.create_time()
        except (psutil.Error, OSError):
            continue
        here = os.path.realpath(os.path.join(cwd, cmd.project_dir) if cmd.project_dir else cwd)
        if here == want and same_host_namespace(proc.pid):
            found.append(Launcher(Identity(proc.pid, create_time), cmd, here))
    return found
