"""Step 1 of the launch path: refuse a launch from inside a worker, and hold one lock per project.

The lock is an flock on a file in a per-user runtime directory. The kernel drops it when the holder dies,
so there is never a stale lock to clean by hand; the JSON inside only says who holds it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from tlrun.config import ENV_GUARD
from tlrun.errors import LockHeldError, NestedLaunchError, UnsafeStateError
from tlrun.launch.procs import Identity


@dataclass(frozen=True)
class GuardNote:
    """What the environment guard found, when it did not refuse."""

    message: str


def check_env_guard(environ: Mapping[str, str]) -> GuardNote | None:
    """Refuse when we run inside a worker whose launcher is alive; otherwise say why we go on."""
    raw = environ.get(ENV_GUARD)
    if not raw:
        return None
    launcher = Identity.decode(raw)
    if launcher is None:
        return GuardNote(f"ignoring malformed {ENV_GUARD}={raw[:40]!r}")
    if not launcher.is_alive():
        return GuardNote(f"stale {ENV_GUARD} (launcher pid {launcher.pid} is gone): going on")
    ancestors = {p.pid for p in psutil.Process().parents()}
    if launcher.pid in ancestors:
        raise NestedLaunchError(
            f"refusing to start: this process runs inside a worker launched by tlrun (launcher pid {launcher.pid})",
            hint="start tlrun from a shell or your IDE, not from task or application code",
        )
    # Alive but not our ancestor: the variable leaked into this shell (an IDE's saved environment).
    return GuardNote(f"{ENV_GUARD} names launcher pid {launcher.pid}, which is not our parent: going on")


def runtime_dir(environ: Mapping[str, str]) -> Path:
    """$XDG_RUNTIME_DIR/tlrun, else a 0700 directory under the user's cache dir; created and checked."""
    xdg = environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        base = Path(xdg) / "tlrun"
    else:
        cache = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = Path(cache) / "tlrun"
    base.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeStateError(f"{base} is not a directory (a symlink?): refusing to use it")
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise UnsafeStateError(
            f"{base} must be owned by you with mode 0700 (it is uid {st.st_uid}, mode {st.st_mode & 0o777:o})"
        )
    return base


def lock_path(project_id: str, kind: str, environ: Mapping[str, str] | None = None) -> Path:
    """The lock file of a project's worker or beat (`kind`), in the per-user runtime directory."""
    return runtime_dir(os.environ if environ is None else environ) / f"{project_id}.{kind}.lock"


def _open_nofollow(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeStateError(f"{path} is a symlink: refusing to open it (remove it by hand)") from None
        raise UnsafeStateError(f"cannot open lock file {path}: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
        os.close(fd)
        raise UnsafeStateError(f"{path} is not a regular file owned by you: refusing to use it")
    return fd


def read_record(path: Path) -> dict[str, Any] | None:
    """The holder record in a lock file, or None when absent or garbage (never trusted blindly)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 65536)
    finally:
        os.close(fd)
    try:
        record = json.loads(data)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def holder_identity(record: Mapping[str, Any] | None) -> Identity | None:
    if not record:
        return None
    try:
        pid, ctime = int(record["pid"]), float(record["create_time"])
    except (KeyError, TypeError, ValueError):
        return None
    return Identity(pid, ctime) if pid > 1 else None


class ProjectLock:
    """An exclusive flock plus a JSON record of the holder. Release by `release()` or by dying."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def try_acquire(cls, path: Path) -> ProjectLock | None:
        fd = _open_nofollow(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return cls(path, fd)

    def write(self, record: Mapping[str, Any]) -> None:
        assert self._fd is not None
        data = json.dumps(dict(record), sort_keys=True).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def release(self) -> None:
        if self._fd is not None:
            # Empty the record first, so nobody reads our details after we are gone.
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __enter__(self) -> ProjectLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def describe_holder(record: Mapping[str, Any] | None) -> str:
    if not record:
        return "another tlrun launcher (its record is empty or unreadable)"
    parts = [f"pid {record.get('pid')}"]
    if record.get("node"):
        parts.append(f"node {record['node']}")
    if record.get("started_at"):
        parts.append(f"since {record['started_at']}")
    return "tlrun launcher " + ", ".join(parts)


def acquire(path: Path, what: str, replace_holder: Any = None, wait: float = 0.0) -> ProjectLock:
    """Take the lock or raise LockHeldError naming the holder.

    `replace_holder(identity)` is called once when the lock is held and a takeover was asked for; then we
    wait up to `wait` seconds for the holder to let go.
    """
    lock = ProjectLock.try_acquire(path)
    if lock is not None:
        return lock
    record = _read_settled(path)
    if replace_holder is None:
        raise LockHeldError(
            f"{what} is already running under {describe_holder(record)}",
            hint="stop it (Ctrl-C in its terminal, or `tlrun stop`), or run again with --replace to take over",
        )
    holder = holder_identity(record)
    if holder is None:
        raise LockHeldError(
            f"{what} is locked, but the lock record names no process tlrun may stop ({path})",
            hint="the holder is still alive somewhere; find it with `tlrun ps`",
        )
    replace_holder(holder)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        lock = ProjectLock.try_acquire(path)
        if lock is not None:
            return lock
        time.sleep(0.05)
    raise LockHeldError(f"{describe_holder(record)} did not let go of {what} within {wait:.0f} s")


def _read_settled(path: Path) -> dict[str, Any] | None:
    """A holder writes its record just after locking: give it a moment before calling it empty."""
    deadline = time.monotonic() + 0.5
    record = read_record(path)
    while record is None and time.monotonic() < deadline:
        time.sleep(0.02)
        record = read_record(path)
    return record
