"""What a new user reads: messages that say what happened, in words that match it."""

from __future__ import annotations

import json
import re

import pytest

from helpers import Project

pytestmark = pytest.mark.timeout(120)
READY = r"tlrun: \d+ workers? ready"


def test_doctor_outside_the_project_does_not_claim_an_unreachable_broker(project: Project) -> None:
    env = project.env()
    env.pop("CELERY_BROKER_URL")
    result = project.run("doctor", "-A", "examples.app", env=env)
    assert result.returncode == 4
    assert "No module named 'examples' (modules are looked up in /" in result.stdout, result.stdout
    assert "not checked" in result.stdout and "UNREACHABLE" not in result.stdout, result.stdout


def test_doctor_counts_problems_and_notes_apart(project: Project) -> None:
    (project.root / f"{project.app}.py").write_text("from celery import Celery\n\napp = Celery('bare')\n")
    result = project.run("doctor", "-A", project.app, "--ping-window", "0.3")
    lines = result.stdout.splitlines()
    problems = sum(1 for line in lines if re.match(r"\s+(ERROR|WARNING)\s", line))
    notes = sum(1 for line in lines if re.match(r"\s+INFO\s", line))
    assert problems and notes, result.stdout
    counted = f"{problems} problem{'s' if problems != 1 else ''}, {notes} note{'s' if notes != 1 else ''}"
    assert f": {counted} for app" in lines[0], lines[0]
    # Nothing runs: being root is no risk yet, so it is not reported.
    report = json.loads(project.run("doctor", "-A", project.app, "--json", "--ping-window", "0.3").stdout)
    assert "RUNNING_AS_ROOT" not in {f["code"] for f in report["findings"]}


def test_a_refused_second_beat_names_no_node(project: Project) -> None:
    beat = project.launch(command="beat")
    beat.wait_output(r"starting beat \(pid \d+\)", 30)
    second = project.run("beat", "-A", project.app)
    assert second.returncode == 6 and f"pid {beat.pid}" in second.stderr
    assert "node" not in second.stderr, second.stderr


def test_help_shows_the_defaults() -> None:
    from click.testing import CliRunner

    from tlrun.cli import cli

    text = CliRunner().invoke(cli, ["worker", "--help"]).output
    for option, default in [("--grace", "30"), ("--ready-timeout", "30"), ("--ping-window", "1.0; dev 0.5")]:
        assert re.search(rf"{re.escape(option)} .*?\[default: \(?{re.escape(default)}", " ".join(text.split())), option


def test_a_transport_that_does_not_load_is_named_with_its_install_command(project: Project) -> None:
    """A broken or missing client library (pip resolved the wrong redis-py, or none) is an installation
    problem, said as one: never "unsupported scheme"."""
    shadow = project.base / "no_redis"
    (shadow / "redis").mkdir(parents=True)
    (shadow / "redis" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'redis'\", name='redis')\n"
    )
    result = project.run("worker", "-A", project.app, env=project.env(PYTHONPATH=str(shadow)))
    assert result.returncode == 5, result.stderr
    assert "the redis transport cannot be loaded: module 'redis' is missing" in result.stderr
    assert "-m pip install -U 'redis'" in result.stderr and "unsupported scheme" not in result.stderr
    assert "Traceback" not in result.stderr


def test_a_typo_in_the_apps_name_and_an_unknown_broker_host_are_said_as_such(project: Project) -> None:
    """`-A module:typo` (the module exists) is a missing name in it, not a missing module; an unknown broker
    host is a name that does not resolve, not a broker that "did not answer after 0.0 s"."""
    typo = project.run("worker", "-A", f"{project.app}:ap", "--", "--without-mingle", "--without-gossip")
    assert typo.returncode == 4, typo.stdout + typo.stderr
    assert f"module '{project.app}' has no attribute 'ap'" in typo.stderr and "was not found" not in typo.stderr
    unknown = project.run("worker", "-A", project.app, env=project.env(CELERY_BROKER_URL="redis://nohost.invalid/0"))
    assert unknown.returncode == 5, unknown.stdout + unknown.stderr
    assert "broker host 'nohost.invalid' is not known (DNS)" in unknown.stderr, unknown.stderr
    assert "did not answer after" not in unknown.stderr and "Traceback" not in unknown.stderr


def test_celery_missing_from_the_environment_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not `internal error: PackageNotFoundError`: what is missing and the command that installs it."""
    import importlib.util

    from tlrun.errors import ConfigError
    from tlrun.launch import checks

    find_spec = importlib.util.find_spec

    def no_celery(name: str, package: str | None = None) -> object:
        return None if name == "celery" else find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", no_celery)
    with pytest.raises(ConfigError, match="Celery is not installed in") as caught:
        checks.celery_version()
    assert caught.value.exit_code == 3 and "pip install 'celery[redis]'" in str(caught.value.hint)


@pytest.mark.parametrize("command", [["doctor"], ["ps", "--all"], ["export", "systemd"]])
def test_a_reader_that_goes_away_ends_the_command_quietly(project: Project, command: list[str]) -> None:
    """`tlrun doctor | head -1`: the reader closes the pipe; tlrun ends as a program killed by SIGPIPE would
    (141), with no `internal error: BrokenPipeError` and nothing left running."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line: every write fails with EPIPE
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tlrun", *command, "-A", project.app],
            cwd=project.root,
            env=project.env(),
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 141, done.stderr
    assert "BrokenPipeError" not in done.stderr and "internal error" not in done.stderr, done.stderr
