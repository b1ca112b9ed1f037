"""Step 1 of the launch path: refuse a launch from inside a worker, and hold one lock per project and role.

The lock is an flock on a file in the user's lock directory (derived from the user, not the environment).
The kernel drops it when the holder dies, so there is never a stale lock to clean by hand; the JSON inside
only says who holds it. A second, independent check (no live launcher of the project and role in the
process table) runs before anything is spawned: see `launchers.find_launchers`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from tlrun.config import ENV_GUARD
from tlrun.errors import LockHeldError, NestedLaunchError, TlrunError, UnsafeStateError
from tlrun.launch.launchers import Launcher, find_launchers
from tlrun.launch.procs import Identity
from tlrun.launch.rundir import holder_of
from tlrun.launch.rundir import host_label as host_label
from tlrun.launch.rundir import lock_dir as lock_dir
from tlrun.launch.rundir import lock_path as lock_path
from tlrun.launch.rundir import pid_namespace as pid_namespace
from tlrun.launch.rundir import read_record as read_record
from tlrun.launch.rundir import runtime_dir as runtime_dir  # where its callers look for it


@dataclass(frozen=True)
class GuardNote:
    """What the environment guard found, when it did not refuse."""

    message: str


def check_env_guard(environ: Mapping[str, str], action: str = "start") -> GuardNote | None:
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
            f"refusing to {action}: this process runs inside a worker launched by tlrun (launcher pid {launcher.pid})",
            hint="start tlrun from a shell or your IDE, not from task or application code",
        )
    # Alive but not our ancestor: the variable leaked into this shell (an IDE's saved environment).
    return GuardNote(f"{ENV_GUARD} names launcher pid {launcher.pid}, which is not our parent: going on")


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


def live_records(project_id: str, kinds: list[str]) -> list[tuple[str, dict[str, Any], Identity]]:
    """(kind, record, holder) of each of the project's locks on this host whose holder is alive. Read, never
    locked (a reader holding a lock, even briefly, would make a launch starting then fail)."""
    found = []
    for kind in kinds:
        try:
            record = read_record(lock_path(project_id, kind))
        except TlrunError:
            continue
        holder = holder_identity(record)
        if record and holder is not None and holder.is_alive():
            found.append((kind, record, holder))
    return found


def root_identity(root: Path) -> tuple[int, int] | None:
    """The project directory's (device, inode): the same project after a rename or a move."""
    try:
        st = os.stat(root)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def moved_holders(root: Path, app: str, project_id: str, kinds: Collection[str]) -> list[tuple[str, Identity, str]]:
    """Live launchers of this host holding one of `kinds` for this very directory (same device and inode) and
    app under another project id: the directory was renamed or moved since they started (their path, and so
    their lock name, is the old one). (kind, holder, the path they started in)."""
    here = root_identity(root)
    host = host_label()
    if here is None:
        return []
    found = []
    try:
        entries = list(os.scandir(lock_dir()))
    except OSError:
        return []
    for entry in entries:
        name_id, _, rest = entry.name.partition(".")
        if name_id == project_id or not rest.startswith(host + ".") or not rest.endswith(".lock"):
            continue
        kind = rest[len(host) + 1 : -len(".lock")]
        if kind not in kinds:
            continue
        record = read_record(Path(entry.path))
        holder = holder_identity(record)
        if not record or holder is None or record.get("app") != app or not holder.is_alive():
            continue
        if [record.get("root_dev"), record.get("root_ino")] == list(here):
            found.append((kind, holder, str(record.get("project_root", "?"))))
    return found


def holder_identity(record: Mapping[str, Any] | None) -> Identity | None:
    """The process a lock record names, as this reader sees it: pid plus create time, in the PID namespace
    the record was written in. A launcher that is a container's PID 1 writes pid 1, a valid holder for every
    reader in its namespace (its probes, `tlrun reload`); a reader in another namespace (the host) cannot
    name it by pid and gets None, as for a record without a pid."""
    holder = holder_of(record)
    return Identity(*holder) if holder is not None else None


