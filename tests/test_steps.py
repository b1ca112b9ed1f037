"""The launch core's pure parts and its steps, without processes: per-role counts, who runs beat, the unit-stop
request file, the restart step's schedule."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tlrun.config import Role, WorkerOptions
from tlrun.launch import guard, launchers, procs, unitstop
from tlrun.launch.verify import ReadyNode, build_report
from tlrun.render import verdict


def _role(name: str, expected: int = 1) -> tuple[str, Any, int]:
    role = Role(name, name, WorkerOptions(), expected, declared=True)
    return (role.name, role.owns_node, role.expected)


def test_each_declared_role_is_counted_by_its_own_node_names() -> None:
    ours = [ReadyNode("a", "a10@h", 10)]
    census = ["b20@h", "b30@other", "celery@h"]  # role b runs twice elsewhere; a hand-started worker too
    only_a = build_report(ours, 1.0, census, 1, {}, [_role("a")])
    assert only_a.as_expected and only_a.answering == 4  # role b and the stranger do not count against a
    both = build_report(ours, 1.0, census, 2, {}, [_role("a"), _role("b")])
    assert not both.as_expected
    assert [(r.role, r.answering, r.expected) for r in both.miscounted] == [("b", 2, 1)]
    lines = verdict(both)
    assert lines[0].endswith("(roles: a 1 of 1, b 2 of 1)")
    assert "warning: 2 workers of role b answer on this broker, expected 1" in lines[-1]
    total = build_report(ours, 1.0, census, 4, {})  # no declared roles (or --expected): one total
    assert total.as_expected and total.roles == ()


def _cmd(command: str, beat: bool | None = None, role: str | None = None) -> launchers.Launcher:
    identity = procs.Identity(os.getpid(), 0.0)
    return launchers.Launcher(identity, launchers.LauncherCommand(command, "app", None, role, beat), "/p")


def test_tlrun_worker_runs_beat_only_when_given_beat() -> None:
    launchers = [_cmd("worker"), _cmd("worker", role="a"), _cmd("dev"), _cmd("worker", beat=True)]
    # A beat launcher competes with dev (the project file's beat = true) and `worker --beat`, never with a
    # plain `tlrun worker`, whatever the project file says.
    found = guard.competing_launchers(launchers, "app", [], True, True)
    assert [(c.cmd.command, c.cmd.beat) for c in found] == [("dev", None), ("worker", True)]
    assert guard.competing_launchers([_cmd("dev")], "app", [], True, False) == []


def test_a_unit_stop_request_is_read_only_from_a_regular_file_of_ours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    requests = unitstop.Requests("proj")
    path = unitstop.request_path("proj", os.getpid())
    path.write_text('{"units": ["reports", "beat", 7]}')
    requests._on_signal(0, None)
    assert requests.pending()
    assert requests.take() == {"reports", "beat"} and not path.exists() and not requests.pending()
    os.mkfifo(path)  # planted: opening it must not block, and it is not read
    assert requests.take() == set()
    path.unlink(missing_ok=True)
    (tmp_path / "elsewhere").write_text('{"units": ["reports"]}')
    path.symlink_to(tmp_path / "elsewhere")
    assert requests.take() == set()
    path.write_text("not json")
    assert requests.take() == set()
    assert requests.take() == set()  # no file at all


class _FakeLauncher:
    """What the restart step uses of a launcher."""

    def __init__(self) -> None:
        self.said: list[str] = []
        self.states: list[str] = []
        self.restarted: list[str] = []

        class _Sup:
            stop_requested = False

        self.sup = _Sup()

    def report(self, event: Any) -> None:
        self.said.append(event.message)

    def set_state(self, unit: Any, state: str, **_fields: Any) -> None:
        unit.state = state
        self.states.append(state)

    def restart_worker(self, unit: Any) -> None:
        self.restarted.append(unit.node)


def test_the_restart_step_schedules_without_blocking_and_gives_up() -> None:
    from tlrun.deploy.restart import RestartSettings, RestartStep
    from tlrun.errors import RestartGiveUpError
    from tlrun.launch.units import WorkerUnit

    step = RestartStep(RestartSettings(first_delay=0.0, give_up_crashes=2, jitter=0.0))
    launcher: Any = _FakeLauncher()
    unit = WorkerUnit(Role("a", "a", WorkerOptions(), 1, True), "h")
    assert step.on_exit(launcher, unit, 0, ()) is False  # a clean exit is not a crash
    assert step.on_exit(launcher, unit, 137, ()) is True
    assert launcher.said == ["worker of role a exited with status 137: restart 1 in 0.0 s"]
    assert unit.state == "starting" and step.poll(launcher)
    step.act(launcher)
    assert launcher.restarted == [unit.node] and not step.poll(launcher)
    assert step.restarts(unit) == 1
    with pytest.raises(RestartGiveUpError, match="giving up on the worker of role a after 2 crashes"):
        step.on_exit(launcher, unit, 1, ())
