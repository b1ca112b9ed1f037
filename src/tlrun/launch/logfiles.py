"""Per-worker log files: mode 0600, rotated by size, a few old files kept."""

from __future__ import annotations

import errno
import logging
import logging.handlers
import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from tlrun.errors import LogError

MAX_BYTES = 10 * 1024 * 1024
BACKUPS = 3


class _PrivateRotatingHandler(logging.handlers.RotatingFileHandler):
    """RotatingFileHandler whose files (the first and every rotated successor) are created 0600."""

    def _open(self):  # type: ignore[no-untyped-def]
        # O_NOFOLLOW: whoever can write the log directory must not make tlrun append to a file of their choice.
        # O_NONBLOCK: a FIFO planted at the name would otherwise block open() until someone reads it.
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        fd = os.open(self.baseFilename, flags, 0o600)
        _own_regular_file(fd, self.baseFilename)
        return os.fdopen(fd, "a", encoding=self.encoding or "utf-8", errors="replace")


class NotOurFile(OSError):
    """A FIFO, a device, a directory, or another user's file where tlrun reads or writes a log."""


def _own_regular_file(fd: int, path: str) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
        os.close(fd)
        raise NotOurFile(errno.EPERM, "not a regular file of yours", path)


def open_for_reading(path: Path) -> BinaryIO:
    """A log file opened to read: never through a link, never a FIFO or device (open() would block on a
    FIFO), only a regular file. NotOurFile otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise NotOurFile(errno.EPERM, "not a regular file", str(path))
    return os.fdopen(fd, "rb")


class WorkerLog:
    """Writes lines to `<dir>/<stem>.log`; rotation keeps `<stem>.log.1` ... `.N`."""

    def __init__(self, path: Path, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> None:
        self.path = path
        self._handler = _PrivateRotatingHandler(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(message)s"))

    def write_lines(self, lines: list[str]) -> None:
        """Append lines in one write (the output pump's chunk), rotation checked once per chunk; raises OSError
        (a full disk) instead of logging's print-and-carry-on."""
        text = "\n".join(lines) + "\n"
        record = logging.LogRecord("tlrun.worker", logging.INFO, "", 0, text, None, None)
        handler = self._handler
        if handler.shouldRollover(record):
            handler.doRollover()
        assert handler.stream is not None
        handler.stream.write(text)
        handler.stream.flush()

    def close(self) -> None:
        try:
            self._handler.close()
        except OSError:
            pass  # the last flush onto a full disk: already reported when the first write failed


def check_log_dir(log_dir: Path) -> None:
    """Create the log directory if needed and refuse one that another user could plant files in: owned by
    someone else, or group/world-writable without the sticky bit. Runs before anything is stopped."""
    hint = "choose another directory with --log-dir or TLRUN_LOG_DIR"
    check_path_components(log_dir, hint)
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        st = os.lstat(log_dir)
    except OSError as exc:
        raise LogError(f"cannot write the worker log in {log_dir}: {exc.strerror}", hint=hint) from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        # Followed, a link planted in a directory someone else owns would send tlrun's files (and its prune)
        # wherever its target is.
        raise LogError(f"log directory {log_dir} is a symlink or not a directory: refusing it", hint=hint)
    if st.st_uid not in (os.getuid(), 0):
        raise LogError(f"log directory {log_dir} belongs to uid {st.st_uid}, not to you: refusing it", hint=hint)
    if st.st_mode & 0o002:
        # The sticky bit stops others replacing tlrun's files, not planting the next names (a FIFO, a link).
        raise LogError(
            f"log directory {log_dir} is writable by every user (mode {st.st_mode & 0o7777:o}): another user "
            "could plant files under the names tlrun writes; refusing it",
            hint="use a directory of your own (mode 0755 or 0700) with --log-dir or TLRUN_LOG_DIR",
        )
    if st.st_mode & 0o020 and not st.st_mode & stat.S_ISVTX:
        raise LogError(
            f"log directory {log_dir} is writable by others (mode {st.st_mode & 0o7777:o}) without the sticky "
            "bit: another user could replace its files; refusing it",
            hint=hint,
        )
    if not os.access(log_dir, os.W_OK | os.X_OK):
        raise LogError(f"cannot write the worker log in {log_dir}: Permission denied", hint=hint)


def _others_may_write(st: os.stat_result) -> bool:
    """Another user may add, remove or replace entries of this directory."""
    return st.st_uid not in (os.getuid(), 0) or bool(st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX)


def check_path_components(log_dir: Path, hint: str) -> None:
    """Every symlink on the way to `log_dir`, not only its last component, must be one nobody else could have
    planted: owned by this user or root, in a directory no other user may write. Else tlrun's files (and
    their prune) would go wherever another user points them (a project they own, run by root)."""
    current = Path(os.path.abspath(log_dir)).parts
    here = Path(current[0])
    for part in current[1:]:
        step = here / part
        try:
            st = os.lstat(step)
        except OSError:
            return  # from here on tlrun creates the directories itself
        if stat.S_ISLNK(st.st_mode):
            try:
                planted = st.st_uid not in (os.getuid(), 0) or _others_may_write(os.stat(here))
            except OSError:
                planted = True
            if planted:
                raise LogError(
                    f"log directory {log_dir}: {step} is a symlink another user could have planted (owned by uid "
                    f"{st.st_uid}, or in a directory others may write): refusing to follow it",
                    hint=hint,
                )
            step = Path(os.path.realpath(step))
        here = step


KEEP_LAUNCHES = 10  # log files of each kind kept: the newest launches'


def prune(log_dir: Path, stem: str, keep: int = KEEP_LAUNCHES) -> list[Path]:
    """Remove the log files of older launches of the same kind as `stem` (`celery_worker_4242` ->
    `celery_worker_<pid>.log` and its rotations), keeping the newest `keep` launches. Only names tlrun
    writes are touched. Returns what was removed."""
    kind = stem.rsplit("_", 1)[0]
    pattern = re.compile(rf"^{re.escape(kind)}_(\d+)\.log(\.\d+)?$")
    launches: dict[str, list[Path]] = {}
    try:
        entries = list(os.scandir(log_dir))
    except OSError:
        return []
    for entry in entries:
        match = pattern.match(entry.name)
        # Only regular files of ours: never another user's file whose name looks like a tlrun log.
        if match and entry.is_file(follow_symlinks=False) and entry.stat(follow_symlinks=False).st_uid == os.getuid():
            launches.setdefault(match.group(1), []).append(Path(entry.path))
    newest = sorted(launches, key=lambda pid: max(p.stat().st_mtime for p in launches[pid]), reverse=True)
    removed = []
    for pid in newest[keep:]:
        for path in launches[pid]:
            try:
                path.unlink()
                removed.append(path)
            except OSError:
                pass
    return removed


def open_log(log_dir: Path, stem: str) -> WorkerLog:
    check_log_dir(log_dir)
    prune(log_dir, stem, KEEP_LAUNCHES - 1)  # with this launch's file: KEEP_LAUNCHES
    path = log_dir / f"{stem}.log"
    try:
        log = WorkerLog(path)
    except OSError as exc:
        # ELOOP from O_NOFOLLOW, or EACCES from Linux's protected_symlinks in a sticky directory.
        if exc.errno == errno.ELOOP or path.is_symlink():
            raise LogError(f"{path} is a symlink: refusing to write through it (remove it)") from None
        # ENXIO: a FIFO nobody reads, opened without blocking.
        if isinstance(exc, NotOurFile) or exc.errno == errno.ENXIO:
            raise LogError(
                f"{path} is not a regular file of yours (a FIFO, a device, another user's file): refusing to "
                "write to it (remove it)"
            ) from None
        raise LogError(
            f"cannot write the worker log in {log_dir}: {exc.strerror}",
            hint="choose another directory with --log-dir or TLRUN_LOG_DIR",
        ) from None
    return log


def log_files(
    log_dir: Path, rotated: bool = False, stems: list[str] | None = None, prefixes: tuple[str, ...] | None = None
) -> list[Path]:
    """tlrun's log files in the directory (each role's worker, beat, private broker, the stack's processes
    `proc_<name>_*`), newest first; rotated ones (`.log.1` ...) only when asked; with `stems`, only
    `celery_<stem>_*` (a role's files); with `prefixes`, only files named so."""
    if not log_dir.is_dir():
        return []
    if prefixes is None:
        prefixes = tuple(f"celery_{stem}_" for stem in stems) if stems is not None else ("celery_", "redis_", "proc_")
    files = [
        p
        for p in log_dir.iterdir()
        if p.name.startswith(prefixes)
        and (p.name.endswith(".log") or (rotated and ".log." in p.name))
        and stat.S_ISREG(p.lstat().st_mode)  # never a link, a FIFO or a device named like a log
    ]
    return sorted(files, key=lambda p: p.lstat().st_mtime, reverse=True)


def tail_lines(path: Path, count: int) -> list[str]:
    """The last `count` lines of a file (reads from the end; log files can be large)."""
    with open_for_reading(path) as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        block, data = 8192, b""
        while size > 0 and data.count(b"\n") <= count:
            step = min(block, size)
            size -= step
            fh.seek(size)
            data = fh.read(step) + data
    return data.decode("utf-8", errors="replace").splitlines()[-count:] if count > 0 else []


def follow(path: Path, poll: float = 0.2, stop: Callable[[], bool] = lambda: False) -> Iterator[str]:
    """Yield lines appended to `path`, like `tail -F`: reopens it when it is rotated or truncated."""
    fh = open_for_reading(path)
    fh.seek(0, os.SEEK_END)
    inode = os.fstat(fh.fileno()).st_ino
    pending = b""
    try:
        while not stop():
            chunk = fh.read()
            if chunk:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", errors="replace")
                continue
            try:
                st = os.stat(path)
            except FileNotFoundError:
                time.sleep(poll)
                continue
            if st.st_ino != inode or st.st_size < fh.tell():  # rotated, or truncated
                fh.close()
                fh = open_for_reading(path)
                inode = os.fstat(fh.fileno()).st_ino
                continue
            time.sleep(poll)
    finally:
        fh.close()
