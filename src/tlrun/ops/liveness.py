"""`tlrun health --liveness`: is each role's worker on this host alive, from local evidence only (its lock
record, its process, its heartbeat file): no broker round trip, no Celery, no app. A broker outage never
makes a worker "dead" here; that is readiness's business.

A probe runs every few seconds in every pod, so it must cost little CPU: this module imports the standard
library and tlrun's light modules only (no click, psutil, dataclasses or the configuration's machinery), and
`fast_health` answers the documented probe commands (`tlrun health --liveness [-A APP] [--role R]
[--window N] [--project-dir D]`) before the command line is even parsed by click. It takes the app and the
roles from the places the full configuration reads first (the command line, CELERY_APP, the project file's `app` and
`[tool.tlrun.workers.*]`); anything it does not read itself (a CELERY_APP in .env, a Procfile's roles, an
app found by discovery, a malformed project file, another option) makes it step aside for the full command,
which answers the same question the same way.
"""

from __future__ import annotations

import json
import os
import sys
import time

from tlrun.errors import HEALTH_DEAD_EXIT_CODE, HEALTH_UNKNOWN_EXIT_CODE
from tlrun.launch import rundir
from tlrun.launch.rundir import create_time_of

TYPE_CHECKING = False  # neither typing nor dataclasses at run time: they cost a probe more CPU than its work
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

    from tlrun.config import Settings

DEFAULT_WINDOW = 30.0
MAX_WINDOW = 366 * 86400.0


class Liveness:
    __slots__ = ("alive", "why")

    def __init__(self, alive: bool, why: str) -> None:
        self.alive, self.why = alive, why


class RoleLiveness:
    __slots__ = ("alive", "exit_code", "node", "role", "why")

    def __init__(self, role: str, node: str | None, alive: bool, why: str, exit_code: int) -> None:
        self.role, self.node, self.alive, self.why = role, node, alive, why
        self.exit_code = exit_code  # 0, 14 (a process that shows no progress), 15 (none)


