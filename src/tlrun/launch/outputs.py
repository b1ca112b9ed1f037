"""Every child's output, by child name: each line redacted, into its log file and (optionally) the console."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from tlrun.launch.logfiles import open_log
from tlrun.launch.spawn import OutputPump
from tlrun.redact import Redactor


class Outputs:
    def __init__(
        self,
        log_dir: Path,
        on_line: Callable[[str, str], None],
        on_log_error: Callable[[str], None],
        secrets: Callable[[], list[str | None]],
    ) -> None:
        self._log_dir = log_dir
        self._on_line = on_line  # (label, line)
        self._on_log_error = on_log_error
        self._secrets = secrets
        self._pumps: dict[str, OutputPump] = {}

    def attach(
        self, name: str, child: subprocess.Popen[bytes], stem: str, label: str | None = None, echo: bool = True
    ) -> Path:
        """Start copying `child`'s output to `<log dir>/<stem>.log`; returns the log file's path."""
        tag = label or name
        on_line = (lambda line: self._on_line(tag, line)) if echo else None
        pump = OutputPump(
            child, open_log(self._log_dir, stem), Redactor(self._secrets()), on_line, on_log_error=self._on_log_error
        )
        self._pumps[name] = pump
        return pump.log_path

    def detach(self, name: str) -> tuple[str, ...]:
        """Wait for the child's last lines, close its log; the last lines kept (for error reports)."""
        pump = self._pumps.pop(name, None)
        if pump is None:
            return ()
        pump.close()
        return tuple(pump.tail)
