"""Human rendering of launch-path events (the CLI's side; the core never prints)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, TextIO

from tlrun.events import (
    Counted,
    Event,
    Exited,
    Notice,
    Ready,
    Reloaded,
    Spawned,
    StrayFound,
    UnitReady,
    WorkerOutput,
)
from tlrun.launch.sweep import format_age
from tlrun.launch.verify import ReadyReport

if TYPE_CHECKING:  # the launch path imports this module: doctor's and ps's modules only where they run
    from tlrun.cluster.view import ClusterView
    from tlrun.ops.doctor import DoctorReport
    from tlrun.ops.inventory import LocalProcess

_CODES = {
    "bold": "1",
    "dim": "2",
    "red": "31",
    "green": "32",
    "yellow": "33",
    "blue": "34",
    "magenta": "35",
    "cyan": "36",
    "bright_green": "92",
    "bright_yellow": "93",
    "bright_blue": "94",
    "bright_magenta": "95",
}
_LABEL_COLOURS = ("cyan", "yellow", "green", "magenta", "blue", "bright_green", "bright_yellow", "bright_magenta")


def _label_colour(name: str) -> str:
    """Each unit's tag in a colour of its own, the same in every run (honcho's look)."""
    return _LABEL_COLOURS[sum(name.encode()) % len(_LABEL_COLOURS)]


def use_color(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    if environ.get("NO_COLOR"):
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _silence(stream: TextIO) -> None:
    """Point a dead standard stream at /dev/null, so that Python's flush at exit does not fail on it."""
    try:
        fd = stream.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, fd)
        os.close(devnull)
    except (OSError, ValueError):
        pass


