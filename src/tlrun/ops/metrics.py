"""`tlrun doctor --format prometheus`: the doctor report as Prometheus text exposition (version 0.0.4)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from tlrun.ops.doctor import DoctorReport

# name, help, value from the report
_GAUGES = (
    (
        "tlrun_workers_answering",
        "Ping replies from workers on the broker (raw count, duplicates included).",
        lambda r: sum(n.replies for n in r.nodes),
    ),
    ("tlrun_workers_expected", "Workers expected to answer (--expected).", lambda r: r.expected_workers),
    (
        "tlrun_duplicate_node_names",
        "Node names that more than one worker answers to.",
        lambda r: sum(1 for n in r.nodes if n.replies > 1),
    ),
    (
        "tlrun_stray_processes",
        "Project workers and beats on this host with no live tlrun launcher.",
        lambda r: sum(1 for p in r.local if p.stray),
    ),
    (
        "tlrun_orphan_processes",
        "Project processes on this host whose parent died (reparented to init).",
        lambda r: sum(1 for p in r.local if p.ppid == 1),
    ),
    (
        "tlrun_beats",
        "Beat processes of the project on this host.",
        lambda r: sum(1 for p in r.local if p.kind == "beat"),
    ),
    ("tlrun_broker_up", "1 when the broker answered, else 0.", lambda r: int(r.broker_reachable)),
    (
        "tlrun_broker_connect_seconds",
        "Time to open a connection to the broker.",
        lambda r: r.broker_connect_s if r.broker_connect_s is not None else float("nan"),
    ),
    ("tlrun_doctor_exit_code", "What `tlrun doctor` would exit with (0 healthy).", lambda r: r.exit_code),
)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def prometheus(report: DoctorReport) -> str:
    labels = f'app="{_label(report.app)}",project="{_label(report.project_id)}"'
    lines = []
    for name, help_text, value in _GAUGES:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} gauge")
        lines.append(f"{name}{{{labels}}} {value(report)}")
    return "\n".join(lines) + "\n"


def write_textfile(path: Path, text: str) -> None:
    """Atomically, as node_exporter's textfile collector wants: write a temp file, then rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
