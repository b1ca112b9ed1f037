"""Settings: one object, one precedence (command line > process environment > .env > project file > defaults).

Everything here is pure: `build_settings` takes the three sources as plain mappings, so the precedence is
tested without touching the real environment.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from tlrun import redact
from tlrun.envfile import read_dotenv
from tlrun.errors import ConfigError, UsageError
from tlrun.ids import project_id as project_id
from tlrun.limits import MAX_SECONDS
from tlrun.project.file import ProjectFile, RoleSpec
from tlrun.project.processes import ProcessSpec, Stack
from tlrun.roles import (
    ENV_CONCURRENCY,
    ENV_LOGLEVEL,
    ENV_MEMORY_LIMIT,
    ENV_POOL,
    ENV_PREFIX,
    ENV_QUEUES,
    IMPLICIT_PREFIX,
    IMPLICIT_ROLE,
    Role,
    WorkerOptions,
    number,
    project_roles,
    validate_prefix,
)

if TYPE_CHECKING:
    from tlrun.project.discover import Discovery

# Names of roles.py the settings re-export (config.py held them before roles.py did).
__all__ = [
    "ENV_CONCURRENCY",
    "ENV_LOGLEVEL",
    "ENV_MEMORY_LIMIT",
    "ENV_POOL",
    "ENV_PREFIX",
    "ENV_QUEUES",
    "IMPLICIT_PREFIX",
    "IMPLICIT_ROLE",
    "Role",
    "WorkerOptions",
    "number",
    "project_roles",
    "validate_prefix",
]

# Every environment key tlrun reads; .env.example documents each one.
ENV_APP = "CELERY_APP"
ENV_BROKER = "CELERY_BROKER_URL"
ENV_BROKER_FALLBACK = "REDIS_URL"
ENV_LOG_DIR = "TLRUN_LOG_DIR"
ENV_EXPECTED = "TLRUN_EXPECTED_WORKERS"
ENV_READY_TIMEOUT = "TLRUN_READY_TIMEOUT"
ENV_GRACE = "TLRUN_STOP_GRACE"
ENV_PING_WINDOW = "TLRUN_PING_WINDOW"
ENV_BEAT_LOCK_TTL = "TLRUN_BEAT_LOCK_TTL"
ENV_STUCK_AFTER = "TLRUN_STUCK_AFTER"
ENV_CONSUME_CHECK_EVERY = "TLRUN_CONSUME_CHECK_EVERY"
ENV_HUNG_AFTER = "TLRUN_HUNG_AFTER"
ENV_FENCE_CHECK = "TLRUN_FENCE_CHECK"  # read by the worker's shim (launch/fencecheck.py)

# Set by tlrun on every worker it starts.
ENV_GUARD = "TL_CELERY_STARTED"  # launcher identity "<pid>:<create_time>"
ENV_MARKER = "TLRUN_PROJECT"  # project id: sha of project root + app
ENV_NODE = "TLRUN_NODE"  # node name given to the worker
ENV_ROLE = "TLRUN_ROLE"  # the role the worker runs


@dataclass(frozen=True)
class Settings:
    project_root: Path
    app: str
    broker_url: str | None  # from -b or the environment/.env; None: the app's own broker_url
    roles: tuple[Role, ...]  # the roles this command runs or looks at
    all_roles: tuple[Role, ...] = ()  # every role of the project (doctor, stop, the sweep)
    log_dir: Path = Path("logs")
    expected_workers: int = 1  # the roles this command runs (--expected overrides)
    ready_timeout: float = 30.0
    stop_grace: float = 30.0
    ping_window: float = 1.0
    strict: bool = False
    sweep: bool = True
    replace: bool = False
    beat: bool = False  # the project file's `beat = true`: dev also runs beat
    project_file: Path | None = None
    # The environment the worker gets: process environment over .env values.
    environ: Mapping[str, str] = field(default_factory=dict, repr=False)
    notes: tuple[tuple[str, str], ...] = ()  # (level, message) for the CLI to show once: discovery, warnings
    log_dir_given: bool = False  # set by --log-dir, TLRUN_LOG_DIR or the project file (as PID 1: log files)
    project_name: str | None = None  # the project file's `name`: with the app, names the cluster's beat lease
    beat_lock_ttl: float = 30.0  # the beat lease's time to live on the broker
    stuck_after: float = 60.0  # an idle worker with messages waiting this long on its queue is not consuming
    consume_check_every: float = 30.0  # how often `tlrun worker` checks that its workers consume
    hung_after: float = 3600.0  # a task without a hard time limit running longer than this is HUNG_TASK
    source_dir: Path | None = None  # where the code lives when not at the root (a src/ layout)
    processes: tuple[ProcessSpec, ...] = ()  # the stack's other processes (dev runs them)
    release: ProcessSpec | None = None  # a Procfile's `release` line: run once before the stack starts
    flower: bool = False  # the project file's `flower = true`: dev also runs Flower
    stack_notes: tuple[str, ...] = ()  # what dev says of the Procfile it read (its celery lines)

    @property
    def code_root(self) -> Path:
        """The folder the project's top-level modules are in: first on the workers' PYTHONPATH."""
        return self.source_dir or self.project_root

    @property
    def import_path(self) -> tuple[Path, ...]:
        """Where the project's modules are imported from, in order: the code root, then the project root.
        The worker runs in the root and Celery puts the current folder on sys.path for the app and its task
        modules (`import_from_cwd`), so in a src/ layout a package at the root (an `examples/` beside `src/`)
        imports too: tlrun's own checks and imports look where the worker will find it."""
        return tuple(dict.fromkeys((self.code_root, self.project_root)))

    def pythonpath(self, current: str | None) -> str | None:
        """The PYTHONPATH a child gets: the source folder first in a src/ layout, then what it had. (The root
        needs no entry: workers run `python -m` in it, which puts it first on sys.path already.)"""
        if self.source_dir is None:
            return current
        return os.pathsep.join(p for p in (str(self.source_dir), current or "") if p)

    @property
    def project_id(self) -> str:
        return project_id(self.project_root, self.app)

    @property
    def role(self) -> Role:
        """The first role this command runs (the only one without a project file's roles)."""
        return self.roles[0]

    @property
    def role_filter(self) -> tuple[Role, ...] | None:
        """The roles a project-wide command (sweep, stop, doctor --fix) is limited to; None: all of them."""
        return None if self.roles == self.all_roles else self.roles

    @property
    def declared_roles(self) -> bool:
        return any(r.declared for r in self.all_roles)


