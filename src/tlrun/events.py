"""What the launch path tells its caller as it goes. The core never prints; the CLI renders these."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tlrun.launch.sweep import Stray
from tlrun.launch.verify import ReadyReport


@dataclass(frozen=True)
class Notice:
    message: str
    level: str = "info"  # "info" | "warning"


@dataclass(frozen=True)
class StrayFound:
    stray: Stray
    dry_run: bool = False


@dataclass(frozen=True)
class Spawned:
    kind: str  # "worker" or "beat"
    node: str
    pid: int
    log_path: Path | None  # None: no log file (tlrun as PID 1 logs to stdout)
    argv: tuple[str, ...]


@dataclass(frozen=True)
class Ready:
    report: ReadyReport


@dataclass(frozen=True)
class Counted:
    """The census of every worker on the broker ended after the verdict: what it adds (others answering,
    duplicates, counts against the expected)."""

    report: ReadyReport


@dataclass(frozen=True)
class Reloaded:
    changes: tuple[str, ...]  # the files saved (a watcher's reload), else empty
    seconds: float
    report: ReadyReport
    why: str = ""  # what asked for it when no file did: `tlrun reload`, `SIGHUP`
    retiring: tuple[str, ...] = ()  # old workers finishing their tasks beside the new ones (a reload beside)
    base: int = 0  # installed modules the new workers' spares had imported before the save (launch/base.py)


@dataclass(frozen=True)
class Reloading:
    """A reload began (`done` False) or ended, with the new code serving (`ok`) or the old one (for systemd's
    RELOADING=1 / READY=1; the console says it through Reloaded and notices)."""

    why: str
    done: bool = False
    ok: bool = True


@dataclass(frozen=True)
class Saved:
    """The reload watcher saw saved files (before the workers' reload): processes with `reload = true` restart."""

    changes: tuple[str, ...]


@dataclass(frozen=True)
class UnitReady:
    """A stack's process answers (`web ready on http://127.0.0.1:8000`), or started when it has no check."""

    name: str
    kind: str  # "process" or "flower"
    pid: int
    url: str | None
    seconds: float
    how: str | None  # what said it is ready: http, port, output; None: it started


@dataclass(frozen=True)
class WorkerOutput:
    node: str  # the node name, or "beat"
    lines: tuple[str, ...]  # a chunk of the child's output, one or more lines, redacted


@dataclass(frozen=True)
class Exited:
    node: str  # the node name, or "beat"
    status: int
    requested: bool  # True when the stop was asked for (signal), False when the worker ended on its own
    tail: tuple[str, ...] = ()


Event = (
    Notice | StrayFound | Spawned | Ready | Counted | Reloaded | Reloading | Saved | UnitReady | WorkerOutput | Exited
)
Reporter = Callable[[Event], None]
