"""Per-worker log files: mode 0600, rotated by size, a few old files kept."""

from __future__ import annotations

import logging
import logging.handlers
import os
from pathlib import Path

from tlrun.errors import LogError

MAX_BYTES = 10 * 1024 * 1024
BACKUPS = 3


class _PrivateRotatingHandler(logging.handlers.RotatingFileHandler):
    """RotatingFileHandler whose files (the first and every rotated successor) are created 0600."""

    def _open(self):  # type: ignore[no-untyped-def]
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        return os.fdopen(fd, "a", encoding=self.encoding or "utf-8", errors="replace")


class WorkerLog:
    """Writes lines to `<dir>/<stem>.log`; rotation keeps `<stem>.log.1` ... `.N`."""

    def __init__(self, path: Path, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> None:
        self.path = path
        self._handler = _PrivateRotatingHandler(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(message)s"))

    def write(self, line: str) -> None:
        record = logging.LogRecord("tlrun.worker", logging.INFO, "", 0, line, None, None)
        self._handler.emit(record)

    def close(self) -> None:
        self._handler.close()


def open_log(log_dir: Path, stem: str) -> WorkerLog:
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        log = WorkerLog(log_dir / f"{stem}.log")
    except OSError as exc:
        raise LogError(
            f"cannot write the worker log in {log_dir}: {exc.strerror}",
            hint="choose another directory with --log-dir or TLRUN_LOG_DIR",
        ) from None
    return log


def log_files(log_dir: Path, prefix: str = "celery_") -> list[Path]:
    """Log files (current and rotated) in the directory, newest first."""
    if not log_dir.is_dir():
        return []
    files = [p for p in log_dir.iterdir() if p.name.startswith(prefix) and ".log" in p.name]
    return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)