def check_broker_url(url: str, source: str) -> None:
    """A broker URL the transports can parse, or a clear error naming where it came from (never the URL's
    password): exit 2 from the command line, 3 from the environment, .env or the app."""
    error = UsageError if source.startswith("-") else ConfigError
    shown = redact.redact_url(url)
    if "://" not in url:
        raise error(f"{source}: {shown} is not a URL (expected scheme://host...)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise error(
            f"{source}: broker URL {shown} cannot be parsed ({redact.mask(str(exc))})",
            hint="a password holding '#', '/', '?', '@' or ':' must be percent-encoded (# is %23, / is %2F)",
        ) from None
    if port == 0:  # kombu reads port 0 as "its default port": another broker, silently
        raise error(f"{source}: broker URL {shown} has port 0", hint="give the broker's real port")


def build_settings(
    cli: Mapping[str, Any],
    environ: Mapping[str, str],
    dotenv: Mapping[str, str],
    project_root: Path,
    ping_window_default: float = 1.0,
    project: ProjectFile | None = None,
    discover: Callable[[], Discovery] | None = None,
    app_required: bool = True,
    source_dir: Path | None = None,
    stack: Stack | None = None,
) -> Settings:
    """Merge the sources. `cli` holds only the options given on the command line (None means not given).

    Precedence: command line, process environment, .env, project file, defaults. `discover` finds the app
    when no source names it.
    """
    merged_env: dict[str, str] = {**dotenv, **environ}  # the process environment wins over .env
    pf = project or ProjectFile(None)
    notes: list[tuple[str, str]] = []
    stack = stack or Stack()
    stack_notes = list(stack.notes)
    if stack.roles and pf.roles:
        stack_notes.append(f"the project file declares roles: {stack.source}'s worker lines do not run")
    elif stack.roles:  # a Procfile's celery worker lines are the project's roles
        stack_notes = [*stack.role_notes, *stack_notes]
        pf = dataclasses.replace(pf, roles=tuple(RoleSpec(name, table) for name, table in stack.roles))

    def pick(cli_key: str, *env_keys: str, file_key: str | None = None) -> tuple[Any, str]:
        value = cli.get(cli_key)
        if value is not None:
            return value, "--" + cli_key.replace("_", "-")
        for key in env_keys:
            if merged_env.get(key):
                return merged_env[key], key
        if file_key is not None and file_key in pf.values:
            return pf.values[file_key], pf.where(file_key)
        return None, ""

    app, _ = pick("app", ENV_APP, file_key="app")
    found = None
    if not app and stack.app:  # the Procfile's `celery -A`: said like any app tlrun finds, checked the same way
        try:
            found = discover() if discover is not None else None
        except ConfigError:
            found = None  # other run files disagree: the stack's own Procfile decides
        if found is None or found.app == stack.app or not found.warnings:
            app = stack.app  # said by the Procfile (and agreed with, or not contradicted, by the source)
            pin = "pin it with `tlrun init` or [tool.tlrun] app"
            notes.append(("info", f"using app {app} ({stack.app_evidence}; {pin})"))
            if found is not None and found.app == app and found.import_root and source_dir is None:
                source_dir = project_root / found.import_root
    if not app:
        if discover is None:
            raise ConfigError(
                "no Celery app given", hint="pass -A/--app (e.g. -A proj.celery) or set CELERY_APP in .env"
            )
        found = found or discover()
        app = found.app
        notes.append(("info", f"using app {app} ({found.found}; pin it with `tlrun init` or [tool.tlrun] app)"))
        notes.extend(("warning", warning) for warning in found.warnings)
        if found.import_root and source_dir is None:
            source_dir = project_root / found.import_root  # where the app imports from: on the workers' path
    broker = cli.get("broker")
    if broker is not None and broker == "":
        raise UsageError("-b/--broker is empty", hint="give a URL such as redis://127.0.0.1:6379/0, or leave it out")
    if broker and redact.secrets_of(broker):
        notes.append(
            (
                "warning",
                "the broker URL given with -b holds a password, which every user can read in `ps`: "
                "pass it in .env or CELERY_BROKER_URL instead",
            )
        )
    broker_source = "-b/--broker"
    if broker is None:
        broker, broker_source = pick("broker", ENV_BROKER, ENV_BROKER_FALLBACK)
    redact.register(broker)
    if broker:
        check_broker_url(str(broker), broker_source)

    def num(cli_key: str, env_key: str, kind: type[int] | type[float], default: Any, minimum: float) -> Any:
        raw, source = pick(cli_key, env_key, file_key=_FILE_KEYS.get(cli_key, cli_key))
        maximum = MAX_SECONDS if kind is float else None  # every float here is a duration
        return default if raw is None else number(raw, source, kind, minimum, maximum)

    log_dir_raw, _ = pick("log_dir", ENV_LOG_DIR, file_key="log_dir")
    if log_dir_raw and any(c in str(log_dir_raw) for c in "\n\r\0"):
        raise ConfigError(f"log directory {str(log_dir_raw)[:80]!r} has a line break or a NUL byte")
    log_dir = Path(log_dir_raw) if log_dir_raw else Path("logs")
    if not log_dir.is_absolute():
        log_dir = project_root / log_dir

    all_roles = project_roles(cli, merged_env, pf)
    wanted = cli.get("role")
    if wanted:
        roles = tuple(r for r in all_roles if r.name == wanted)
        if not roles:
            names = ", ".join(r.name for r in all_roles)
            raise ConfigError(f"no role named {wanted!r} in this project (roles: {names})")
    else:
        roles = all_roles
    if len(roles) > 1:
        for cli_key, env_key, _f in (("queues", ENV_QUEUES, ""), ("node_prefix", ENV_PREFIX, "")):
            _value, source = pick(cli_key, env_key)
            if source:
                raise ConfigError(
                    f"{source} would give all {len(roles)} roles the same value",
                    hint="choose one role with --role NAME, or set it per role in the project file",
                )
    processes = pf.processes or stack.processes
    clash = sorted({p.name for p in processes} & {r.name for r in all_roles})
    if clash:
        raise ConfigError(f"{clash[0]!r} names both a worker role and a process: unit names must be unique")
    return Settings(
        project_root=project_root,
        app=str(app),
        broker_url=str(broker) if broker else None,
        roles=roles,
        all_roles=all_roles,
        log_dir=log_dir,
        expected_workers=num("expected_workers", ENV_EXPECTED, int, sum(r.expected for r in roles), 1),
        ready_timeout=num("ready_timeout", ENV_READY_TIMEOUT, float, 30.0, 0.5),
        stop_grace=num("stop_grace", ENV_GRACE, float, 30.0, 0),
        ping_window=num("ping_window", ENV_PING_WINDOW, float, ping_window_default, 0.1),
        strict=bool(cli.get("strict")),
        sweep=cli.get("sweep", True) is not False,
        replace=bool(cli.get("replace")),
        beat=bool(pf.values.get("beat", False)) or stack.beat,
        project_file=pf.path,
        environ=merged_env,
        notes=tuple(notes),
        log_dir_given=log_dir_raw is not None,
        project_name=pf.values.get("name"),
        beat_lock_ttl=num("beat_lock_ttl", ENV_BEAT_LOCK_TTL, float, 30.0, 2),
        stuck_after=num("stuck_after", ENV_STUCK_AFTER, float, 60.0, 1),
        consume_check_every=num("consume_check_every", ENV_CONSUME_CHECK_EVERY, float, 30.0, 0.5),
        hung_after=num("hung_after", ENV_HUNG_AFTER, float, 3600.0, 0.5),
        source_dir=source_dir,
        processes=processes,
        release=stack.release if not pf.processes else None,
        flower=bool(pf.values.get("flower", False)),
        stack_notes=tuple(stack_notes),
    )


