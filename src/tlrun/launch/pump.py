"""A child's output, relayed in chunks: one `os.read` of whatever the pipe holds, cut at the last newline,
decoded, redacted and written in bulk (one log write and one console write per chunk, not per line).

A line split across two reads waits in `pending` until its newline arrives, so a password is never cut in
two before the redactor sees it, and lines keep their order. Runs on a daemon thread: the launcher never
blocks on it, and it never stops before the child's output ends (a child whose pipe nobody drains blocks on
its next write, and a worker blocked there takes no tasks while still answering pings).
"""

from __future__ import annotations

import collections
import os
import subprocess
import threading
import time
from collections.abc import Callable

from tlrun.launch.logfiles import WorkerLog
from tlrun.redact import Redactor

CHUNK = 65536
# A "line" longer than this (no newline in 1 MiB of output) is relayed in pieces, so that memory stays bounded;
# the last KEEP characters (longer than any password) wait for the next read, so no password escapes at a cut.
MAX_PENDING = 1 << 20
KEEP = 4096
# A worker writes a line at a time, and a reader that is always waiting gets one line per read: the cost of a
# relay (a thread's wake-up, decode, mask, a log write, a console write) paid per line. After a light read
# the pump waits COALESCE before reading again, so that what follows comes in one chunk: a line after a quiet
# spell is relayed at once, the lines after it within 50 ms (measured: the launcher's CPU per relayed line
# falls from about 110 us at one line per read to under 10 us). A read of LIGHT bytes or more (a heavy
# flow) is followed at once by the next, so that the pipe (64 KiB) never fills while the pump waits.
COALESCE = 0.05
LIGHT = 16384


def drain(fd: int, relay: Callable[[str], None], redact: Callable[[str], str]) -> None:
    """Read `fd` to its end in chunks, each cut at its last newline, decoded and redacted, then handed to
    `relay` (the launcher's pump, and the child's own relay.py)."""
    pending = b""
    while True:
        try:
            chunk = os.read(fd, CHUNK)
        except InterruptedError:
            continue
        except OSError:
            break
        if not chunk:
            break
        pending = relay_lines(pending + chunk, relay, redact)
        if len(chunk) < LIGHT:
            time.sleep(COALESCE)
    if pending:
        relay(redact(pending.decode("utf-8", errors="replace")))


def relay_lines(pending: bytes, relay: Callable[[str], None], redact: Callable[[str], str]) -> bytes:
    """Relay the whole lines `pending` starts with (redacted), or the head of a line too long to wait for;
    returns what still waits for its newline."""
    cut = pending.rfind(b"\n")
    if cut >= 0:
        relay(redact(pending[: cut + 1].decode("utf-8", errors="replace")))
        return pending[cut + 1 :]
    if len(pending) > MAX_PENDING:
        # Masked whole first: a secret cut by the end of `pending` lies within its last KEEP bytes.
        text = redact(pending.decode("utf-8", errors="replace"))
        relay(text[:-KEEP] + "\n")
        return text[-KEEP:].encode()
    return pending


class OutputPump:
    """Copies a child's output, redacted, to its log file and to a callback (a list of lines per call).

    Keeps the last lines for error reports."""

    def __init__(
        self,
        child: subprocess.Popen[bytes],
        log: WorkerLog | None,
        redact: Redactor,
        on_lines: Callable[[list[str]], None] | None = None,
        keep: int = 40,
        on_log_error: Callable[[str], None] | None = None,
    ) -> None:
        stream = child.stdout
        assert stream is not None
        self._fd = stream.fileno()
        self._stream = stream  # kept open (and referenced) while the thread reads its descriptor
        self._log = log
        self._redact = redact
        self._on_lines = on_lines
        self._on_log_error = on_log_error
        self._log_failed = False
        self.tail: collections.deque[str] = collections.deque(maxlen=keep)
        self.log_path = log.path if log is not None else None
        self._thread = threading.Thread(target=self._run, name=f"tlrun-output-{child.pid}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        drain(self._fd, self._relay, self._redact)

    def _relay(self, text: str) -> None:
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if "\r" in text:
            lines = [line.rstrip("\r") for line in lines]
        if not lines:
            return
        self.tail.extend(lines)
        self._to_log(lines)
        if self._on_lines is not None:
            try:
                self._on_lines(lines)
            except (OSError, ValueError) as exc:
                # The console went away (`| head`, an IDE console closed): drop it, keep the log file.
                self._on_lines = None
                self._note(f"tlrun: console output stopped ({exc}); this log file keeps every line")

    def _note(self, line: str) -> None:
        """A line of the launcher's own into the log file, also when the child writes that file itself (then
        one append, never through a link, never blocking on a planted FIFO)."""
        if self._log is not None or self.log_path is None:
            self._to_log([line])
            return
        try:
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.write(fd, (line + "\n").encode())
        except OSError:
            pass
        finally:
            os.close(fd)

    def _to_log(self, lines: list[str]) -> None:
        if self._log is None:
            return
        try:
            self._log.write_lines(lines)
        except OSError as exc:
            # A full disk must not stop the worker: the console still gets every line. Say so once.
            if not self._log_failed and self._on_log_error:
                try:
                    self._on_log_error(f"cannot write {self.log_path} ({exc.strerror}): console output continues")
                except (OSError, ValueError):
                    pass
            self._log_failed = True

    def close(self, timeout: float = 2.0) -> None:
        # The pipe ends when every process holding it exits; a task's background process might keep it.
        self._thread.join(timeout)
        if self._log is not None:
            self._log.close()
