"""Worker roles: the Celery options a role's worker runs with, and how the command line, the environment
and the project file's `[tool.tlrun.workers.NAME]` tables make the project's roles (config.py merges them
with the rest of the settings)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tlrun.errors import ConfigError, UsageError
from tlrun.ids import IMPLICIT_ROLE as IMPLICIT_ROLE
from tlrun.passthrough import check_queues, excluded_queues, refuse_excluding_every_queue, refuse_owned_options
from tlrun.project.file import LOGLEVELS, POOLS, ProjectFile, RoleSpec

ENV_PREFIX = "TLRUN_NODE_PREFIX"
ENV_CONCURRENCY = "TLRUN_CONCURRENCY"
ENV_POOL = "TLRUN_POOL"
ENV_QUEUES = "TLRUN_QUEUES"
ENV_LOGLEVEL = "TLRUN_LOGLEVEL"
ENV_MEMORY_LIMIT = "TLRUN_MEMORY_LIMIT"

MAX_PREFIX_LEN = 40
_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class WorkerOptions:
    """The Celery worker options tlrun knows by name; `extra` goes to Celery verbatim."""

    concurrency: int | None = None
    queues: str | None = None
    pool: str | None = None
    loglevel: str = "info"
    max_tasks_per_child: int | None = None
    max_memory_per_child: int | None = None
    prefetch_multiplier: int | None = None
    time_limit: float | None = None
    soft_time_limit: float | None = None
    events: bool = False
    extra: tuple[str, ...] = ()


@dataclass(frozen=True)
class Role:
    """One worker role: a group of queues, one worker process tree per launcher, its own lock and log."""

    name: str
    node_prefix: str
    worker: WorkerOptions
    expected: int = 1
    declared: bool = False  # from the project file; False for the implicit single role
    memory_limit: int | None = None  # bytes, for the worker's whole tree (PSS): tlrun's memory guard

    @property
    def queue_set(self) -> frozenset[str] | None:
        """The queues this role consumes; None when not configured (Celery's default queue)."""
        if not self.worker.queues:
            return None
        return frozenset(q.strip() for q in self.worker.queues.split(",") if q.strip())

    def owns_node(self, node: str) -> bool:
        """Is this one of the role's node names, `<prefix><pid>[-N]@host`?"""
        return re.match(rf"^{re.escape(self.node_prefix)}\d+(-\d+)?@", node) is not None

    @property
    def lock_kind(self) -> str:
        """The role's lock: `worker` for the implicit single role (as before roles), `worker-NAME` otherwise."""
        return f"worker-{self.name}" if self.declared else "worker"

    @property
    def log_stem(self) -> str:
        """`celery_<stem>_<launcher pid>.log`: the role's name, `worker` for the implicit role."""
        return self.name if self.declared else "worker"


def number(raw: Any, key: str, kind: type[int] | type[float], minimum: float, maximum: float | None = None) -> Any:
    try:
        value = kind(raw)
    except (TypeError, ValueError, OverflowError):
        name = "an integer" if kind is int else "a number"
        raise ConfigError(f"{key}={raw!r}: expected {name}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{key}={raw!r}: expected a finite number")
    if value < minimum:
        raise ConfigError(f"{key}={raw!r}: must be at least {minimum:g}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{key}={raw!r}: must be at most {maximum:g}")
    return value


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}
MIN_MEMORY_LIMIT = 16 * 1024 * 1024


def parse_size(raw: Any, key: str) -> int:
    """`200MB` (10^6), `1.5GiB` (2^30), `512m`, or a number of bytes; at least 16 MiB."""
    if isinstance(raw, bool):
        raise ConfigError(f"{key}={raw!r}: expected a size such as 200MB, 1.5GiB or a number of bytes")
    match = _SIZE_RE.match(str(raw)) if isinstance(raw, (int, float, str)) else None
    if match is None:
        raise ConfigError(f"{key}={str(raw)[:40]!r}: expected a size such as 200MB, 1.5GiB or a number of bytes")
    number_, unit, binary = match.groups()
    base = 1024 if binary or (unit and str(raw).strip()[-1:] not in "bB") else 1000
    value = int(float(number_) * base ** _SIZE_POWERS[unit.lower()])
    if value < MIN_MEMORY_LIMIT:
        raise ConfigError(f"{key}={raw!r}: must be at least 16MiB")
    return value