def plural(n: int, word: str) -> str:
    """`1 worker`, `2 workers`; `1 worker answers`, `2 workers answer` with verb=True."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def verdict(report: ReadyReport) -> list[str]:
    # The count is of this launcher's nodes, the ones the line names; other workers follow as "also answering".
    ours = ", ".join(f"{node.node} (pid {node.pid})" for node in report.nodes)
    per_role = ", ".join(f"{r.role} {r.answering} of {r.expected}" for r in report.roles)
    counts = f" (roles: {per_role})" if per_role else ""
    lines = [f"{plural(len(report.nodes), 'worker')} ready: {ours} in {report.seconds:.1f} s{counts}"]
    for node in report.nodes:
        if node.renamed_from:
            lines.append(f"  (renamed from {node.renamed_from}, which another worker already uses)")
    for other in report.others:
        where = f"pid {', '.join(map(str, other.local_pids))} on this host" if other.local_pids else "elsewhere"
        dup = f", DUPLICATE: {other.replies} replies" if other.duplicated else ""
        lines.append(f"  also answering: {other.name} ({where}{dup})")
    for role in report.miscounted:
        lines.append(
            f"  warning: {plural(role.answering, 'worker')} of role {role.role} "
            f"{'answers' if role.answering == 1 else 'answer'} on this broker, expected "
            f"{role.expected} (--strict makes this fatal)"
        )
    if not report.roles and report.answering != report.expected and not report.census_pending:
        lines.append(
            f"  warning: {plural(report.answering, 'worker')} {'answers' if report.answering == 1 else 'answer'} "
            f"on this broker, expected {report.expected}"
            " (--strict makes this fatal)"
        )
    return lines


class ConsoleRenderer:
    """Prints events as they come: tlrun's own lines prefixed `tlrun:`, worker lines with its node."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None, color: bool | None = None) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.color = use_color(self.out) if color is None else color
        self._dead: set[TextIO] = set()

    def _paint(self, text: str, *styles: str) -> str:
        if not self.color or not styles:
            return text
        return f"\033[{';'.join(_CODES[s] for s in styles)}m{text}\033[0m"

    def _say(self, line: str, *styles: str, err: bool = False) -> None:
        self._write(self.err if err else self.out, self._paint(line, *styles) + "\n")

    def _write(self, stream: TextIO, text: str, worker_line: bool = False) -> None:
        """Write, or drop a stream that went away (a closed pipe, an IDE console closed): tlrun keeps
        supervising. A worker's line to a dead console raises BrokenPipeError, so that its output pump
        drops the console and notes that in the log file, which keeps every line."""
        if stream in self._dead:
            if worker_line:
                raise BrokenPipeError("the console is closed")
            return
        try:
            stream.write(text)
            stream.flush()
        except (OSError, ValueError):
            self._dead.add(stream)
            _silence(stream)
            if worker_line:
                raise BrokenPipeError("the console is closed") from None

    def __call__(self, event: Event) -> None:
        if isinstance(event, Notice):
            if event.level == "warning":
                self._say("tlrun: warning: " + event.message, "yellow", err=True)
            else:
                self._say("tlrun: " + event.message, "cyan")
        elif isinstance(event, StrayFound):
            verb = "would stop" if event.dry_run else "stopping"
            self._say(f"tlrun: {verb} stray {event.stray.describe()}", "yellow")
        elif isinstance(event, Spawned):
            what = event.kind if event.kind in ("beat", "broker") else event.node
            where = f"log {event.log_path}" if event.log_path is not None else "output on stdout"
            self._say(f"tlrun: starting {what} (pid {event.pid}), {where}", "cyan")
        elif isinstance(event, Ready):
            for i, line in enumerate(verdict(event.report)):
                self._say("tlrun: " + line, *(("green", "bold") if i == 0 else ("yellow",)))
        elif isinstance(event, Counted):
            for line in verdict(event.report)[1:]:  # the first line was the verdict itself
                self._say("tlrun: " + line, "yellow")
        elif isinstance(event, Reloaded):
            shown = ", ".join(event.changes[:3]) + (
                f" (+{len(event.changes) - 3} more)" if len(event.changes) > 3 else ""
            )
            cause = f"{shown} changed" if shown else f"asked by {event.why}" if event.why else "files changed"
            retiring = (
                f"; {', '.join(event.retiring)} finish{'es its' if len(event.retiring) == 1 else ' their'} tasks"
                if event.retiring
                else ""
            )
            self._say(
                f"tlrun: reloaded: {cause}; new worker"
                f"{'s' if len(event.report.nodes) > 1 else ''} "
                + ", ".join(f"{n.node} (pid {n.pid})" for n in event.report.nodes)
                + f" ready, swap took {event.seconds:.1f} s"
                + (f" ({event.base} installed modules imported before the save)" if event.base else "")
                + retiring,
                "green",
            )
        elif isinstance(event, UnitReady):
            took = f" ({event.seconds:.1f} s)" if event.how else ""
            where = f"ready on {event.url}" if event.url else "ready"
            if event.how is None:
                where = f"running (pid {event.pid})"
            self._say(f"tlrun: {event.name} {where}{took}", "green")
        elif isinstance(event, WorkerOutput):
            name = event.node.split("@", 1)[0]
            tag = self._paint(f"[{name}]", _label_colour(name)) + " "
            self._write(self.out, "".join(tag + line + "\n" for line in event.lines), worker_line=True)
        elif isinstance(event, Exited):
            if event.requested:
                self._say(f"tlrun: {event.node} stopped (status {event.status})", "cyan")
            else:
                self._say(f"tlrun: {event.node} exited on its own with status {event.status}", "red", err=True)
                tail = [line for line in event.tail[-15:] if line.strip()]
                if tail:  # as PID 1 its output went to stdout, above: no log file to quote
                    self._say("tlrun: last lines of its log:", err=True)
                    for line in tail:
                        self._say("  " + line, err=True)


def _mib(n: int) -> str:
    return f"{n / 1048576:.0f}M"


