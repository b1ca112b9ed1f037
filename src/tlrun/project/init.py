"""`tlrun init`: write `[tool.tlrun]` into pyproject.toml, with the app and one role per queue it routes to.

Other tables and comments of pyproject.toml are kept as they are (tomlkit edits the document in place).
Unlike discovery, init imports the app: the queues it routes to are only known to the running code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlrun import safefile
from tlrun.errors import AppImportError, ConfigError, TlrunError
from tlrun.project import appconfig
from tlrun.project.discover import discover_app
from tlrun.project.file import PYPROJECT, RESERVED_ROLE_NAMES
from tlrun.project.layout import Source, find_source
from tlrun.project.table import replace_table

DEFAULT_ROLE = "default"


class NotAnApp(ConfigError):
    """The value imports, and gives Celery no app: never written."""


@dataclass(frozen=True)
class InitResult:
    pyproject: Path
    created: bool  # pyproject.toml did not exist
    app: str
    found: str | None  # what discovery found, when the app was not given
    beat: bool
    roles: tuple[tuple[str, tuple[str, ...]], ...]  # (role, queues)
    dotenv: Path | None  # the .env created from .env.example
    note: str | None = None  # why the roles are a guess (the app did not import)
    source: str | None = None  # `source` written for a src/ layout
    beat_why: str | None = None  # the evidence for beat = true beyond a beat_schedule
    warnings: tuple[str, ...] = ()  # evidence discovery read and did not take


def role_name(queue: str) -> str:
    """A queue's name as a role name: letters, digits, '_' and '-', at most 40 characters."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", queue).strip("-_")[:40] or "queue"
    return f"q-{name}"[:40] if name in RESERVED_ROLE_NAMES or not name[0].isalnum() else name


def _route_queues(routes: Any) -> list[str]:
    """Queue names in task_routes: {pattern: {"queue": name}}, {pattern: "name"}, or a list of such maps."""
    maps = routes if isinstance(routes, (list, tuple)) else [routes]
    found: list[str] = []
    for route_map in maps:
        if not isinstance(route_map, dict):
            continue  # a router function: its queues cannot be read without calling it
        for target in route_map.values():
            queue = target.get("queue") if isinstance(target, dict) else target
            name = getattr(queue, "name", queue)
            if isinstance(name, str) and name:
                found.append(name)
    return found


