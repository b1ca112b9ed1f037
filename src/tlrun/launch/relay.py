"""A child's output that never waits on its launcher (runs inside the child, behind the shim).

The child's stdout and stderr (its pool children's and its tasks' subprocesses' too) go into a pipe that a
thread of this process drains at once: every line, redacted, into the child's own log file (rotated as the
launcher's copy was), and then to the launcher's pipe for the console, without ever blocking. When the
launcher does not read (stopped with Ctrl-Z, a debugger, a slow terminal), console lines are dropped and
counted, never the log file's, and the next line that gets through says how many were not shown. When the
launcher is gone, the console copy just ends.

Before this, the launcher read the pipe and wrote the log: a launcher that did not read stalled its workers
(a full 64 KiB pipe blocks the next write, and a worker blocked there takes no task while it still answers
pings) and its beat (a beat blocked on a write sends nothing, while its lease thread kept renewing).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

PIPE_BUF = 4096  # a write of at most this many bytes to a pipe is whole or not at all (POSIX)


class Relay:
    def __init__(self, log_path: str, secrets: list[str]) -> None:
        from pathlib import Path

        from tlrun.launch.logfiles import WorkerLog, check_log_dir
        from tlrun.redact import Redactor

        # The launcher's own checks, here too: an early-started worker may be first to the log directory.
        check_log_dir(Path(log_path).parent)  # raises LogError: then the caller keeps the launcher's pipe
        self._log = WorkerLog(Path(log_path))  # raises OSError: the same
        self._redact = Redactor(secrets)
        self._console: int | None = os.dup(1)  # the launcher's pipe
        os.set_blocking(self._console, False)
        read_end, write_end = _pipe()
        for target in (1, 2):
            os.dup2(write_end, target)
        os.close(write_end)
        os.set_inheritable(self._console, False)
        os.set_inheritable(read_end, False)  # a task's subprocess never gets it
        self._read = read_end
        self.dropped = 0  # console lines not shown since the last that got through
        self.dropped_total = 0
        self._log_failed = False
        self._writing = False  # a chunk is being written (finish waits for it)
        self._thread = threading.Thread(target=self._run, name="tlrun-output", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            from tlrun.launch._child import quiet_thread

            quiet_thread()
        except ImportError:
            pass
        from tlrun.launch.pump import drain

        if not drain_written_first(self._read, self._relay, self._redact):
            drain(self._read, self._relay, self._redact)
        os.close(self._read)

    def _relay(self, text: str) -> None:
        self._writing = True
        try:
            self._write(text)
        finally:
            self._writing = False

    def _write(self, text: str) -> None:
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if not lines:
            return
        try:
            self._log.write_lines(lines)
        except OSError as exc:
            if not self._log_failed:
                lines.append(f"tlrun: cannot write {self._log.path} ({exc.strerror}): console output continues")
            self._log_failed = True
        self._forward(lines)

    def _forward(self, lines: list[str]) -> None:
        """To the launcher, never blocking: a piece (whole lines, at most PIPE_BUF bytes) goes whole or not at
        all; what does not fit now is dropped and counted. Without a log file (it failed) nothing is dropped:
        the console is then the only copy, and the write waits."""
        if self._console is None:
            return
        if self.dropped:
            notice = (
                f"tlrun: {self.dropped:,} line(s) not shown while the console was not read; "
                f"the log file has them ({self._log.path})"
            )
            lines = [notice, *lines]
        pieces = _pieces(lines)
        for i, (piece, _count) in enumerate(pieces):
            try:
                if self._log_failed:
                    os.set_blocking(self._console, True)
                os.write(self._console, piece)
            except BlockingIOError:
                missed = sum(n for _piece, n in pieces[i:])
                if self.dropped and i == 0:
                    missed -= 1  # the notice itself is not a line of the program's
                self.dropped += missed
                self.dropped_total += missed
                return
            except OSError:  # the launcher is gone (EPIPE): the log file has everything from now on
                self._close_console()
                return
            if i == 0 and self.dropped:
                self.dropped = 0

    def _close_console(self) -> None:
        if self._console is not None:
            try:
                os.close(self._console)
            except OSError:
                pass
            self._console = None

    def finish(self, timeout: float = 1.0) -> None:
        """The program is done: let the thread write what is left, then close the log. Returns once the pipe
        is empty and no chunk is being written, without waiting for its end (EOF): a pool child or a task's
        subprocess may still hold the pipe, and a worker that stops at its launcher's death kills them right
        after this (it waited the whole `timeout` for them: a SIGKILLed launcher's idle tree took 1.03 s to
        go instead of 0.02 s). Never longer than `timeout`."""
        import time

        from tlrun.launch._child import close_outputs

        close_outputs()
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline and not self._drained():
            self._thread.join(0.005)
        if not self._thread.is_alive():
            self._log.close()

    def _drained(self) -> bool:
        """Nothing left in the pipe, and no chunk between its read and its write (with tee(2), a chunk leaves
        the pipe only once written: drain_written_first)."""
        import fcntl
        import termios

        try:
            waiting = int.from_bytes(fcntl.ioctl(self._read, termios.FIONREAD, b"\0\0\0\0"), "little")
        except OSError:
            return False
        return waiting == 0 and not self._writing


def _tee() -> Callable[[int, int, int, int], int] | None:
    """Linux's tee(2) (copies what a pipe holds into another pipe without taking it out), or None."""
    import sys

    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        tee = ctypes.CDLL(None, use_errno=True).tee
    except (OSError, AttributeError):
        return None
    tee.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint]
    tee.restype = ctypes.c_ssize_t
    return tee