class ProjectLock:
    """An exclusive flock plus a JSON record of the holder. Release by `release()` or by dying."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def try_acquire(cls, path: Path) -> ProjectLock | None:
        """The lock, or None while a live process holds it.

        A lock only counts while its path still names the locked file: a file removed (or replaced) under
        a holder, or by a holder releasing it just before we locked, is not the lock anymore; then try the
        path again."""
        for _ in range(10):
            fd = _open_nofollow(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            if _names(path, fd):
                return cls(path, fd)
            os.close(fd)
        raise UnsafeStateError(f"{path} keeps changing under tlrun: refusing to use it")

    def still_held(self) -> bool:
        """Does the lock path still name our locked file?"""
        return self._fd is not None and _names(self.path, self._fd)

    def write(self, record: Mapping[str, Any]) -> None:
        assert self._fd is not None
        data = json.dumps(dict(record), sort_keys=True).encode()
        # Readers (ps, health probes, stop, the test suite) read the file at any moment: never show them an
        # empty or half-written record. One write replaces the old record whole (padded with blanks, which JSON
        # ignores, to cover a longer old one); only then is the file cut to the new length. (Truncating first
        # left a window in which a reader saw an empty file: a probe read "no launcher".)
        size = os.fstat(self._fd).st_size
        os.pwrite(self._fd, data.ljust(size, b" "), 0)
        if size > len(data):
            os.ftruncate(self._fd, len(data))

    def release(self) -> None:
        if self._fd is not None:
            # Remove the file while we still hold it (so no lock file piles up, and no one reads our details
            # after we are gone); a launcher that opened it meanwhile sees the path changed and tries again.
            try:
                if _names(self.path, self._fd):
                    os.unlink(self.path)
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __enter__(self) -> ProjectLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _names(path: Path, fd: int) -> bool:
    try:
        st, here = os.lstat(path), os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)


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


SETTLE_SECONDS = 3.0


def competing_launchers(
    launchers: Sequence[Launcher], app: str, roles: Collection[str] | None, beat: bool, beat_by_default: bool
) -> list[Launcher]:
    """The launchers (of this project's directory) that would run one of the same roles, or beat.

    Pure: `roles` are ours (None: every role), `beat` whether we run beat; `beat_by_default` is the
    project file's `beat`, which a `tlrun dev` without --beat/--no-beat follows. `tlrun worker` runs beat
    only when given --beat (production runs beat as a service of its own)."""
    found = []
    for other in launchers:
        cmd = other.cmd
        if cmd.app and cmd.app != app:
            continue  # another app in the same directory: another project
        theirs_workers = cmd.command in ("worker", "dev")
        we_run_workers = roles is None or len(roles) > 0
        overlap = theirs_workers and we_run_workers and (roles is None or cmd.role is None or cmd.role in roles)
        their_beat = (
            cmd.command == "beat"
            or (cmd.command == "dev" and (cmd.beat if cmd.beat is not None else beat_by_default))
            or (cmd.command == "worker" and cmd.beat is True)
        )
        if overlap or (beat and their_beat):
            found.append(other)
    return found


def check_no_other_launcher(
    root: Path,
    app: str,
    roles: Collection[str] | None,
    beat: bool,
    beat_by_default: bool,
    what: str,
    coordinated: Collection[int] = (),
) -> None:
    """The second, independent check before anything is spawned: a live launcher of the same project and
    role in the process table refuses the start, even when its lock is somewhere else (a lock file removed
    by hand, a home directory that differs).

    Only launchers started before this one count, and each gets a moment to exit first: launchers started
    at the same instant race for the lock, and the losers (still in the process table for a moment) exit
    at once. We hold the lock here, so this wait happens only when the lock was bypassed.

    `coordinated`: launchers that hold locks of this project in the same lock directory. Holding ours, we
    know they do not run our units (a launcher that gave a unit up with `tlrun stop --role` still shows
    the role on its command line)."""
    me = Identity.of_self()
    others = [
        o
        for o in competing_launchers(find_launchers(root), app, roles, beat, beat_by_default)
        if o.identity.create_time <= me.create_time and o.identity.pid not in coordinated
    ]
    deadline = time.monotonic() + SETTLE_SECONDS
    while others and time.monotonic() < deadline:
        time.sleep(0.05)
        others = [o for o in others if o.identity.is_alive()]
    if others:
        pids = ", ".join(str(o.identity.pid) for o in others)
        raise LockHeldError(
            f"{what} is already running under tlrun launcher pid {pids} (found in the process table)",
            hint="stop it (Ctrl-C in its terminal, or `tlrun stop`), or run again with --replace to take over",
        )
