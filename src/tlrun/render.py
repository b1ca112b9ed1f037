"""Human rendering of launch-path events (the CLI's side; the core never prints)."""

from __future__ import annotations

import sys
from typing import TextIO

from tlrun.events import Event, Exited, Notice, Ready, Spawned, StrayFound, WorkerOutput
from tlrun.verify import ReadyReport


def verdict(report: ReadyReport) -> list[str]:
    n = report.answering
    lines = [
        f"{n} worker{'s' if n != 1 else ''} ready: {report.node} (pid {report.worker_pid}) in {report.seconds:.1f} s"
    ]
    if report.renamed_from:
        lines.append(f"  (renamed from {report.renamed_from}, which another worker already uses)")
    for other in report.others:
        where = f"pid {', '.join(map(str, other.local_pids))} on this host" if other.local_pids else "elsewhere"
        dup = f", DUPLICATE: {other.replies} replies" if other.duplicated else ""
        lines.append(f"  also answering: {other.name} ({where}{dup})")
    if report.answering != report.expected:
        lines.append(
            f"  warning: {report.answering} workers answer on this broker, expected {report.expected}"
            " (--strict makes this fatal)"
        )
    return lines


class ConsoleRenderer:
    """Prints events as they come: tlrun's own lines prefixed `tlrun:`, worker lines with its node."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None, quiet_worker: bool = False) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.quiet_worker = quiet_worker

    def _say(self, line: str, stream: TextIO | None = None) -> None:
        stream = stream or self.out
        stream.write(line + "\n")
        stream.flush()

    def __call__(self, event: Event) -> None:
        if isinstance(event, Notice):
            prefix = "tlrun: warning: " if event.level == "warning" else "tlrun: "
            self._say(prefix + event.message, self.err if event.level == "warning" else None)
        elif isinstance(event, StrayFound):
            verb = "would stop" if event.dry_run else "stopping"
            self._say(f"tlrun: {verb} stray {event.stray.describe()}")
        elif isinstance(event, Spawned):
            self._say(f"tlrun: starting {event.node} (pid {event.pid}), log {event.log_path}")
        elif isinstance(event, Ready):
            for line in verdict(event.report):
                self._say("tlrun: " + line)
        elif isinstance(event, WorkerOutput):
            if not self.quiet_worker:
                self._say(f"[{event.node.split('@', 1)[0]}] {event.line}")
        elif isinstance(event, Exited):
            if event.requested:
                self._say(f"tlrun: {event.node} stopped (status {event.status})")
            else:
                self._say(f"tlrun: {event.node} exited on its own with status {event.status}", self.err)
                if event.tail:
                    self._say("tlrun: last lines of its log:", self.err)
                    for line in event.tail[-15:]:
                        self._say("  " + line, self.err)
