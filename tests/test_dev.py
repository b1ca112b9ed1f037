"""`tlrun dev`, `tlrun beat` and `tlrun ide`: real broker, real workers, real file changes."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from helpers import (
    Launched,
    Project,
    RedisServer,
    free_port,
    gone,
    ping_replies,
    send_task,
    throwaway_user,
    wait_for,
)
from tlrun.config import project_id

pytestmark = pytest.mark.timeout(120)

DEV_APP = """
import os
import time

from celery import Celery

VALUE = {value}

app = Celery("{name}")
app.conf.update(result_backend=os.environ.get("TEST_RESULT_BACKEND"), broker_connection_retry_on_startup=True)
app.conf.beat_schedule = {{"tick": {{"task": "{name}.tick", "schedule": 0.5}}}}


@app.task
def value():
    return VALUE


@app.task
def whoami():
    return os.getpid()


@app.task
def sleep(seconds):
    time.sleep(seconds)
    return seconds


@app.task
def tick():
    print("TICK", flush=True)


@app.task
def record(i):
    import redis

    client = redis.Redis.from_url(os.environ["TEST_RESULT_BACKEND"])
    client.rpush("runs", "%s:%s" % (i, VALUE))
    client.close()
"""

READY = r"tlrun: \d+ workers? ready: (\S+) \(pid (\d+)\)"
ROOT = Path(__file__).resolve().parent.parent


def write_app(project: Project, value: int | str) -> None:
    (project.root / f"{project.app}.py").write_text(DEV_APP.format(name=project.app, value=value))


def call(project: Project, task: str, *args: object, timeout: float = 20) -> object:
    return send_task(project.broker_url, f"{project.app}.{task}", *args).get(timeout=timeout)


def dev(project: Project, *args: str) -> Launched:
    return project.launch(*args, command="dev", fast=False)


@pytest.fixture
def dev_project(project: Project) -> Project:
    write_app(project, 1)
    return project


def test_dev_starts_a_private_broker_when_none_answers(tmp_path: Path) -> None:
    port = free_port()
    proj = Project(tmp_path / "projects", f"redis://:dev-pw@127.0.0.1:{port}/0")  # other login users here
    write_app(proj, 1)
    try:
        launched = dev(proj)
        match = launched.wait_output(r"started a private redis-server \(pid (\d+), no persistence\)", 30)
        redis_pid = int(match.group(1))
        launched.wait_output(READY, 30)
        assert call(proj, "value") == 1
        launched.send(signal.SIGINT)
        assert launched.wait(30) == 0
        assert gone([redis_pid])
    finally:
        proj.cleanup()


def test_no_password_private_broker_on_a_host_with_other_login_users_is_refused(tmp_path: Path) -> None:
    import os
    import pwd

    from tlrun.launch import owner

    entries = [pwd.struct_passwd(("alice", "x", 1500, 1500, "", "/home/alice", "/bin/bash"))]
    entries.append(pwd.struct_passwd(("svc", "x", 1501, 1501, "", "/", "/usr/sbin/nologin")))
    entries.append(pwd.struct_passwd(("me", "x", os.getuid(), 0, "", "/", "/bin/sh")))
    assert owner.other_login_users(entries) == ["alice"]  # a service account and we ourselves do not count
    with throwaway_user("/bin/sh") as user:  # a login user
        _private_broker_needs_a_password(tmp_path, user.pw_name)


def _private_broker_needs_a_password(tmp_path: Path, name: str) -> None:
    port = free_port()
    proj = Project(tmp_path / "projects", f"redis://127.0.0.1:{port}/3")
    write_app(proj, 1)
    try:
        result = proj.run("dev", "-A", proj.app, timeout=60)
        assert result.returncode == 5, result.stdout + result.stderr
        assert "other login users" in result.stderr and name in result.stderr
        assert f"CELERY_BROKER_URL=redis://:<a password>@127.0.0.1:{port}/3" in result.stderr  # the user's db
    finally:
        proj.cleanup()


def test_private_broker_takes_a_tricky_password_on_stdin_and_leaves_it_nowhere(tmp_path: Path) -> None:
    from urllib.parse import quote

    import psutil
    import redis

    password = 'p"a\\ss%40 w:rd#é'
    port = free_port()
    proj = Project(tmp_path / "projects", f"redis://:{quote(password, safe='')}@127.0.0.1:{port}/0")
    write_app(proj, 1)
    try:
        launched = dev(proj)
        launched.wait_output(r"started a private redis-server", 30)
        launched.wait_output(READY, 30)
        assert call(proj, "value") == 1  # the worker and this client authenticate with the decoded password
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, socket_timeout=2).ping()  # nobody gets in without it
        everything = [p for p in tmp_path.rglob("*") if p.is_file()] + [
            p for p in proj.runtime.rglob("*") if p.is_file()
        ]
        assert not [p for p in everything if password.encode() in p.read_bytes()]
        for proc in psutil.process_iter(["cmdline"]):
            assert password not in " ".join(proc.info["cmdline"] or [])
        launched.send(signal.SIGINT)
        assert launched.wait(30) == 0
    finally:
        proj.cleanup()


@pytest.mark.matrix
def test_debug_mode_runs_tasks_in_the_launcher_and_never_kills_a_busy_worker(dev_project: Project) -> None:
    # A long task waits in the queue: the solo worker takes it at once and cannot answer pings meanwhile.
    busy = send_task(dev_project.broker_url, f"{dev_project.app}.sleep", 8)
    launched = dev(dev_project, "--debug", "--ready-timeout", "1")
    node = launched.wait_output(r"debug mode: worker (\S+) runs in this process", 30).group(1)
    launched.wait_output(r"has not answered a ping within 1 s \(paused in the debugger\? tlrun leaves it alone\)")
    # While the task blocks the solo pool, the in-process worker is found like any other.
    health = dev_project.run("health", "-A", dev_project.app, "--timeout", "0.3", "--retries", "0")
    assert health.returncode == 14 and "tlrun dev --debug" in health.stdout, health.stdout + health.stderr
    rows = json.loads(dev_project.run("ps", "-A", dev_project.app, "--json").stdout)
    assert [(r["pid"], r["kind"], r["role"], r["node"]) for r in rows] == [(launched.pid, "worker", "default", node)]
    report = json.loads(dev_project.run("doctor", "-A", dev_project.app, "--json", "--ping-window", "0.3").stdout)
    codes = {f["code"] for f in report["findings"]}
    assert "NO_WORKERS" not in codes and "SILENT_WORKER" in codes and "STRAY_PROCESS" not in codes
    assert busy.get(timeout=30) == 8
    assert call(dev_project, "whoami") == launched.pid
    assert launched.proc.poll() is None
    launched.send(signal.SIGINT)
    assert launched.wait(30) == 0


def test_debug_mode_from_environment_with_beat(dev_project: Project) -> None:
    launched = dev_project.launch("--beat", command="dev", fast=False, env=dev_project.env(DEBUG_MODE="1"))
    launched.wait_output(r"debug mode: worker", 30)
    launched.wait_output(READY, 30)
    assert call(dev_project, "whoami") == launched.pid
    beat_pid = int(launched.wait_output(r"starting beat \(pid (\d+)\)", 10).group(1))
    launched.wait_output(r"TICK", 20)  # the beat child sends, the in-process worker runs
    launched.send(signal.SIGINT)
    assert launched.wait(30) == 0
    assert gone([beat_pid])


def test_reload_swaps_to_new_code_never_two_at_once_and_survives_a_syntax_error(dev_project: Project) -> None:
    launched = dev(dev_project, "--reload", "--concurrency", "1")
    launched.wait_output(READY, 30)
    assert call(dev_project, "value") == 1

    most = 0
    stop = threading.Event()

    def sample() -> None:
        # Raw ping replies: two workers consuming at once would both answer. (Two processes may exist for a
        # moment by design: the next worker imports the new code, held, before it connects.)
        nonlocal most
        while not stop.is_set():
            most = max(most, len(ping_replies(dev_project.broker_url, timeout=0.2)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        write_app(dev_project, 2)
        launched.wait_output(
            rf"reloaded: {dev_project.app}\.py changed; new worker \S+ \(pid \d+\) ready, swap took", 30
        )
        assert call(dev_project, "value") == 2

        write_app(dev_project, "(")  # a syntax error
        launched.wait_output(
            r"reload failed: app '\S+' does not import: SyntaxError.*; the worker of \d\d:\d\d:\d\d keeps running "
            r"the previous code",
            30,
        )
        assert launched.proc.poll() is None
        assert call(dev_project, "value") == 2  # the old worker still serves
        write_app(dev_project, 3)
        wait_for(lambda: launched.output().count("reloaded:") >= 2, 30, "the reload after the fix")
        assert call(dev_project, "value") == 3
    finally:
        stop.set()
        sampler.join(5)
    assert most == 1, f"saw {most} workers answering at once during reloads"


@pytest.mark.matrix
def test_beat_runs_periodic_tasks_and_a_second_beat_is_refused(dev_project: Project) -> None:
    launched = dev(dev_project, "--beat")
    launched.wait_output(READY, 30)
    launched.wait_output(r"starting beat \(pid \d+\)", 10)
    launched.wait_output(r"TICK", 20)
    second = dev_project.run("beat", "-A", dev_project.app, timeout=30)
    assert second.returncode == 6
    assert f"tlrun launcher pid {launched.pid}" in second.stderr
    schedule = dev_project.runtime / "tlrun" / f"{project_id(dev_project.root, dev_project.app)}.celerybeat-schedule"
    assert any(p.name.startswith(schedule.name) for p in schedule.parent.iterdir())
    assert not any("celerybeat" in p.name for p in dev_project.root.iterdir())


def test_ide_stop_sigint_then_sigkill_leaves_nothing(tmp_path: Path) -> None:
    proj = Project(tmp_path / "projects", f"redis://:dev-pw@127.0.0.1:{free_port()}/0")
    write_app(proj, 1)
    try:
        launched = dev(proj, "--beat", "--concurrency", "2")
        redis_pid = int(launched.wait_output(r"private redis-server \(pid (\d+)", 30).group(1))
        worker_pid = int(launched.wait_output(READY, 30).group(2))
        beat_pid = int(launched.wait_output(r"starting beat \(pid (\d+)\)", 10).group(1))
        launched.send(signal.SIGINT)  # first click on Stop
        launched.send(signal.SIGKILL)  # second click
        launched.wait(5)
        wait_for(lambda: gone([worker_pid, beat_pid, redis_pid]), 10, "worker, beat and redis-server gone")
    finally:
        proj.cleanup()


def test_ide_configurations(project: Project) -> None:
    result = project.run("ide", "pycharm", "-A", project.app)
    assert result.returncode == 0, result.stderr
    run_dir = project.root / ".run"
    configs = {}
    for path in sorted(run_dir.glob("*.run.xml")):
        conf = ET.parse(path).getroot().find("configuration")
        assert conf is not None and conf.get("type") == "PythonConfigurationType"
        options = {o.get("name"): o.get("value") for o in conf.findall("option")}
        configs[conf.get("name")] = options
    assert set(configs) == {"tlrun dev", "tlrun dev (reload)", "tlrun dev (debug)"}
    for name, options in configs.items():
        assert options["MODULE_MODE"] == "true" and options["SCRIPT_NAME"] == "tlrun"
        assert options["WORKING_DIRECTORY"] == "$PROJECT_DIR$"
        assert options["ENV_FILES"] == "$PROJECT_DIR$/.env"
        flag = " --debug" if "debug" in name else " --reload" if "reload" in name else ""
        assert options["PARAMETERS"] == f"dev -A {project.app}" + flag
    # An edited file is kept without --force.
    edited = run_dir / "tlrun_dev.run.xml"
    edited.write_text(edited.read_text().replace("PYTHONUNBUFFERED", "PYTHONUNBUFFERED_EDITED"))
    again = project.run("ide", "pycharm", "-A", project.app)
    assert "tlrun_dev.run.xml: kept (edited; --force to overwrite)" in again.stdout
    assert "EDITED" in edited.read_text()
    project.run("ide", "pycharm", "-A", project.app, "--force")
    assert "EDITED" not in edited.read_text()

    launch = project.root / ".vscode" / "launch.json"
    launch.parent.mkdir()
    mine = {"name": "my own", "type": "debugpy", "request": "launch", "program": "x.py"}
    launch.write_text(json.dumps({"version": "0.2.0", "configurations": [mine]}))
    result = project.run("ide", "vscode", "-A", project.app)
    assert result.returncode == 0 and "merged" in result.stdout
    entries = {c["name"]: c for c in json.loads(launch.read_text())["configurations"]}
    assert entries["my own"] == mine
    assert entries["tlrun dev"]["module"] == "tlrun" and entries["tlrun dev"]["args"] == ["dev", "-A", project.app]
    assert entries["tlrun dev (debug)"]["args"][-1] == "--debug"
    assert entries["tlrun dev"]["cwd"] == "${workspaceFolder}"
    # VS Code's own format has comments and trailing commas: refused without --force, merged with it.
    jsonc = """// my launch configurations
{
  "version": "0.2.0",
  "configurations": [
    /* mine */ {"name": "my own", "type": "debugpy", "request": "launch", "program": "x.py",},
    {"name": "another", "type": "debugpy", "request": "launch", "module": "y"},
  ],
}
"""
    launch.write_text(jsonc)
    refused = project.run("ide", "vscode", "-A", project.app)
    assert refused.returncode == 3 and "has comments" in refused.stderr
    assert launch.read_text() == jsonc
    forced = project.run("ide", "vscode", "-A", project.app, "--force")
    assert forced.returncode == 0 and "merged (its comments were dropped)" in forced.stdout, forced.stdout
    names = [c["name"] for c in json.loads(launch.read_text())["configurations"]]
    assert names == ["my own", "another", "tlrun dev", "tlrun dev (reload)", "tlrun dev (debug)"]
    launch.write_text("{ this is not json")
    replaced = project.run("ide", "vscode", "-A", project.app, "--force")
    assert "replaced (it was not JSON)" in replaced.stdout and "merged" not in replaced.stdout
    # With the app in the project file, no configuration names it: it follows the file.
    (project.root / "pyproject.toml").write_text(f'[tool.tlrun]\napp = "{project.app}"\n')
    project.run("ide", "vscode", "-A", project.app, "--force")
    entries = {c["name"]: c for c in json.loads(launch.read_text())["configurations"]}
    assert entries["tlrun dev"]["args"] == ["dev"] and entries["tlrun dev (reload)"]["args"] == ["dev", "--reload"]


def test_quick_start_reaches_a_task_result(tmp_path: Path, redis_server: RedisServer) -> None:
    """The README's quick start on a copy of the example (on this test's own Redis): tlrun dev with no
    arguments, `python -m examples.send` prints add(2, 3) = 5, and logs and stop need no -A either."""
    proj = Project(tmp_path / "projects", redis_server.url(), write_app=False)
    shutil.copytree(ROOT / "examples", proj.root / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    example_env = (ROOT / ".env.example").read_text().replace("redis://127.0.0.1:6379/15", redis_server.url())
    (proj.root / ".env").write_text(example_env)
    env = proj.env()
    env.pop("CELERY_BROKER_URL")  # from .env, as on a laptop
    try:
        launched = proj.launch(command="dev", env=env, app_arg=False)
        launched.wait_output(READY, 60)
        sent = subprocess.run(
            [sys.executable, "-m", "examples.send"], cwd=proj.root, env=env, capture_output=True, text=True, timeout=60
        )
        assert sent.returncode == 0 and re.match(r"add\(2, 3\) = 5 \(task \S+\)", sent.stdout), (
            sent.stdout + sent.stderr
        )
        logs = proj.run("logs", env=env)
        assert logs.returncode == 0 and "ready." in logs.stdout
        stop = proj.run("stop", env=env)
        assert stop.returncode == 0 and launched.wait(30) == 0
    finally:
        proj.cleanup()


def test_ps_counts_a_swapped_workers_uptime_from_its_swap(dev_project: Project) -> None:
    """tlrun dev --reload keeps a spare per role, made long before a save promotes it: `ps` shows the new
    worker's uptime from when it began to serve, not from when its process (the spare) was made."""
    import json

    import psutil

    launched = dev(dev_project, "--reload", "--concurrency", "1")
    launched.wait_output(READY, 30)

    def spare() -> psutil.Process | None:
        for proc in psutil.Process(launched.pid).children():
            try:
                if proc.environ().get("TLRUN_SPARE") == "1":
                    return proc
            except psutil.Error:
                continue
        return None

    made = wait_for(spare, 30, "the spare").create_time()
    wait_for(lambda: time.time() - made > 4, 10, "the spare to be 4 s old")  # an event: its age, not a sleep
    write_app(dev_project, 2)
    pid = int(launched.wait_output(r"reloaded: .*?new worker \S+ \(pid (\d+)\)", 30).group(1))
    rows = json.loads(dev_project.run("ps", "--json").stdout)
    row = next(r for r in rows if r["pid"] == pid)
    assert row["uptime_s"] < time.time() - made - 2, (row, time.time() - made)
    launched.send(signal.SIGINT)
    assert launched.wait(30) in (0, 130)
