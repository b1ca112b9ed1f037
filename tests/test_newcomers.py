"""What new users hit first: exit codes that match the docs' table, logs of every unit, -v anywhere, and
messages that say what happened (each test failed before its fix)."""

from __future__ import annotations

import io
import re
import signal
import sys
from pathlib import Path

import pytest

from helpers import Project
from tlrun.errors import HEALTH_DEAD_EXIT_CODE
from tlrun.events import Exited
from tlrun.launch.supervise import Supervisor
from tlrun.launch.verify import NodeSeen, ReadyNode, ReadyReport, RoleCount
from tlrun.render import ConsoleRenderer, verdict

pytestmark = pytest.mark.timeout(120)
ROLES = '[tool.tlrun]\napp = "{app}"\n[tool.tlrun.workers.a]\nqueues = ["a"]\n[tool.tlrun.workers.b]\nqueues = ["b"]\n'


def test_health_with_nothing_running_is_dead_as_the_table_says(project: Project) -> None:
    result = project.run("health", "-A", project.app)
    assert result.returncode == HEALTH_DEAD_EXIT_CODE == 15, result.stdout + result.stderr
    assert f"app {project.app}: dead (no tlrun worker runs on this host" in result.stdout
    (project.root / "pyproject.toml").write_text(ROLES.format(app=project.app))
    roles = project.run("health")
    assert roles.returncode == 15 and "role a of app" in roles.stdout and "role b of app" in roles.stdout


def test_logs_of_each_unit_named_and_no_files_is_no_error(project: Project) -> None:
    none = project.run("logs", "-A", project.app)
    assert none.returncode == 0 and "no log files in" in none.stdout, none.stderr
    (project.root / "pyproject.toml").write_text(ROLES.format(app=project.app))
    logs = project.root / "logs"
    logs.mkdir()
    for name, text in (
        ("celery_a_10.log", "a line\n"),
        ("celery_b_10.log", "b line\n"),
        ("celery_beat_10.log", "tick\n"),
    ):
        (logs / name).write_text(text)
    shown = project.run("logs")
    assert shown.returncode == 0, shown.stderr
    for name in ("celery_a_10.log", "celery_b_10.log", "celery_beat_10.log"):
        assert f"==> {logs / name} <==" in shown.stdout  # every unit's newest file, each under its name
    beat = project.run("logs", "--role", "beat")
    assert beat.returncode == 0 and beat.stdout == "tick\n", beat.stdout + beat.stderr
    one = project.run("logs", "--role", "b")
    assert one.stdout == "b line\n"


@pytest.mark.parametrize("command", [["ps"], ["stop"], ["logs", "--list"], ["logs"]])
def test_verbose_is_accepted_after_the_command_too(project: Project, command: list[str]) -> None:
    result = project.run(*command, "-A", project.app, "-v")
    assert result.returncode == 0, result.stderr


def test_verbose_shows_tlruns_steps_and_not_the_libraries_debug_chatter(project: Project) -> None:
    result = project.run("doctor", "-A", project.app, "-v", "--json")
    assert result.returncode in (0, 13), result.stderr
    assert not re.search(r"tlrun: DEBUG (redis|kombu|amqp|celery)", result.stderr), result.stderr
    assert "MAINT_NOTIFICATIONS" not in result.stderr


def _report(nodes: int, others: int, role_answering: int | None = None) -> ReadyReport:
    ours = tuple(ReadyNode("default", f"api{i}@h", 100 + i) for i in range(nodes))
    seen = tuple(NodeSeen(f"celery{i}@h", 1, ()) for i in range(others))
    roles = (RoleCount("a", role_answering, 2),) if role_answering is not None else ()
    return ReadyReport(ours, 0.5, seen, expected=nodes, roles=roles)


def test_the_verdict_counts_the_workers_it_names_and_agrees_in_number() -> None:
    lines = verdict(_report(1, 1))
    assert lines[0].startswith("1 worker ready: api0@h (pid 100)")  # was "2 workers ready" naming one
    assert "also answering: celery0@h" in lines[1]
    assert "warning: 2 workers answer on this broker, expected 1" in lines[2]
    lines = verdict(_report(1, 0, role_answering=1))
    assert "warning: 1 worker of role a answers on this broker, expected 2" in lines[1]  # was "1 workers"


def test_a_worker_that_ends_with_no_log_lines_gets_no_empty_heading() -> None:
    for tail in ((), ("", "  ")):  # as PID 1 its output went to stdout: no log file lines to quote
        err = io.StringIO()
        ConsoleRenderer(io.StringIO(), err, color=False)(Exited("api1@h", 1, requested=False, tail=tail))
        assert "exited on its own with status 1" in err.getvalue() and "last lines" not in err.getvalue()
    err = io.StringIO()
    ConsoleRenderer(io.StringIO(), err, color=False)(Exited("api1@h", 1, requested=False, tail=("boom",)))
    assert "last lines of its log:\n" in err.getvalue() and "  boom" in err.getvalue()


def test_a_child_stopped_before_it_handles_sigterm_ends_cleanly(tmp_path: Path) -> None:
    """`tlrun beat` stopped right after "starting beat" exited 143 where 0.3 s later it exited 0: the SIGTERM
    that tlrun sends and the child had no handler for yet is the stop tlrun asked for."""
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]  # default SIGTERM disposition
    with Supervisor(10.0) as sup:
        first = sup.start("beat", sleeper, {}, tmp_path)
        assert sup.stop("beat") == 0
        # A SIGTERM tlrun did not send (someone else's) is still reported as what it was.
        child = sup.start("other", sleeper, {}, tmp_path)
        child.send_signal(signal.SIGTERM)
        child.wait(10)
        assert sup.reap("other") == 128 + signal.SIGTERM
    for popen in (first, child):  # their output pipes (the launcher's relay reads and closes them)
        if popen.stdout is not None:
            popen.stdout.close()