# Settings whose project-file key differs from the command-line key.
_FILE_KEYS = {"stop_grace": "grace", "expected_workers": "expected"}


DEV_QUIET_FLAGS = ("--without-mingle", "--without-gossip")


def dev_extra(extra: tuple[str, ...] | list[str], chatter: bool) -> tuple[str, ...]:
    """Dev defaults for `celery worker`: skip the cluster start-up chatter unless asked (or already given)."""
    if chatter:
        return tuple(extra)
    return tuple(flag for flag in DEV_QUIET_FLAGS if flag not in extra) + tuple(extra)


def load_settings(
    cli: Mapping[str, Any],
    project_root: Path | None = None,
    ping_window_default: float = 1.0,
    app_required: bool = True,
) -> Settings:
    """Read the real sources: the project file, the project's .env and os.environ."""
    from tlrun.project import file as project_file
    from tlrun.project.layout import find_root, find_source

    if project_root is not None:
        root = Path(project_root).resolve()
        if not root.is_dir():
            raise ConfigError(f"project directory {root} does not exist")
    else:
        root = find_root(Path(os.getcwd()))
    pf = project_file.load(root)
    dotenv = read_dotenv(root / ".env")
    stack = None
    if not pf.processes:  # without a processes table: a Procfile.dev or Procfile
        from tlrun.project.processes import find_procfile, read_procfile

        procfile = find_procfile(root)
        stack = read_procfile(procfile, {**dotenv, **os.environ}) if procfile is not None else None
    declared = pf.values.get("source")
    source = find_source(root, dict(pf.pyproject or {}), str(declared) if declared is not None else None)
    return build_settings(
        cli,
        os.environ,
        dotenv,
        root,
        ping_window_default,
        project=pf,
        discover=lambda: _discover(root, source),
        app_required=app_required,
        source_dir=source.directory if source.directory != root else None,
        stack=stack,
    )


def _runtime_or_none() -> Path | None:
    """The runtime directory for the discovery cache; None (no cache) when it cannot be made safely."""
    from tlrun.errors import TlrunError
    from tlrun.launch.guard import runtime_dir

    try:
        return runtime_dir(os.environ)
    except (TlrunError, OSError):
        return None


def _discover(root: Path, source: Any) -> Any:
    """Discovery (and its imports) only when no app was given."""
    from tlrun.project.discover import discover_cached

    return discover_cached(root, source, _runtime_or_none(), Path(os.getcwd()).resolve())
