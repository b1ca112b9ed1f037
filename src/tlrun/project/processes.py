"""The development stack's other processes: `[tool.tlrun.processes.NAME]` tables, else a `Procfile.dev` or
`Procfile` (honcho's and foreman's format), plus Flower.

Pure reading and validation; the launcher runs each process as a unit (launch/units.py ProcessUnit). A
Procfile line that runs `celery ... worker` or `celery ... beat` is not a process: it becomes one of the
project's worker roles (or beat), so that it gets tlrun's node name, sweep and stop ladder.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlrun.errors import ConfigError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")
RESERVED = ("beat", "broker", "flower")
READY_KINDS = ("http", "port")
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP")
DEFAULT_GRACE = 5.0  # honcho's wait before SIGKILL
PROCFILES = ("Procfile.dev", "Procfile")
RELEASE = "release"  # Heroku's release phase: a Procfile line run once before the others, not a service
PROCFILE_BASE_PORT = 5000  # honcho: $PORT or 5000, plus 100 per line
PROCFILE_LINE = re.compile(r"^([A-Za-z0-9_-]+):\s*(.+)$")
MAX_PROCFILE_BYTES = 256 * 1024
KEYS = ("command", "port", "ready", "reload", "env", "cwd", "stop_signal", "grace")


@dataclass(frozen=True)
class ProcessSpec:
    """One process of the stack. `argv` may hold `{port}`; a Procfile line runs through `sh -c`."""

    name: str
    argv: tuple[str, ...]
    port: int | None = None
    auto_port: bool = False  # "auto": a free port, picked at the launch and kept across restarts
    ready: str | None = None  # "http", "port", or None (ready once started)
    ready_pattern: str | None = None  # a regular expression on its output
    reload: bool = False  # restarted on a save (with --reload)
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None  # relative to the project root
    stop_signal: str = "SIGTERM"
    grace: float = DEFAULT_GRACE
    kind: str = "process"  # or "flower"
    source: str = ""  # where it is declared

    @property
    def signal_number(self) -> int:
        return int(getattr(signal, self.stop_signal))

    def command(self, port: int | None) -> list[str]:
        """argv with `{port}` replaced."""
        return [a.replace("{port}", str(port)) if port is not None else a for a in self.argv]

    @property
    def readiness(self) -> str | None:
        """What `ready` waits for: http, port, output, or None (started is ready)."""
        if self.ready_pattern is not None:
            return "output"
        if self.ready is not None:
            return self.ready
        return "port" if self.port is not None or self.auto_port else None


@dataclass(frozen=True)
class Stack:
    """What the project file or the Procfile says beyond the workers."""

    processes: tuple[ProcessSpec, ...] = ()
    roles: tuple[tuple[str, dict[str, Any]], ...] = ()  # (name, role table) from a Procfile's celery lines
    app: str | None = None  # the first celery line's -A
    beat: bool = False  # a Procfile runs beat (a beat line, or -B)
    source: str | None = None  # the file the processes came from
    notes: tuple[str, ...] = ()
    role_notes: tuple[str, ...] = ()  # which worker lines became roles (said only when they do)
    release: ProcessSpec | None = None  # Heroku's release phase: run once before the others, never a service
    app_evidence: str = ""  # where `app` was read: `Procfile line 2: celery -A proj worker`


def flower_spec(app: str, python: str) -> ProcessSpec:
    """Flower against the launcher's broker (CELERY_BROKER_URL in its environment, never on its command line),
    on a free port of 127.0.0.1; FLOWER_BASIC_AUTH from the environment reaches it as such (Flower reads its
    FLOWER_* options there), so that the password is never on a command line."""
    if importlib.util.find_spec("flower") is None:
        raise ConfigError(
            "--flower needs the flower package, which is not installed in this environment",
            hint="pip install flower (in the project's environment), or leave out --flower / flower = true",
        )
    argv = (python, "-m", "celery", "-A", app, "flower", "--address=127.0.0.1", "--port={port}")
    return ProcessSpec("flower", argv, auto_port=True, ready="http", kind="flower", source="--flower")


def _bad(where: str, message: str, hint: str | None = None) -> ConfigError:
    return ConfigError(f"{where}: {message}"[:400], hint=hint)


def parse_table(table: Any, where: Callable[[str], str]) -> tuple[ProcessSpec, ...]:
    """`[tool.tlrun.processes]`: NAME -> {command, port, ready, reload, env, cwd, stop_signal, grace}.
    `where(key)` names the file and key for messages."""
    if not isinstance(table, dict) or not table:
        raise _bad(where("processes"), "expected one or more [processes.NAME] tables")
    specs = []
    for name, spec in table.items():
        at = f"processes.{name}"
        check_name(name, where(at))
        if not isinstance(spec, dict):
            raise _bad(where(at), "expected a table with at least `command`")
        unknown = sorted(set(spec) - set(KEYS))
        if unknown:
            raise _bad(where(f"{at}.{unknown[0]}"), "unknown key", hint=f"known keys: {', '.join(KEYS)}")
        if "command" not in spec:
            raise _bad(where(at), 'a process needs `command`, e.g. command = "python manage.py runserver {port}"')
        specs.append(_spec(name, spec, at, where))
    taken: dict[int, str] = {}
    for spec in specs:  # two processes on one fixed port: the second could never start
        if spec.port is not None and not spec.auto_port:
            other = taken.setdefault(spec.port, spec.name)
            if other != spec.name:
                raise _bad(
                    where(f"processes.{spec.name}.port"),
                    f"port {spec.port} is also the port of process {other!r}: the second would never start",
                    hint='give one of them another port, or port = "auto"',
                )
    return tuple(specs)


def check_name(name: str, where: str) -> None:
    if not NAME_RE.match(name) or name in RESERVED:
        raise _bad(
            where,
            f"{name!r} is not a process name tlrun can use",
            hint="1-40 letters, digits, '_' or '-', starting with a letter or digit; not beat, broker or flower",
        )


def _spec(name: str, spec: Mapping[str, Any], key: str, where: Callable[[str], str]) -> ProcessSpec:
    def at_(sub: str) -> str:
        return where(f"{key}.{sub}")

    command = spec["command"]
    if isinstance(command, str):
        try:
            argv = tuple(shlex.split(command))
        except ValueError as exc:
            raise _bad(at_("command"), f"cannot be split ({exc})") from None
    elif isinstance(command, list) and all(isinstance(a, str) for a in command):
        argv = tuple(command)
    else:
        raise _bad(at_("command"), "expected a string or a list of strings")
    if not argv or not argv[0]:
        raise _bad(at_("command"), "is empty")
    port, auto = _port(spec.get("port"), at_("port"))
    if any("{port}" in a for a in argv) and port is None and not auto:
        raise _bad(at_("command"), "uses {port} but the process has no `port`", hint='add port = 8000 or "auto"')
    ready, pattern = _ready(spec.get("ready"), at_("ready"))
    if ready in READY_KINDS and port is None and not auto:
        raise _bad(at_("ready"), f'"{ready}" needs a `port`')
    env = spec.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise _bad(at_("env"), 'expected a table of strings, e.g. env = { DJANGO_DEBUG = "1" }')
    cwd = spec.get("cwd")
    if cwd is not None and (not isinstance(cwd, str) or not cwd or os.path.isabs(cwd) or ".." in Path(cwd).parts):
        raise _bad(at_("cwd"), "expected a folder relative to the project root, inside it")
    stop = spec.get("stop_signal", "SIGTERM")
    stop = stop.upper() if isinstance(stop, str) else stop
    if isinstance(stop, str) and not stop.startswith("SIG"):
        stop = "SIG" + stop
    if stop not in STOP_SIGNALS:
        raise _bad(at_("stop_signal"), f"expected one of {', '.join(STOP_SIGNALS)}, got {spec.get('stop_signal')!r}")
    grace = spec.get("grace", DEFAULT_GRACE)
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not 0 <= grace <= 3600:
        raise _bad(at_("grace"), "expected seconds between 0 and 3600")
    reload = spec.get("reload", False)
    if not isinstance(reload, bool):
        raise _bad(at_("reload"), "expected true or false")
    return ProcessSpec(
        name, argv, port, auto, ready, pattern, reload, dict(env), cwd, str(stop), float(grace), source=where(key)
    )


def _port(value: Any, where: str) -> tuple[int | None, bool]:
    if value is None:
        return None, False
    if value == "auto":
        return None, True
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return value, False
    raise _bad(where, f'expected a port (1-65535) or "auto", got {value!r}')


def _ready(value: Any, where: str) -> tuple[str | None, str | None]:
    if value is None:
        return None, None
    if not isinstance(value, str) or not value:
        raise _bad(where, 'expected "http", "port" or a regular expression on its output')
    if value in READY_KINDS:
        return value, None
    try:
        re.compile(value)
    except re.error as exc:
        raise _bad(where, f"{value!r} is not a regular expression ({exc})") from None
    return None, value


# -- Procfile ------------------------------------------------------------------------------------------


def find_procfile(root: Path) -> Path | None:
    for name in PROCFILES:
        path = root / name
        if path.is_file() and not path.is_symlink():
            return path
    return None


def read_procfile(path: Path, environ: Mapping[str, str]) -> Stack:
    """Honcho's format: `name: command` lines, `#` comments; each line runs through `sh -c` with `$PORT`
    (the environment's PORT or 5000, plus 100 per line). Celery worker and beat lines become roles and beat."""
    from tlrun.project.file import read_text  # file.py imports this module for its tables

    text = read_text(path, MAX_PROCFILE_BYTES, "a Procfile")
    try:
        base = int(environ.get("PORT") or PROCFILE_BASE_PORT)
    except ValueError:
        raise ConfigError(f"PORT={environ.get('PORT')!r}: expected a port number (the Procfile's base port)") from None
    processes: list[ProcessSpec] = []
    roles: list[tuple[str, dict[str, Any]]] = []
    notes: list[str] = []
    role_notes: list[str] = []
    release: ProcessSpec | None = None
    app: str | None = None
    app_evidence = ""
    beat = False
    seen: set[str] = set()
    index = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = PROCFILE_LINE.match(line)
        where = f"{path}, line {number}"
        if match is None:
            raise ConfigError(f"{where}: expected `name: command`, got {line[:80]!r}")
        name, command = match.group(1), match.group(2).strip()
        if name in seen:
            raise ConfigError(f"{where}: {name!r} is declared twice")
        seen.add(name)
        port = base + 100 * index
        index += 1
        celery = celery_line(command)
        if name == RELEASE:
            release = ProcessSpec(name, ("sh", "-c", command), source=where)
            notes.append(f"{path.name} line {number} ({name}) runs once before the others start, as Heroku's release")
            continue
        if celery is not None:
            sub, line_app, table, line_beat, dropped = celery
            if app is None and line_app:
                app, app_evidence = line_app, f"{path.name} line {number}: `celery -A {line_app} {sub}`"
            if sub == "beat":
                beat = True
                notes.append(f"{path.name} line {number} ({name}) runs beat: tlrun runs it as its beat")
                continue
            check_name(name, where)
            beat = beat or line_beat
            roles.append((name, table))
            queues = ",".join(table["queues"])
            note = f"{path.name} line {number} ({name}) runs a Celery worker: tlrun runs it as role {name} ({queues})"
            if line_beat:
                note += ", and its -B as tlrun's beat"
            if dropped:
                note += f"; tlrun sets {', '.join(dropped)} itself"
            role_notes.append(note)
            continue
        check_name(name, where)
        processes.append(ProcessSpec(name, ("sh", "-c", command), port=port, env={"PORT": str(port)}, source=where))
    return Stack(
        tuple(processes), tuple(roles), app, beat, str(path), tuple(notes), tuple(role_notes), release, app_evidence
    )


# Celery worker options a role table holds: flag -> (role key, kind)
_ROLE_FLAGS: dict[str, tuple[str, type]] = {
    "-Q": ("queues", list),
    "--queues": ("queues", list),
    "-c": ("concurrency", int),
    "--concurrency": ("concurrency", int),
    "-P": ("pool", str),
    "--pool": ("pool", str),
    "-l": ("loglevel", str),
    "--loglevel": ("loglevel", str),
    "--max-tasks-per-child": ("max_tasks_per_child", int),
    "--max-memory-per-child": ("max_memory_per_child", int),
    "--prefetch-multiplier": ("prefetch_multiplier", int),
    "--time-limit": ("time_limit", float),
    "--soft-time-limit": ("soft_time_limit", float),
}
# What tlrun decides itself: dropped from the line (with a note).
_OWNED = ("-n", "--hostname", "--pidfile", "--logfile", "-f", "--detach", "-D", "--uid", "--gid", "-b", "--broker")
_OWNED_FLAGS = ("--detach", "-D")


def celery_line(command: str) -> tuple[str, str | None, dict[str, Any], bool, list[str]] | None:
    """A Procfile command that runs `celery [-A app] worker|beat ...` as a simple command (leading VAR=x
    assignments and `exec` allowed): (sub-command, app, role table, -B, options tlrun owns). None otherwise."""
    if any(op in command for op in ("&&", "||", ";", "|", "`", "$(")):
        return None
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    while words and (re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]) or words[0] == "exec"):
        words = words[1:]
    start = _celery_start(words)
    if start is None:
        return None
    app: str | None = None
    i = start
    sub = None
    table: dict[str, Any] = {}
    beat = False
    dropped: list[str] = []
    while i < len(words):
        word = words[i]
        flag, eq, inline = word.partition("=")
        value = inline if eq else (words[i + 1] if i + 1 < len(words) else "")
        step = 1 if eq else 2
        if sub is None and flag in ("-A", "--app"):
            app, i = value, i + step
        elif sub is None and word in ("worker", "beat"):
            sub, i = word, i + 1
        elif sub is None and not word.startswith("-"):
            return None  # another sub-command (flower, inspect): a process
        elif sub == "worker" and flag in _ROLE_FLAGS:
            key, kind = _ROLE_FLAGS[flag]
            try:
                table[key] = [q for q in value.split(",") if q] if kind is list else kind(value)
            except ValueError:
                return None
            i += step
        elif sub == "worker" and word in ("-B", "--beat"):
            beat, i = True, i + 1
        elif sub == "worker" and word in ("-E", "--events"):
            table["events"], i = True, i + 1
        elif flag in _OWNED:
            dropped.append(flag)
            i += 1 if flag in _OWNED_FLAGS else step
        elif sub is not None:  # another option (and its value): passed to the worker as it stands
            table.setdefault("extra_args", []).append(word)
            i += 1
        else:
            i += 1
    if sub is None:
        return None
    table.setdefault("queues", ["celery"])
    return sub, app, table, beat, dropped


def _celery_start(words: Sequence[str]) -> int | None:
    if not words:
        return None
    if os.path.basename(words[0]) == "celery":
        return 1
    if os.path.basename(words[0]).startswith("python") and words[1:3] == ["-m", "celery"]:
        return 3
    return None
