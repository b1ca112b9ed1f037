"""tlrun's per-user state directories, created and checked, and the lock files' names and records: a module
of its own, light enough for the early start (launch/early.py), which needs the runtime directory before the
launch core is imported, and for the liveness probe (ops/probe.py)."""

from __future__ import annotations

import json
import os
import pwd
import stat
import time

from tlrun.errors import UnsafeStateError

TYPE_CHECKING = False  # neither typing nor pathlib at run time in the probe's path: its CPU (ops/liveness.py)
if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path
    from typing import Any


def runtime_dir(environ: Mapping[str, str]) -> Path:
    """$XDG_RUNTIME_DIR/tlrun, else a 0700 directory under the user's cache dir; created and checked.
    State that may differ between shells lives here (beat's schedule, the private broker's files): never
    the locks, which must be the same for every shell of the user (see lock_dir)."""
    from pathlib import Path

    xdg = environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        base = Path(xdg) / "tlrun"
    else:
        home = os.path.expanduser("~")
        if not os.path.isabs(home):
            # No HOME and no password entry: expanduser returns "~" itself, a directory named `~` in the
            # project (which a later `rm -rf ~` would take for a home). Use the per-user temporary one.
            import tempfile

            return private_dir(Path(tempfile.gettempdir()) / f"tlrun-{os.getuid()}")
        cache = environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
        base = Path(cache) / "tlrun"
    return private_dir(base)


def private_dir(base: Path) -> Path:
    from pathlib import Path

    return Path(_private_dir(str(base)))


def _private_dir(base: str) -> str:
    try:
        os.makedirs(os.path.dirname(base), exist_ok=True)
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:  # an unwritable HOME or cache directory: say which, never a traceback
        raise UnsafeStateError(
            f"cannot create tlrun's state directory {base}: {exc.strerror}",
            hint="set XDG_RUNTIME_DIR (or XDG_CACHE_HOME) to a directory of yours",
        ) from None
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeStateError(f"{base} is not a directory (a symlink?): refusing to use it")
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise UnsafeStateError(
            f"{base} must be owned by you with mode 0700 (it is uid {st.st_uid}, mode {st.st_mode & 0o777:o})"
        )
    return base


def lock_dir() -> Path:
    """The user's lock directory, derived from the user alone: the home directory of the password database
    (never $HOME or $XDG_RUNTIME_DIR, which differ between shells, IDEs and service managers), so that
    every launcher of this user on this host meets the same locks. A user without a usable home directory
    gets /tmp/tlrun-<uid>."""
    from pathlib import Path

    return Path(lock_folder())


def lock_folder() -> str:
    """lock_dir, as a string (the liveness probe imports no pathlib)."""
    uid = os.getuid()
    try:
        home = pwd.getpwuid(uid).pw_dir
    except KeyError:
        home = "/nonexistent"
    if os.path.isdir(home) and os.access(home, os.W_OK):
        return _private_dir(os.path.join(home, ".cache", "tlrun-locks"))
    import tempfile

    return _private_dir(os.path.join(tempfile.gettempdir(), f"tlrun-{uid}"))


def lock_path(project_id: str, kind: str, hostname: str | None = None) -> Path:
    """The lock of a project's role (`kind`: worker, worker-NAME, beat) on this host. The host name is part
    of it: a home directory shared between hosts (NFS) must not make two hosts' launchers one."""
    from pathlib import Path

    return Path(lock_file(project_id, kind, hostname))


def lock_file(project_id: str, kind: str, hostname: str | None = None) -> str:
    """lock_path, as a string (the liveness probe imports no pathlib)."""
    return os.path.join(lock_folder(), f"{project_id}.{host_label(hostname)}.{kind}.lock")


def host_label(hostname: str | None = None) -> str:
    """The host's name as it stands in tlrun's file names."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in (hostname or os.uname().nodename))[:64]


def read_record(path: Path | str) -> dict[str, Any] | None:
    """The holder record in a lock file, or None when absent, empty or garbage (never trusted blindly).

    The holder rewrites its record in place (the lock is the file's inode, so it cannot be replaced by a
    rename), and a read that meets a write can see part of each. A read counts when the next read gives the
    same bytes and they parse. Bytes that hold still but do not parse are read again for a moment (a writer
    preempted in the middle of its write) before they are called garbage; bytes that keep changing are a
    writer at work, read until they hold still."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None  # never read a FIFO or a device planted under a lock's name
        deadline = time.monotonic() + RECORD_SETTLE
        data = os.pread(fd, 65536, 0)
        while True:
            again = os.pread(fd, 65536, 0)
            if again == data:
                record = _parse(data)
                if record is not None or not data or time.monotonic() > deadline:
                    return record  # a whole record; a file not written yet (never a torn write); garbage
                time.sleep(0.005)
            elif time.monotonic() > deadline + 1:
                return _parse(again)  # never still for a second: take what parses, if anything
            data = again
    except OSError:
        return None
    finally:
        os.close(fd)


RECORD_SETTLE = 0.5


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(data)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def pid_namespace() -> int | None:
    """This process's PID namespace (the inode of /proc/self/ns/pid), None where there is none to read."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def holder_of(record: Mapping[str, Any] | None) -> tuple[int, float] | None:
    """(pid, create time) of the process a lock record names, as this reader sees it, in the PID namespace
    the record was written in. A launcher that is a container's PID 1 writes pid 1, a valid holder for every
    reader in its namespace (its probes, `tlrun reload`); a reader in another namespace (the host) cannot
    name it by pid and gets None, as for a record without a pid."""
    if not record:
        return None
    try:
        pid, ctime = int(record["pid"]), float(record["create_time"])
    except (KeyError, TypeError, ValueError):
        return None
    written_in = record.get("pidns")
    if written_in is None:  # a record of a tlrun that did not say its namespace: pid 1 is never its holder
        return (pid, ctime) if pid > 1 else None
    return (pid, ctime) if pid >= 1 and written_in == pid_namespace() else None


def create_time_of(pid: int | str) -> float | None:
    """A process's create time as psutil computes it on Linux, from /proc (the start time in clock ticks since
    boot, plus the boot time); None when gone, or where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat_line = fh.read()
        with open("/proc/stat", "rb") as fh:
            btime = next(line for line in fh if line.startswith(b"btime"))
        # The command name (field 2) may hold spaces and parentheses: count fields after its last ')'.
        ticks = float(stat_line[stat_line.rfind(b")") + 2 :].split()[19])
        return ticks / os.sysconf("SC_CLK_TCK") + float(btime.split()[1])
    except (OSError, ValueError, IndexError, StopIteration):
        return None