def validate_prefix(prefix: str) -> str:
    if not prefix or len(prefix) > MAX_PREFIX_LEN or not _PREFIX_RE.match(prefix):
        raise ConfigError(
            f"node prefix {prefix[:60]!r}{'...' if len(prefix) > 60 else ''} is invalid: "
            f"use 1-{MAX_PREFIX_LEN} letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return prefix


IMPLICIT_PREFIX = "api"
# Worker options: (command-line key, environment key, project-file key)
_ROLE_OPTIONS = (
    ("concurrency", ENV_CONCURRENCY, "concurrency"),
    ("pool", ENV_POOL, "pool"),
    ("loglevel", ENV_LOGLEVEL, "loglevel"),
    ("queues", ENV_QUEUES, "queues"),
    ("max_tasks_per_child", None, "max_tasks_per_child"),
    ("max_memory_per_child", None, "max_memory_per_child"),
    ("prefetch_multiplier", None, "prefetch_multiplier"),
    ("time_limit", None, "time_limit"),
    ("soft_time_limit", None, "soft_time_limit"),
    ("events", None, "events"),
    ("node_prefix", ENV_PREFIX, "node_prefix"),
    ("memory_limit", ENV_MEMORY_LIMIT, "memory_limit"),
)


def project_roles(cli: Mapping[str, Any], env: Mapping[str, str], pf: ProjectFile) -> tuple[Role, ...]:
    """Every role of the project with the command line and environment applied over the file's values."""
    specs = pf.roles or (RoleSpec(IMPLICIT_ROLE, {}),)
    declared = bool(pf.roles)
    roles = []
    for spec in specs:
        values: dict[str, Any] = {}
        for cli_key, env_key, file_key in _ROLE_OPTIONS:
            if cli.get(cli_key) is not None:
                values[cli_key] = (cli[cli_key], "--" + cli_key.replace("_", "-"))
            elif env_key and env.get(env_key):
                values[cli_key] = (env[env_key], env_key)
            elif file_key in spec.values:
                raw = spec.values[file_key]
                values[cli_key] = (
                    ",".join(raw) if file_key == "queues" else raw,
                    pf.where(f"workers.{spec.name}.{file_key}"),
                )
        roles.append(_role(spec, values, declared, cli))
    return tuple(roles)


def _role(spec: RoleSpec, values: Mapping[str, tuple[Any, str]], declared: bool, cli: Mapping[str, Any]) -> Role:
    def get(key: str) -> Any:
        return values[key][0] if key in values else None

    def option(key: str, kind: type[int] | type[float], minimum: float, maximum: float | None = None) -> Any:
        return None if key not in values else number(values[key][0], values[key][1], kind, minimum, maximum)

    pool = get("pool")
    if pool is not None and pool not in POOLS:
        raise ConfigError(f"{values['pool'][1]}={pool!r}: expected one of {', '.join(POOLS)}")
    loglevel = str(get("loglevel") or "info").lower()
    if loglevel not in LOGLEVELS:
        raise ConfigError(f"{values['loglevel'][1]}={loglevel!r}: expected one of {', '.join(LOGLEVELS)}")
    prefix = validate_prefix(str(get("node_prefix") or (spec.name if declared else IMPLICIT_PREFIX)))
    from_file, from_cli = tuple(spec.values.get("extra_args", ())), tuple(cli.get("extra") or ())
    refuse_owned_options(from_file, f"extra_args of role {spec.name}", declared, ConfigError)
    refuse_owned_options(from_cli, "after --", declared, UsageError)
    extra = from_file + from_cli
    if get("queues") is not None:
        check_queues(str(get("queues")), values["queues"][1])
        refuse_excluding_every_queue(
            str(get("queues")), extra, spec.name, UsageError if excluded_queues(from_cli) else ConfigError
        )
    worker = WorkerOptions(
        concurrency=option("concurrency", int, 1, 10_000),
        queues=str(get("queues")) if get("queues") else None,
        pool=pool,
        loglevel=loglevel,
        max_tasks_per_child=option("max_tasks_per_child", int, 1),
        max_memory_per_child=option("max_memory_per_child", int, 1),
        prefetch_multiplier=option("prefetch_multiplier", int, 0),
        time_limit=option("time_limit", float, 0),
        soft_time_limit=option("soft_time_limit", float, 0),
        events=bool(get("events")),
        extra=extra,
    )
    limit = parse_size(values["memory_limit"][0], values["memory_limit"][1]) if "memory_limit" in values else None
    return Role(spec.name, prefix, worker, int(spec.values.get("expected", 1)), declared, limit)
