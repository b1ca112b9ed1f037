"""Keep tlrun's state directories from growing: the lock files SIGKILLed launchers left behind (and their
workers' task count files), the broker records of projects that stopped running a day ago, and beat
schedule files of projects that have not run beat for a month. Only what no live launcher holds, only
regular files of ours named as tlrun names them; run at each launch, after the launcher took its own locks.
"""

from __future__ import annotations

import os
import re
import stat
import time
from pathlib import Path

from tlrun.errors import TlrunError
from tlrun.launch import guard

SCHEDULE_MAX_AGE = 30 * 24 * 3600.0  # a schedule untouched this long belongs to a project that stopped
_LOCK_NAME = re.compile(
    r"^[0-9a-f]{16}\.[A-Za-z0-9_.-]+\.(worker|worker-[A-Za-z0-9_-]+|beat|process-[A-Za-z0-9_-]+)\.lock$"
)
_SCHEDULE_NAME = re.compile(r"^([0-9a-f]{16})\.celerybeat-schedule(\.(db|dat|dir|bak))?$")
_RECORD_NAME = re.compile(r"^([0-9a-f]{16})\.broker\.json$")
RECORD_MAX_AGE = 24 * 3600.0  # a broker record (brokerconf.py) untouched this long, its project not running
_TASKS_NAME = re.compile(r"^[0-9a-f]{16}\.[A-Za-z0-9_.-]+\.(\d+)\.tasks\.\d+\.json$")  # early.task_stats_prefix


def _ours(path: Path) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid()


def stale_locks(lock_dir: Path) -> list[Path]:
    """Remove the lock files no live process holds (taking each lock first, so that a launcher starting
    meanwhile sees the path change and tries again, as with any released lock); the removed paths."""
    removed = []
    for entry in os.scandir(lock_dir):
        path = Path(entry.path)
        if not _LOCK_NAME.match(entry.name) or not _ours(path):
            continue
        try:
            lock = guard.ProjectLock.try_acquire(path)
        except TlrunError:
            continue
        if lock is not None:
            lock.release()  # unlinks the file while holding it
            removed.append(path)
    return removed


def old_schedules(runtime_dir: Path, now: float | None = None, max_age: float = SCHEDULE_MAX_AGE) -> list[Path]:
    """Remove beat schedule files untouched for `max_age` whose project runs no beat on this host."""
    now = time.time() if now is None else now
    removed = []
    for entry in os.scandir(runtime_dir):
        match = _SCHEDULE_NAME.match(entry.name)
        path = Path(entry.path)
        if match is None or not _ours(path):
            continue
        try:
            if now - os.lstat(path).st_mtime < max_age or guard.live_records(match.group(1), ["beat"]):
                continue
            os.unlink(path)
        except (OSError, TlrunError):
            continue
        removed.append(path)
    return removed


def old_broker_records(lock_dir: Path, now: float | None = None, max_age: float = RECORD_MAX_AGE) -> list[Path]:
    """Remove the broker records (`<project>.broker.json`, no secret in them) of projects with no lock file
    here (run after stale_locks: those left are held) that were not rewritten for `max_age`. A command that
    wants one and finds none imports the app instead; every launcher writes its project's again."""
    now = time.time() if now is None else now
    entries = list(os.scandir(lock_dir))
    running = {e.name.split(".", 1)[0] for e in entries if e.name.endswith(".lock")}
    removed = []
    for entry in entries:
        match = _RECORD_NAME.match(entry.name)
        path = Path(entry.path)
        if match is None or match.group(1) in running or not _ours(path):
            continue
        try:
            if now - os.lstat(path).st_mtime < max_age:
                continue
            os.unlink(path)
        except OSError:
            continue
        removed.append(path)
    return removed


def dead_task_counts(runtime_dir: Path) -> list[Path]:
    """Remove the task count files (taskstats.py) of launchers that are gone (SIGKILLed: a launcher removes
    its own at its close), and any named with this launcher's pid (a gone launcher's, whose pid it reuses:
    its workers have written nothing yet)."""
    removed = []
    for entry in os.scandir(runtime_dir):
        match = _TASKS_NAME.match(entry.name)
        path = Path(entry.path)
        if match is None or not _ours(path):
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and _alive(pid):
            continue
        try:
            os.unlink(path)
        except OSError:
            continue
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process: alive
    return True


def tidy(runtime_dir: Path) -> list[Path]:
    """Both, never failing a launch: a directory that cannot be read is left as it is."""
    removed: list[Path] = []
    try:
        removed += stale_locks(guard.lock_dir())
        removed += old_broker_records(guard.lock_dir())
        removed += old_schedules(runtime_dir)
        removed += dead_task_counts(runtime_dir)
    except (OSError, TlrunError):
        pass
    return removed