def _state(pid: int) -> bytes | None:
    """The process's state letter from /proc (R, S, T, Z...), None when gone; psutil where /proc is not."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0]
    except FileNotFoundError:
        return None
    except OSError:
        import psutil

        try:
            status = psutil.Process(pid).status()
        except psutil.Error:
            return None
        return {psutil.STATUS_STOPPED: b"T", psutil.STATUS_ZOMBIE: b"Z"}.get(status, b"S")


def _started(pid: int) -> float | None:
    found = create_time_of(pid)
    if found is not None:
        return found
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None


def check(
    pid: int, path: str | None, started: float, window: float = DEFAULT_WINDOW, now: float | None = None
) -> Liveness:
    """Is the worker `pid` alive, from its process and its heartbeat file (`started`: when it was spawned)?"""
    now = time.time() if now is None else now
    state = _state(pid)
    if state is None:
        return Liveness(False, f"worker pid {pid} is gone")
    if state in (b"T", b"t"):
        return Liveness(False, f"worker pid {pid} is stopped (SIGSTOP or a debugger)")
    try:
        with open(path or "", "rb") as fh:
            beat = json.loads(fh.read(4096))
    except (OSError, ValueError):
        beat = None
    if beat is None:
        if now - started < window:
            return Liveness(True, f"starting ({now - started:.0f} s, no heartbeat yet)")
        return Liveness(False, f"no heartbeat in {now - started:.0f} s since its start")
    age = now - float(beat.get("t", 0))
    busy_since, limit = beat.get("busy_since"), beat.get("limit")
    if busy_since is not None:
        running = now - float(busy_since)
        if limit is None:
            return Liveness(True, f"running a task for {running:.0f} s (no time limit)")
        if running <= float(limit) + window:
            return Liveness(True, f"running a task for {running:.0f} s (time limit {float(limit):g} s)")
        return Liveness(False, f"a task has run {running:.0f} s, past its time limit of {float(limit):g} s")
    if age <= window:
        reconnecting = beat.get("reconnecting_since")
        if reconnecting is not None:
            return Liveness(True, f"retrying its broker connection for {now - float(reconnecting):.0f} s")
        return Liveness(True, f"heartbeat {age:.0f} s ago")
    return Liveness(False, f"no heartbeat for {age:.0f} s (window {window:g} s): its event loop is wedged")


def _holder_alive(record: dict[str, Any] | None) -> bool:
    """Does the launcher the lock record names still run (same pid and create time, not a zombie)?"""
    holder = rundir.holder_of(record)
    if holder is None:
        return False
    created = _started(holder[0])
    return created is not None and abs(created - holder[1]) < 0.01 and _state(holder[0]) not in (None, b"Z")


def check_locks(project_id: str, roles: Sequence[tuple[str, str]], window: float) -> list[RoleLiveness]:
    """Each (role, lock kind) of the project on this host, from its lock record, process and heartbeat."""
    found = []
    for role, lock_kind in roles:
        try:
            record = rundir.read_record(rundir.lock_file(project_id, lock_kind))
        except Exception:  # an unusable lock directory: nothing runs from it
            record = None
        if not record or not _holder_alive(record):
            found.append(RoleLiveness(role, None, False, "no tlrun launcher runs it here", HEALTH_DEAD_EXIT_CODE))
            continue
        node = str(record.get("node") or "") or None
        pid = record.get("worker_pid")
        holder = rundir.holder_of(record)
        if record.get("in_process") and holder is not None:  # debug mode: the worker is the launcher itself
            pid = holder[0]
        if not isinstance(pid, int):
            state = record.get("state") or "starting"
            found.append(RoleLiveness(role, node, True, f"{state} (its launcher runs)", 0))
            continue
        live = check(pid, record.get("heartbeat"), _started(pid) or time.time(), window)
        if live.alive or record.get("in_process"):
            found.append(RoleLiveness(role, node, True, live.why, 0))
        else:
            code = HEALTH_DEAD_EXIT_CODE if "gone" in live.why else HEALTH_UNKNOWN_EXIT_CODE
            found.append(RoleLiveness(role, node, False, live.why, code))
    return found


def check_roles(settings: Settings, window: float) -> list[RoleLiveness]:
    return check_locks(settings.project_id, [(r.name, r.lock_kind) for r in settings.roles], window)


def report(results: Sequence[RoleLiveness]) -> tuple[list[str], int]:
    """The lines `tlrun health --liveness` prints, and its exit code."""
    lines = [f"tlrun: {r.node or f'role {r.role}'}: {'alive' if r.alive else 'not alive'} ({r.why})" for r in results]
    return lines, max((r.exit_code for r in results), default=0)


# -- the fast path: the documented probe commands, before click --------------------------------------------
def _options(argv: Sequence[str]) -> dict[str, str] | None:
    """`health --liveness` with -A/--app, --role, --window, --project-dir only (any order, `--x=v` too); else
    None."""
    if not argv or argv[0] != "health":
        return None
    found: dict[str, str] = {}
    names = {"-A": "app", "--app": "app", "--role": "role", "--window": "window", "--project-dir": "project_dir"}
    words = list(argv[1:])
    while words:
        word = words.pop(0)
        if word == "--liveness":
            found["liveness"] = "1"
            continue
        name, eq, value = word.partition("=")
        if name not in names:
            return None
        if not eq:
            if not words:
                return None
            value = words.pop(0)
        if names[name] in found or not value:
            return None
        found[names[name]] = value
    return found if "liveness" in found else None


def _project(root: str, app: str | None) -> tuple[str, list[tuple[str, str]]] | None:
    """(app, [(role, lock kind)]) as the full configuration has them, when the project file says so plainly."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

    from tlrun.project import rootfind

    dotenv = os.path.join(root, ".env")
    if not app and os.path.exists(dotenv):
        try:
            with open(dotenv, "rb") as fh:
                if b"CELERY_APP" in fh.read(1 << 20):
                    return None  # .env may name the app: the full command reads it
        except OSError:
            return None
    table: Any = None
    for name in (rootfind.PYPROJECT, rootfind.TLRUN_TOML):
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, "rb") as fh:
                document = tomllib.loads(fh.read().decode("utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError):
            return None
        table = document.get("tool", {}).get("tlrun") if name == rootfind.PYPROJECT else document
        if table is not None:
            break
    table = table if table is not None else {}
    if not isinstance(table, dict):
        return None
    app = app or table.get("app")
    workers = table.get("workers", {})
    if not isinstance(app, str) or not app or not isinstance(workers, dict):
        return None
    if not all(isinstance(spec, dict) for spec in workers.values()):
        return None
    if workers:
        return app, [(name, f"worker-{name}") for name in workers]
    if any(os.path.exists(os.path.join(root, name)) for name in ("Procfile", "Procfile.dev")):
        return None  # a Procfile's worker lines may be the roles
    from tlrun.ids import IMPLICIT_ROLE

    return app, [(IMPLICIT_ROLE, "worker")]


def fast_health(argv: Sequence[str]) -> int | None:
    """Answer `tlrun health --liveness ...` and return its exit code, or None to let the full command run."""
    options = _options(argv)
    if options is None:
        return None
    try:
        window = float(options.get("window", DEFAULT_WINDOW))
    except ValueError:
        return None
    if not 1 <= window <= MAX_WINDOW:
        return None
    from tlrun.ids import project_id
    from tlrun.project.rootfind import root_of

    if "project_dir" in options:
        root = os.path.realpath(options["project_dir"])
        if not os.path.isdir(root):
            return None
    else:
        root = root_of(os.getcwd())
    found = _project(root, options.get("app") or os.environ.get("CELERY_APP") or None)
    if found is None:
        return None
    app, roles = found
    if "role" in options:  # one role's pod (tlrun export kubernetes): that role only
        roles = [(name, kind) for name, kind in roles if name == options["role"]]
        if not roles:
            return None  # not a role of the project file: the full command says so
    lines, code = report(check_locks(project_id(root, app), roles, window))
    sys.stdout.write("".join(line + "\n" for line in lines))
    sys.stdout.flush()
    return code