def plan_roles(default_queue: str, queues: Iterable[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The default queue is role `default`; every other queue gets a role of its own."""
    roles: dict[str, tuple[str, ...]] = {DEFAULT_ROLE: (default_queue,)}
    for queue in queues:
        if queue == default_queue or any(queue in qs for qs in roles.values()):
            continue
        name = role_name(queue)
        while name in roles:
            name = f"{name[:37]}-{len(roles)}"
        roles[name] = (queue,)
    return tuple(roles.items())


def _app_routes(root: Path, source: Source, app: str) -> tuple[tuple[tuple[str, tuple[str, ...]], ...], bool]:
    """(roles, beat) from the app's own configuration."""
    from celery import Celery

    from tlrun.config import Settings
    from tlrun.launch.broker import load_app

    source_dir = source.directory if source.directory != root else None
    celery_app = load_app(Settings(project_root=root, app=app, broker_url=None, roles=(), source_dir=source_dir))
    if not isinstance(celery_app, Celery):
        raise NotAnApp(f"{app!r} imports, but is not a Celery app (it is {type(celery_app).__name__})")
    conf = celery_app.conf
    default_queue = str(conf.task_default_queue or "celery")
    queues = _route_queues(conf.task_routes or {})
    queues += [str(getattr(q, "name", q)) for q in conf.task_queues or ()]
    scheduler = str(conf.beat_scheduler or "")
    own_scheduler = scheduler not in ("", "celery.beat:PersistentScheduler", "celery.beat.PersistentScheduler")
    return plan_roles(default_queue, queues), bool(conf.beat_schedule) or own_scheduler


def render_table(
    app: str, beat: bool, roles: tuple[tuple[str, tuple[str, ...]], ...], source: str | None = None
) -> Any:
    import tomlkit

    table = tomlkit.table()
    table.add(tomlkit.comment("Written by `tlrun init`. Keys: see tlrun's docs/configuration.md."))
    table.add("app", app)
    if source is not None:
        table.add("source", source)
    table.add("beat", beat)
    workers = tomlkit.table(is_super_table=True)
    for name, queues in roles:
        role = tomlkit.table()
        role.add("queues", list(queues))
        workers.add(name, role)
    table.add("workers", workers)
    return table


def init_project(root: Path, app: str | None = None, force: bool = False, cwd: Path | None = None) -> InitResult:
    import tomlkit
    from tomlkit.exceptions import ParseError

    path = root / PYPROJECT
    try:
        text = safefile.read_text(path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        document = tomlkit.parse(text) if text is not None else tomlkit.document()
    except ParseError as exc:
        raise ConfigError(f"{path}: TOML syntax error: {exc}") from None
    tool = document.get("tool")
    if tool is not None and "tlrun" in tool and not force:
        raise ConfigError(f"{path} already has [tool.tlrun]", hint="edit it by hand, or run tlrun init --force")
    old = tool.get("tlrun") if tool is not None else None
    declared = old.get("source") if isinstance(old, dict) and isinstance(old.get("source"), str) else None
    source = find_source(root, document.unwrap(), declared)
    written_source = source.directory.relative_to(root).as_posix() if source.directory != root else None
    found = None
    warnings: tuple[str, ...] = ()
    if app is None:
        discovery = discover_app(root, source, cwd=cwd)
        app, found, warnings = discovery.app, discovery.found, discovery.warnings
        if discovery.import_root and source.directory == root:  # the folder the app imports from
            source = Source(root / discovery.import_root, f"the app imports from {discovery.import_root}/")
            written_source = discovery.import_root
    note = None
    try:
        roles, beat = _app_routes(root, source, app)
    except NotAnApp:
        raise
    except AppImportError as exc:
        if _not_an_app(exc):
            raise ConfigError(f"{exc}: not written", hint="name the module that creates the app with -A") from None
        roles, beat, note = _from_text(root, source, str(exc))
    except TlrunError as exc:
        roles, beat, note = _from_text(root, source, str(exc))
    except Exception as exc:  # Django loads its settings lazily: ImproperlyConfigured, no Django
        missing = f"ModuleNotFoundError: {exc}" if isinstance(exc, ImportError) else f"{type(exc).__name__}: {exc}"
        roles, beat, note = _from_text(root, source, f"the app's settings do not load here ({missing})")
    beat_why = None
    if not beat:
        beat_why = appconfig.beat_evidence(root, source.directory, app)
        beat = beat_why is not None
    table = render_table(app, beat, roles, written_source)
    if text is not None and tool is not None and "tlrun" in tool:
        new_text = replace_table(text, table)
    else:
        if tool is None:
            document["tool"] = tomlkit.table(is_super_table=True)
            tool = document["tool"]
        tool["tlrun"] = table
        new_text = tomlkit.dumps(document)
    try:
        safefile.write_atomic(path, new_text)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
    return InitResult(
        path,
        text is None,
        app,
        found,
        beat,
        roles,
        _dotenv_from_example(root),
        note,
        written_source,
        beat_why,
        warnings,
    )


def _not_an_app(exc: AppImportError) -> bool:
    """Did the module import and hold no app (Celery's find_app: 'has no attribute')?"""
    return "AttributeError: module" in str(exc) and "has no attribute" in str(exc)


def _from_text(root: Path, source: Source, why: str) -> tuple[tuple[tuple[str, tuple[str, ...]], ...], bool, str]:
    """The roles the settings name as text (Django-namespaced queues), when the app cannot be loaded here."""
    default, queues = appconfig.namespaced_queues(root, source.directory)
    roles = plan_roles(default or "celery", queues)
    wrote = "wrote the roles the settings name as text" if queues else "wrote a single default role"
    return roles, False, f"{why}; {wrote}"


def _dotenv_from_example(root: Path) -> Path | None:
    example, dotenv = root / ".env.example", root / ".env"
    if dotenv.exists() or dotenv.is_symlink():
        return None
    try:
        text = safefile.read_text(example)
        if text is None:
            return None
        safefile.write_atomic(dotenv, text, mode=0o600)
    except OSError:
        return None
    return dotenv
