"""The project file: `[tool.tlrun]` in pyproject.toml, else the top level of tlrun.toml.

Reading is strict: an unknown key, a value of the wrong type or range, or a role with no queues is a
ConfigError naming the file, the key and what was expected. A TOML syntax error names the file and line.
The result is plain validated data; config.py merges it with the command line and the environment.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tlrun.errors import ConfigError
from tlrun.project.processes import ProcessSpec, parse_table

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

__all__ = ["ProjectFile", "RoleSpec", "load", "parse", "tomllib"]

PYPROJECT = "pyproject.toml"
TLRUN_TOML = "tlrun.toml"
MAX_FILE_BYTES = 1024 * 1024

POOLS = ("prefork", "solo", "threads", "gevent", "eventlet", "processes")
LOGLEVELS = ("debug", "info", "warning", "error", "critical", "fatal")
ROLE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")
RESERVED_ROLE_NAMES = ("beat", "broker", "flower")

Check = Callable[[Any], str | None]  # returns what was expected when the value is wrong, else None


def _int(minimum: int, maximum: int | None = None) -> Check:
    def check(value: Any) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
        ok = ok and (maximum is None or value <= maximum)
        upto = f" and at most {maximum}" if maximum is not None else ""
        return None if ok else f"an integer of at least {minimum}{upto}"

    return check


def _number(minimum: float, open_min: bool = False) -> Check:
    def check(value: Any) -> str | None:
        ok = (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and (value > minimum if open_min else value >= minimum)
        )
        return None if ok else f"a number {'above' if open_min else 'of at least'} {minimum:g}"

    return check


def _choice(options: tuple[str, ...]) -> Check:
    def check(value: Any) -> str | None:
        ok = isinstance(value, str) and value.lower() in options
        return None if ok else f"one of {', '.join(options)}"

    return check


def _bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else "true or false"


def _string(value: Any) -> str | None:
    return None if isinstance(value, str) and value.strip() else "a non-empty string"


def _strings(value: Any) -> str | None:
    ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
    return None if ok else 'a list of strings, e.g. ["--without-heartbeat"]'


def _queues(value: Any) -> str | None:
    ok = isinstance(value, list) and value and all(isinstance(v, str) and v.strip() and "," not in v for v in value)
    return None if ok else 'a non-empty list of queue names, e.g. ["celery"]'


def _size(value: Any) -> str | None:
    ok = (isinstance(value, int) and not isinstance(value, bool) and value > 0) or (
        isinstance(value, str) and re.match(r"^\s*\d+(\.\d+)?\s*[kmgtKMGT]?i?[bB]?\s*$", value) is not None
    )
    return None if ok else 'a size: bytes, or a string such as "200MB" or "1.5GiB"'


ROLE_KEYS: dict[str, Check] = {
    "queues": _queues,
    "concurrency": _int(1, 10_000),
    "pool": _choice(POOLS),
    "loglevel": _choice(LOGLEVELS),
    "max_tasks_per_child": _int(1),
    "max_memory_per_child": _int(1),
    "prefetch_multiplier": _int(0),
    "time_limit": _number(0, open_min=True),
    "soft_time_limit": _number(0, open_min=True),
    "events": _bool,
    "node_prefix": _string,
    "extra_args": _strings,
    "expected": _int(1),
    "memory_limit": _size,
}

TOP_KEYS: dict[str, Check] = {
    "app": _string,
    "name": _string,
    "source": _string,
    "beat": _bool,
    "beat_lock_ttl": _number(2),
    "stuck_after": _number(1),
    "hung_after": _number(0.5),
    "consume_check_every": _number(0.5),
    "log_dir": _string,
    "ready_timeout": _number(0.5),
    "grace": _number(0),
    "ping_window": _number(0.1),
    "expected": _int(1),
    "flower": _bool,
}


@dataclass(frozen=True)
class RoleSpec:
    """One `[tool.tlrun.workers.NAME]` table, validated."""

    name: str
    values: Mapping[str, Any]

    @property
    def queues(self) -> tuple[str, ...]:
        return tuple(self.values["queues"])


@dataclass(frozen=True)
class ProjectFile:
    path: Path | None  # None: the project has no tlrun table
    values: Mapping[str, Any] = field(default_factory=dict)
    roles: tuple[RoleSpec, ...] = ()
    processes: tuple[ProcessSpec, ...] = ()  # `[processes.NAME]` tables (processes.py)
    # The whole parsed pyproject.toml (for the packaging tools' src/ settings), when there is one.
    pyproject: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    def where(self, key: str) -> str:
        table = "[tool.tlrun]" if self.path is not None and self.path.name == PYPROJECT else "top level"
        return f"{self.path} ({table}, key {key})"


def read_text(path: Path, limit: int, what: str) -> str:
    """A small UTF-8 file read whole (a project file, a Procfile), or a ConfigError saying why not."""
    try:
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    if len(data) > limit:
        raise ConfigError(f"{path}: larger than {limit // 1024} KiB; not {what} tlrun reads")
    if b"\0" in data:  # no program can be given one in its command line, and no text holds one
        line = data[: data.index(b"\0")].count(b"\n") + 1
        raise ConfigError(f"{path}, line {line}: holds a NUL byte; not {what} tlrun reads")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from None


def _read(path: Path) -> dict[str, Any]:
    text = read_text(path, MAX_FILE_BYTES, "a project file")
    try:
        document: dict[str, Any] = tomllib.loads(text)
        return document
    except tomllib.TOMLDecodeError as exc:
        # The message carries "(at line N, column M)".
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None
    except RecursionError:  # arrays or tables nested thousands deep
        raise ConfigError(f"{path}: nested too deeply to be a project file") from None


def _check_table(table: Mapping[str, Any], schema: Mapping[str, Check], where: Callable[[str], str]) -> None:
    for key, value in table.items():
        check = schema.get(key)
        if check is None:
            raise ConfigError(f"{where(key)}: unknown key", hint=f"known keys: {', '.join(sorted(schema))}")
        expected = check(value)
        if expected is not None:
            raise ConfigError(f"{where(key)}: expected {expected}, got {value!r}"[:300])


def parse(path: Path, document: Mapping[str, Any]) -> ProjectFile:
    """Validate the tlrun table of a parsed file (pure; the tests feed it dicts)."""
    if path.name == PYPROJECT:
        tool = document.get("tool", {})
        table = tool.get("tlrun") if isinstance(tool, dict) else None
        if table is None:
            return ProjectFile(None)
    else:
        table = document
    pf = ProjectFile(path)
    if not isinstance(table, dict):
        raise ConfigError(f"{pf.where('tlrun')}: expected a table")
    workers = table.get("workers")
    top = {k: v for k, v in table.items() if k not in ("workers", "processes")}
    _check_table(top, TOP_KEYS, pf.where)
    roles: list[RoleSpec] = []
    if workers is not None:
        if not isinstance(workers, dict) or not workers:
            raise ConfigError(f"{pf.where('workers')}: expected one or more [workers.NAME] tables")
        for name, spec in workers.items():
            key = f"workers.{name}"
            if not ROLE_NAME_RE.match(name) or name in RESERVED_ROLE_NAMES:
                raise ConfigError(
                    f"{pf.where(key)}: {name!r} is not a role name tlrun can use",
                    hint="1-40 letters, digits, '_' or '-', starting with a letter or digit; "
                    "not beat, broker or flower",
                )
            if not isinstance(spec, dict):
                raise ConfigError(f"{pf.where(key)}: expected a table with at least `queues`")
            _check_table(spec, ROLE_KEYS, lambda k, key=key: pf.where(f"{key}.{k}"))  # type: ignore[misc]
            if "queues" not in spec:
                raise ConfigError(f'{pf.where(key)}: a role needs `queues`, e.g. queues = ["celery"]')
            roles.append(RoleSpec(name, dict(spec)))
    processes = parse_table(table["processes"], pf.where) if "processes" in table else ()
    taken = {r.name for r in roles} & {p.name for p in processes}
    if taken:
        name = sorted(taken)[0]
        raise ConfigError(f"{pf.where(f'processes.{name}')}: {name!r} names a role and a process: names must be unique")
    return ProjectFile(path, top, tuple(roles), processes)


def load(root: Path) -> ProjectFile:
    """`[tool.tlrun]` of root/pyproject.toml; else root/tlrun.toml; else an empty ProjectFile."""
    pyproject = root / PYPROJECT
    document = None
    if pyproject.is_file():
        document = _read(pyproject)
        found = parse(pyproject, document)
        if found.path is not None:
            return replace(found, pyproject=document)
    alt = root / TLRUN_TOML
    if alt.is_file():
        return replace(parse(alt, _read(alt)), pyproject=document)
    return ProjectFile(None, pyproject=document)