def drain_written_first(fd: int, relay: Callable[[str], None], redact: Callable[[str], str]) -> bool:
    """pump.drain, except that what is read leaves the pipe only once it is written: each chunk is copied out
    with tee(2) (the call waits without the GIL), relayed (the log file first), and only then taken out of the
    pipe. A process SIGKILLed (the OOM killer, kill -9) while its relay thread held a chunk it had read but not
    yet written lost that chunk: its launcher, which drains the pipe after the death, found only what came
    after (81 lines of 600 lost once, on a busy machine). Killed between the write and the take-out, the
    chunk is in the log and still in the pipe: the launcher skips what the log already ends with
    (outputs.py). False, having read nothing, where tee(2) is not there (not Linux) or `fd` is no pipe."""
    import errno
    import time

    from tlrun.launch.pump import CHUNK, COALESCE, LIGHT, relay_lines

    tee = _tee()
    if tee is None:
        return False
    import ctypes

    scratch_read, scratch_write = os.pipe()
    pending = b""
    started = False
    try:
        while True:
            n = tee(fd, scratch_write, CHUNK, 0)
            if n < 0:
                err = ctypes.get_errno()
                if err == errno.EINTR:
                    continue
                if not started:
                    return False  # not a pipe (EINVAL): the plain drain
                break
            started = True
            if n == 0:
                break  # every writer is gone
            pending = relay_lines(pending + _read_exactly(scratch_read, n), relay, redact)
            _read_exactly(fd, n)  # now written (or held in `pending`): out of the pipe
            if n < LIGHT:
                time.sleep(COALESCE)
    finally:
        os.close(scratch_read)
        os.close(scratch_write)
    if pending:
        relay(redact(pending.decode("utf-8", errors="replace")))
    return True


def _read_exactly(fd: int, n: int) -> bytes:
    parts = []
    while n > 0:
        try:
            part = os.read(fd, n)
        except InterruptedError:
            continue
        if not part:
            break
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


def _pipe() -> tuple[int, int]:
    """The pipe the launcher made and keeps a read end of (so that what this process had not relayed when it
    was killed still reaches its log file: spawn.unread), else a pipe of its own."""
    import stat

    from tlrun.launch._child import RELAY_FDS_ENV

    given = os.environ.pop(RELAY_FDS_ENV, "")
    try:
        read_end, write_end = (int(fd) for fd in given.split(","))
        if all(stat.S_ISFIFO(os.fstat(fd).st_mode) for fd in (read_end, write_end)):
            return read_end, write_end
    except (ValueError, OSError):
        pass
    return os.pipe()


def close_given() -> None:
    """The launcher's pipe, when this process relays nothing (no log file): its ends are not left open."""
    from tlrun.launch._child import RELAY_FDS_ENV

    for fd in os.environ.pop(RELAY_FDS_ENV, "").split(","):
        try:
            os.close(int(fd))
        except (ValueError, OSError):
            pass


def _pieces(lines: list[str]) -> list[tuple[bytes, int]]:
    """Lines grouped into pieces of at most PIPE_BUF bytes (a longer line is cut, on the console only: the log
    file has it whole), with the number of lines in each."""
    pieces: list[tuple[bytes, int]] = []
    current, count = b"", 0
    for line in lines:
        data = line.encode("utf-8", errors="replace") + b"\n"
        if len(data) > PIPE_BUF:
            data = data[: PIPE_BUF - 40].decode("utf-8", errors="ignore").encode() + b" [... cut: see the log file]\n"
        if len(current) + len(data) > PIPE_BUF:
            pieces.append((current, count))
            current, count = b"", 0
        current += data
        count += 1
    if current:
        pieces.append((current, count))
    return pieces


_current: list[Relay] = []


def start(log_path: str | None, secrets: list[str]) -> Callable[[], None] | None:
    """Start the relay when the child has a log file; its `finish`, or None (then output goes to the
    launcher's pipe as it is: no log file, the console is the log)."""
    if not log_path:
        close_given()
        return None
    from tlrun.errors import TlrunError

    try:
        relay = Relay(log_path, secrets)
    except (OSError, TlrunError):
        close_given()
        return None
    _current.append(relay)
    return relay.finish


def finish_current() -> None:
    """This process's relay, finished (before an os._exit that would lose what it holds)."""
    for relay in _current:
        relay.finish()