def ps_table(rows: list[LocalProcess]) -> list[str]:
    if not rows:
        return ["no Celery workers, beats or processes"]
    guarded = any(p.memory_limit is not None for p in rows)  # the GUARD column only where a guard runs
    header: tuple[str, ...] = (
        "PID",
        "KIND",
        "NAME",
        "NODE",
        "STATE",
        "UPTIME",
        "RSS",
        "CPU",
        "POOL",
        "LAUNCHER",
        "GUARD",
    )
    body: list[tuple[str, ...]] = [
        (
            str(p.pid),
            p.kind,
            p.as_dict()["name"] or "-",
            f"{p.node} :{p.port}" if p.port is not None and p.node else p.node or "-",
            p.state,
            format_age(p.uptime_s),
            _mib(p.rss_bytes),
            f"{p.cpu_s:.1f}s",
            str(p.pool_children),
            str(p.launcher_pid) if p.launcher_pid else ("STRAY" if p.stray else "-"),
            _guard_cell(p),
        )
        for p in rows
    ]
    if not guarded:
        header, body = header[:-1], [row[:-1] for row in body]
    widths = [max(len(r[i]) for r in (header, *body)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in (header, *body)]
    for p in rows:  # held by the process's watchdog, stopped with it
        if p.escaped:
            pids = ", ".join(map(str, p.escaped))
            lines.append(f"  {p.as_dict()['name']} (pid {p.pid}) also holds, outside its session: pids {pids}")
    return lines


def _guard_cell(p: LocalProcess) -> str:
    """The memory guard's limit and each pool child's PSS: `limit 200M: 61M 58M`."""
    if p.memory_limit is None:
        return "-"
    children = " ".join(_mib(size) for size in (p.pool_memory or {}).values())
    return f"limit {_mib(p.memory_limit)}" + (f": {children}" if children else "")


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def doctor_report(report: DoctorReport) -> list[str]:
    problems = [f for f in report.findings if f.severity in ("error", "warning")]
    notes = len(report.findings) - len(problems)
    answering = sum(n.replies for n in report.nodes)
    if not problems:
        names = ", ".join(n.name for n in report.nodes) or "none"
        extra = f"; {_plural(notes, 'note')} in --json" if notes else ""
        return [
            f"tlrun doctor: healthy: {answering} worker(s) answer ({names}), no strays, {report.seconds:.1f} s{extra}"
        ]
    counted = _plural(len(problems), "problem") + (f", {_plural(notes, 'note')}" if notes else "")
    lines = [f"tlrun doctor: {report.status}: {counted} for app {report.app} in {report.project_root}"]
    checked = report.broker_connect_s is not None or any(f.code == "BROKER_UNREACHABLE" for f in report.findings)
    state = "reachable" if report.broker_reachable else "UNREACHABLE" if checked else "not checked"
    lines.append(f"  broker {report.broker_url}: {state}")
    for node in report.nodes:
        pids = f", pid {', '.join(map(str, node.local_pids))}" if node.local_pids else ""
        # The node name decides: a name naming another host is remote, even if a process here carries it.
        where = f"this host{pids}" if node.this_host else f"remote host {node.host}{pids}"
        dup = f", {node.replies} replies" if node.replies > 1 else ""
        lines.append(f"  node {node.name} ({where}{dup})")
    for finding in report.findings:
        lines.append(f"  {finding.severity.upper():7} {finding.code}: {finding.message}")
        if finding.fix:
            lines.append(f"          fix: {finding.fix}")
    return lines


def cluster_report(view: ClusterView) -> list[str]:
    hosts = view.hosts
    lease = f"beat lease: {view.beat_lease}" if view.beat_lease else "beat lease: nobody holds it"
    lines = [f"tlrun: app {view.app} on {view.broker_url}: {len(view.nodes)} node(s) on {len(hosts)} host(s); {lease}"]
    for host, nodes in hosts.items():
        lines.append(f"  {host}" + ("  (holds the beat lease)" if host == view.beat_lease_host else ""))
        for node in nodes:
            role = f"role {node.role}" if node.role else "no role of this project"
            queues = f"queues {','.join(node.queues)}" if node.queues else "no queues reported"
            flag = f"  DUPLICATE: {node.replies} replies" if node.replies > 1 else ""
            silent = "  (no ping reply)" if node.replies == 0 else ""
            lines.append(f"    {node.name}  {role}  {queues}{flag}{silent}")
    for node in view.duplicates:
        lines.append(
            f"tlrun: error: {node.replies} workers answer as {node.name}: tasks are split and control commands "
            "reach only one of them (give each a unique name: tlrun names them <prefix><pid>@<host>)"
        )
    return lines
