"""Writing a file in the user's project without following a symlink someone planted there.

The text goes to a fresh temporary file (O_CREAT | O_EXCL | O_NOFOLLOW, so neither a planted file nor a
link is ever opened) in the same directory, which is then renamed over the target: rename replaces a link
itself, never the file it points to.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path


def read_text(path: Path) -> str | None:
    """The file's text, or None when it does not exist; a symlink is refused (OSError ELOOP)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, encoding="utf-8") as fh:
        return fh.read()


def read_private(path: Path, limit: int) -> bytes | None:
    """A file of the user's own in their private directories (a request, a cache), or None: missing, a link, not
    a regular file (a FIFO is opened non-blocking, so it never blocks the reader), another user's, or larger
    than `limit` bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_size > limit:
            return None
        return os.read(fd, limit)
    except OSError:
        return None
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    """Replace `path` with `text` in one rename; OSError on failure (nothing half-written is left)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
