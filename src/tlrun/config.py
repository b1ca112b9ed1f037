"""Settings: one object, one precedence (command line > process environment > .env > defaults).

Everything here is pure: `build_settings` takes the three sources as plain mappings, so the precedence is
tested without touching the real environment.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlrun.errors import ConfigError

# Every environment key tlrun reads; .env.example documents each one.
ENV_APP = "CELERY_APP"
ENV_BROKER = "CELERY_BROKER_URL"
ENV_BROKER_FALLBACK = "REDIS_URL"
ENV_PREFIX = "TLRUN_NODE_PREFIX"
ENV_LOG_DIR = "TLRUN_LOG_DIR"
ENV_EXPECTED = "TLRUN_EXPECTED_WORKERS"
ENV_READY_TIMEOUT = "TLRUN_READY_TIMEOUT"
ENV_GRACE = "TLRUN_STOP_GRACE"
ENV_PING_WINDOW = "TLRUN_PING_WINDOW"
ENV_CONCURRENCY = "TLRUN_CONCURRENCY"
ENV_POOL = "TLRUN_POOL"
ENV_QUEUES = "TLRUN_QUEUES"
ENV_LOGLEVEL = "TLRUN_LOGLEVEL"

# Set by tlrun on every worker it starts.
ENV_GUARD = "TL_CELERY_STARTED"  # launcher identity "<pid>:<create_time>"
ENV_MARKER = "TLRUN_PROJECT"  # project id: sha of project root + app
ENV_NODE = "TLRUN_NODE"  # node name given to the worker

MAX_PREFIX_LEN = 40
_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
POOLS = ("prefork", "solo", "threads", "gevent", "eventlet", "processes")
LOGLEVELS = ("debug", "info", "warning", "error", "critical", "fatal")


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
class Settings:
    project_root: Path
    app: str
    broker_url: str | None
    node_prefix: str = "api"
    log_dir: Path = Path("logs")
    expected_workers: int = 1
    ready_timeout: float = 30.0
    stop_grace: float = 30.0
    ping_window: float = 1.0
    strict: bool = False
    sweep: bool = True
    replace: bool = False
    worker: WorkerOptions = field(default_factory=WorkerOptions)
    # The environment the worker gets: process environment over .env values.
    environ: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def project_id(self) -> str:
        return project_id(self.project_root, self.app)


def project_id(root: Path, app: str) -> str:
    """A short stable id for (project directory, app): the sweep's marker and the lock's name."""
    digest = hashlib.sha256(f"{os.path.realpath(root)}\0{app}".encode()).hexdigest()
    return digest[:16]


def read_dotenv(path: Path) -> dict[str, str]:
    """The variables of a .env file; a line python-dotenv cannot parse is a ConfigError with file and line."""
    if not path.is_file():
        return {}
    from dotenv import dotenv_values
    from dotenv.parser import parse_stream

    try:
        with path.open(encoding="utf-8") as stream:
            for binding in parse_stream(stream):
                if binding.error:
                    # Never echo the line: it may hold a secret. The line number is enough to find it.
                    raise ConfigError(f"{path}:{binding.original.line}: malformed line in .env (expected KEY=VALUE)")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
    return {k: v for k, v in dotenv_values(path).items() if v is not None}


def _number(raw: Any, key: str, kind: type[int] | type[float], minimum: float) -> Any:
    try:
        value = kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={raw!r}: expected a {kind.__name__}") from None
    if value < minimum:
        raise ConfigError(f"{key}={raw!r}: must be at least {minimum:g}")
    return value


def validate_prefix(prefix: str) -> str:
    if not prefix or len(prefix) > MAX_PREFIX_LEN or not _PREFIX_RE.match(prefix):
        raise ConfigError(
            f"node prefix {prefix[:60]!r}{'...' if len(prefix) > 60 else ''} is invalid: "
            f"use 1-{MAX_PREFIX_LEN} letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return prefix


def build_settings(
    cli: Mapping[str, Any],
    environ: Mapping[str, str],
    dotenv: Mapping[str, str],
    project_root: Path,
    ping_window_default: float = 1.0,
) -> Settings:
    """Merge the sources. `cli` holds only the options given on the command line (None means not given)."""
    merged_env: dict[str, str] = {**dotenv, **environ}  # the process environment wins over .env

    def pick(cli_key: str, *env_keys: str) -> tuple[Any, str]:
        value = cli.get(cli_key)
        if value is not None:
            return value, "--" + cli_key.replace("_", "-")
        for key in env_keys:
            if merged_env.get(key):
                return merged_env[key], key
        return None, ""

    app, _ = pick("app", ENV_APP)
    if not app:
        raise ConfigError("no Celery app given", hint="pass -A/--app (e.g. -A proj.celery) or set CELERY_APP in .env")
    broker, _ = pick("broker", ENV_BROKER, ENV_BROKER_FALLBACK)

    def num(cli_key: str, env_key: str, kind: type[int] | type[float], default: Any, minimum: float) -> Any:
        raw, source = pick(cli_key, env_key)
        return default if raw is None else _number(raw, source, kind, minimum)

    prefix_raw, _ = pick("node_prefix", ENV_PREFIX)
    prefix = validate_prefix(str(prefix_raw) if prefix_raw is not None else "api")
    log_dir_raw, _ = pick("log_dir", ENV_LOG_DIR)
    log_dir = Path(log_dir_raw) if log_dir_raw else Path("logs")
    if not log_dir.is_absolute():
        log_dir = project_root / log_dir

    pool, pool_src = pick("pool", ENV_POOL)
    if pool is not None and pool not in POOLS:
        raise ConfigError(f"{pool_src}={pool!r}: expected one of {', '.join(POOLS)}")
    loglevel, level_src = pick("loglevel", ENV_LOGLEVEL)
    loglevel = str(loglevel or "info").lower()
    if loglevel not in LOGLEVELS:
        raise ConfigError(f"{level_src}={loglevel!r}: expected one of {', '.join(LOGLEVELS)}")
    queues, _ = pick("queues", ENV_QUEUES)

    worker = WorkerOptions(
        concurrency=num("concurrency", ENV_CONCURRENCY, int, None, 1),
        queues=str(queues) if queues else None,
        pool=pool,
        loglevel=loglevel,
        max_tasks_per_child=cli.get("max_tasks_per_child"),
        max_memory_per_child=cli.get("max_memory_per_child"),
        prefetch_multiplier=cli.get("prefetch_multiplier"),
        time_limit=cli.get("time_limit"),
        soft_time_limit=cli.get("soft_time_limit"),
        events=bool(cli.get("events")),
        extra=tuple(cli.get("extra") or ()),
    )
    return Settings(
        project_root=project_root,
        app=str(app),
        broker_url=str(broker) if broker else None,
        node_prefix=prefix,
        log_dir=log_dir,
        expected_workers=num("expected_workers", ENV_EXPECTED, int, 1, 1),
        ready_timeout=num("ready_timeout", ENV_READY_TIMEOUT, float, 30.0, 0.5),
        stop_grace=num("stop_grace", ENV_GRACE, float, 30.0, 0),
        ping_window=num("ping_window", ENV_PING_WINDOW, float, ping_window_default, 0.1),
        strict=bool(cli.get("strict")),
        sweep=cli.get("sweep", True) is not False,
        replace=bool(cli.get("replace")),
        worker=worker,
        environ=merged_env,
    )


DEV_QUIET_FLAGS = ("--without-mingle", "--without-gossip")


def dev_extra(extra: tuple[str, ...] | list[str], chatter: bool) -> tuple[str, ...]:
    """Dev defaults for `celery worker`: skip the cluster start-up chatter unless asked (or already given)."""
    if chatter:
        return tuple(extra)
    return tuple(flag for flag in DEV_QUIET_FLAGS if flag not in extra) + tuple(extra)


def load_settings(
    cli: Mapping[str, Any], project_root: Path | None = None, ping_window_default: float = 1.0
) -> Settings:
    """Read the real sources: the project's .env and os.environ."""
    root = Path(project_root or os.getcwd()).resolve()
    if not root.is_dir():
        raise ConfigError(f"project directory {root} does not exist")
    return build_settings(cli, os.environ, read_dotenv(root / ".env"), root, ping_window_default)
