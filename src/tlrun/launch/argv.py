"""Reading command lines: which argv runs Celery (directly, as `python -m celery`, through tlrun's shim or
its worker entry), with which app, sub-command, node name and workdir. Pure functions; procs.py applies
them to the process table.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

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
# `python -m <these>` runs Celery's command line: Celery itself, and tlrun dev's worker entry (the same
# command line with a shorter transport poll interval).
CELERY_MODULES = ("celery", "tlrun.launch.entry", "tlrun.dev.worker_entry")  # the last: tlrun <= 0.1.0
SHIM_MODULE = "tlrun.launch._child"  # every child of a launcher runs behind it: `<shim args> -- <argv>`


@dataclass(frozen=True)
class CeleryCommand:
    """What a Celery command line says: the app, the sub-command, the node name, the workdir."""

    app: str | None
    subcommand: str
    node: str | None = None
    workdir: str | None = None
    queues: frozenset[str] | None = None  # -Q/--queues; None: Celery's default queue


def _module_index(argv: Sequence[str], modules: Sequence[str], script: str) -> int | None:
    """Index of the first argument after the program itself, when argv runs `script` (`celery ...`),
    `python -m <one of modules> ...` or `python /venv/bin/<script> ...`; else None."""
    if not argv:
        return None
    head = os.path.basename(argv[0])
    if head == script:
        return 1
    if not head.startswith(("python", "pypy")):
        return None
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "-m":
            return i + 2 if i + 1 < len(argv) and argv[i + 1] in modules else None
        if arg.startswith("-m"):
            return i + 1 if arg[2:] in modules else None
        if arg in _PY_VALUE_FLAGS:
            i += 2
            continue
        if arg.startswith("-"):
            i += 1
            continue
        # The first positional argument is the script: `python /venv/bin/celery ...`.
        return i + 1 if os.path.basename(arg) == script else None
    return None


def _celery_index(argv: Sequence[str]) -> int | None:
    return _module_index(argv, CELERY_MODULES, "celery")


def unwrap_shim(argv: Sequence[str]) -> Sequence[str]:
    """The command a child of a launcher runs (what follows the parent-death shim's `--`), else argv."""
    if _module_index(argv, (SHIM_MODULE,), SHIM_MODULE) is not None and "--" in argv:
        return argv[list(argv).index("--") + 1 :]
    return argv


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
    """Parse a command line; None unless it runs a Celery sub-command (behind tlrun's shim or not)."""
    argv = unwrap_shim(argv)
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
    node = queues = None
    j = 0
    while j < len(rest):
        value, nxt = _option_value(rest, j, "-n", "--hostname")
        if nxt > 0:
            node, j = value, nxt
            continue
        value, nxt = _option_value(rest, j, "-Q", "--queues")
        if nxt > 0:
            queues, j = value, nxt
            continue
        j += 1
    queue_set = frozenset(q.strip() for q in queues.split(",") if q.strip()) if queues else None
    return CeleryCommand(app=app, subcommand=subcommand, node=node, workdir=workdir, queues=queue_set)


def expand_node_name(name: str | None, hostname: str) -> str:
    """Celery's node-name expansion: default `celery@%h`, `%h` host, `%n` short name, `%d` domain."""
    name = name or "celery@%h"
    if "@" not in name:
        name = f"{name}@{hostname}"
    short, _, domain = hostname.partition(".")
    return name.replace("%h", hostname).replace("%n", short).replace("%d", domain).replace("%%", "%")


def tlrun_index(argv: Sequence[str]) -> int | None:
    return _module_index(argv, ("tlrun",), "tlrun")
