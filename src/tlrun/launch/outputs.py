"""Every child's output, by child name: each line redacted, into its log file and (optionally) the console."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

from tlrun.launch._child import LOG_ENV
from tlrun.launch.logfiles import open_log
from tlrun.launch.pump import OutputPump
from tlrun.redact import Redactor


class Outputs:
    def __init__(
        self,
        log_dir: Path | None,
        on_lines: Callable[[str, list[str]], None],
        on_log_error: Callable[[str], None],
        secrets: Callable[[], list[str | None]],
    ) -> None:
        self._log_dir = log_dir  # None: no log files, the console only (tlrun as PID 1: stdout is the log)
        self._on_lines = on_lines  # (label, lines)
        self._on_log_error = on_log_error
        self._secrets = secrets
        self._pumps: dict[str, OutputPump] = {}
        self._gates: dict[str, _Gate] = {}
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def log_dir(self) -> Path | None:
        return self._log_dir

    def child_env(self, stem: str) -> dict[str, str]:
        """Where the child writes its own output once its launcher is gone (see `_child.py`)."""
        return {LOG_ENV: str(self._log_dir / f"{stem}.log")} if self._log_dir is not None else {}

    def attach(
        self,
        name: str,
        child: subprocess.Popen[bytes],
        stem: str,
        label: str | None = None,
        echo: bool = True,
        hold_until: str | None = None,
        observe: Callable[[list[str]], None] | None = None,
        own_log: bool = False,
    ) -> Path | None:
        """Start copying `child`'s output to `<log dir>/<stem>.log`; returns the log file's path (None
        without a log directory).

        With `hold_until`, console lines wait until a line contains it (a worker's banner) or `release`:
        a worker that fails before that shows tlrun's one-line error, not Celery's traceback (which stays
        in the log file and in the error's details, shown with -v).

        `own_log`: the child writes its log file itself (relay.py, LOG_ENV in its environment), and sends
        the console a copy that never blocks it; the launcher only checks the file, prunes old ones, and
        relays to the console."""
        tag = label or name
        on_lines: Callable[[list[str]], None] | None = None
        if echo:
            gate = _Gate(lambda lines: self._on_lines(tag, lines), hold_until)
            self._gates[name] = gate
            on_lines = gate
        if observe is not None:  # a readiness pattern: sees every line (redacted), before the console
            on_lines = _Observed(observe, on_lines)
        log = open_log(self._log_dir, stem) if self._log_dir is not None else None
        log_path = log.path if log is not None else None
        if log is not None and own_log:
            log.close()
            log = None
        pump = OutputPump(child, log, Redactor(self._secrets()), on_lines, on_log_error=self._on_log_error)
        pump.log_path = log_path
        self._pumps[name] = pump
        self._children[name] = child
        return pump.log_path

    def rename(self, old: str, new: str) -> None:
        """A prepared worker's output keeps flowing under the name of the worker it replaces."""
        if old in self._pumps:
            self._pumps[new] = self._pumps.pop(old)
        if old in self._gates:
            self._gates[new] = self._gates.pop(old)
        if old in self._children:
            self._children[new] = self._children.pop(old)

    def release(self, name: str) -> None:
        """Let a held child's console lines through (it is ready)."""
        gate = self._gates.get(name)
        if gate is not None:
            gate.open()

    def detach(self, name: str) -> tuple[str, ...]:
        """Wait for the child's last lines, close its log; the last lines kept (for error reports)."""
        self._gates.pop(name, None)
        pump = self._pumps.pop(name, None)
        child = self._children.pop(name, None)
        if pump is None:
            return ()
        pump.close()
        if child is not None:
            self._unread(child, pump)
        return tuple(pump.tail)

    def _unread(self, child: subprocess.Popen[bytes], pump: OutputPump) -> None:
        """A child that wrote its own log and was killed (SIGKILL, the OOM killer) before its relay read its
        last lines: they are still in the pipe (spawn.unread), and go into its log file and the tail here."""
        from tlrun.launch import spawn
        from tlrun.launch.logfiles import WorkerLog

        data = spawn.unread(child.pid, child.poll() is not None)
        if not data or pump.log_path is None:
            return
        lines = Redactor(self._secrets())(data.decode("utf-8", errors="replace")).rstrip("\n").split("\n")
        lines = lines[logged_already(pump.log_path, lines) :]
        if not lines:
            return
        pump.tail.extend(lines)
        try:
            log = WorkerLog(pump.log_path)
        except OSError:
            return
        try:
            log.write_lines(lines)
        except OSError:
            pass
        finally:
            log.close()


class _Gate:
    """Passes lines on, or holds them until a line contains `marker` (or `open()`), then flushes them."""

    def __init__(self, out: Callable[[list[str]], None], marker: str | None) -> None:
        self._out = out
        self._marker = marker
        self._held: list[str] | None = [] if marker else None
        self._lock = threading.Lock()

    def __call__(self, lines: list[str]) -> None:
        with self._lock:
            if self._held is not None:
                marker = self._marker
                at = next((i for i, line in enumerate(lines) if marker is not None and marker in line), None)
                if at is None:
                    self._held.extend(lines)
                    return
                # The banner's line and what follows it pass with the held lines, in order.
                held, self._held = self._held, None
                lines = held + lines
        if lines:
            self._out(lines)

    def open(self) -> None:
        with self._lock:
            if self._held is not None:
                held, self._held = self._held, None
                if held:
                    self._out(held)


class _Observed:
    """Shows each chunk of lines to `observe`, then passes it on (or drops it, when nothing echoes)."""

    def __init__(self, observe: Callable[[list[str]], None], out: Callable[[list[str]], None] | None) -> None:
        self._observe = observe
        self._out = out

    def __call__(self, lines: list[str]) -> None:
        self._observe(lines)
        if self._out is not None:
            self._out(lines)


def logged_already(path: Path, lines: list[str]) -> int:
    """How many of `lines` (from the start) the log file already ends with: the child's relay wrote them, and
    was killed before it took them out of the pipe (relay.drain_written_first). At most one chunk's worth."""
    from tlrun.launch.logfiles import open_for_reading
    from tlrun.launch.pump import CHUNK

    window = 2 * CHUNK
    try:
        with open_for_reading(path) as fh:
            size = os.fstat(fh.fileno()).st_size
            fh.seek(max(0, size - window))
            tail = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return 0
    if not tail.endswith("\n"):
        return 0
    last = tail[:-1].rpartition("\n")[2]
    whole = size <= window  # the tail is the whole file: it starts at a line's start
    total, candidates = 0, []
    for k, line in enumerate(lines, 1):
        total += len(line) + 1
        if total > window:
            break
        if line == last:
            candidates.append(k)
    for k in reversed(candidates):  # the longest whole-line prefix of `lines` at the very end of the log
        text = "\n".join(lines[:k]) + "\n"
        if tail.endswith(text) and (tail[-len(text) - 1 : -len(text)] == "\n" or (whole and len(tail) == len(text))):
            return k
    return 0
