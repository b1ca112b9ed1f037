"""doctor, ps, stop, logs, health: real workers on a private Redis (and RabbitMQ where reachable)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from helpers import PY, Launched, Project, free_port, gone, wait_for

pytestmark = pytest.mark.timeout(120)
HOST = socket.gethostname()
SCHEMA = json.loads(
    (Path(__file__).resolve().parent.parent / "src" / "tlrun" / "ops" / "doctor.schema.json").read_text()
)
READY = r"tlrun: \d+ workers? ready: (\S+) \(pid (\d+)\)"


def doctor(project: Project, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    result = project.run("doctor", "-A", project.app, "--json", *args, env=env, timeout=60)
    data = json.loads(result.stdout)
    jsonschema.validate(data, SCHEMA)
    assert data["exit_code"] == result.returncode
    return result.returncode, data


def codes(data: dict[str, Any]) -> set[str]:
    return {f["code"] for f in data["findings"]}


def test_doctor_healthy_is_one_line(project: Project) -> None:
    env = project.env(C_FORCE_ROOT="1")
    app_file = project.root / f"{project.app}.py"
    app_file.write_text(
        app_file.read_text()
        + ("\napp.conf.update(task_time_limit=600, broker_transport_options={'visibility_timeout': 7200})\n")
    )
    launched = project.launch(env=env)
    launched.wait_output(READY, 30)
    result = project.run("doctor", "-A", project.app, env=env, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tlrun doctor: healthy: 1 worker(s) answer")
    code, data = doctor(project, env=env)
    assert code == 0 and data["status"] == "healthy"
    assert [p["launcher_pid"] for p in data["local"]] == [launched.pid]


def test_doctor_finds_duplicates_that_inspect_hides(project: Project) -> None:
    other = project.other_project("elsewhere")
    twins = [other.hand_worker(f"twin@{HOST}", cwd=other.root) for _ in range(2)]
    try:
        for twin in twins:
            twin.wait_output("ready", 30)
        code, data = doctor(project)
        assert code == 9 and data["status"] == "problems"
        twin = next(n for n in data["nodes"] if n["name"] == f"twin@{HOST}")
        assert twin["replies"] == 2 and twin["this_host"]
        assert sorted(twin["local_pids"]) == sorted(t.pid for t in twins)
        assert "DUPLICATE_NODE" in codes(data)
        # What Celery's own inspect ping concludes: one node.
        inspect = subprocess.run(
            [PY, "-m", "celery", "-A", other.app, "inspect", "ping", "--timeout", "1"],
            cwd=other.root,
            env=other.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "1 node online." in inspect.stdout  # Celery's own count folds the two replies into one node
        human = project.run("doctor", "-A", project.app, timeout=60)
        assert "ERROR   DUPLICATE_NODE: 2 workers answer as twin@" in human.stdout
    finally:
        other.cleanup()


def test_doctor_reports_stray_and_fix_stops_it_but_not_a_decoy(project: Project) -> None:
    stray = project.hand_worker(f"stray@{HOST}")
    other = project.other_project("elsewhere")
    decoy = other.hand_worker(f"decoy@{HOST}", cwd=other.root)
    try:
        stray.wait_output("ready", 30)
        decoy.wait_output("ready", 30)
        code, data = doctor(project)
        assert code == 9 and "STRAY_PROCESS" in codes(data)
        assert [p["pid"] for p in data["local"] if p["stray"]] == [stray.pid]
        fixed = project.run("doctor", "-A", project.app, "--fix", timeout=90)
        assert f"stopped stray worker pid {stray.pid}" in fixed.stdout
        assert stray.wait(20) == 0
        assert decoy.proc.poll() is None
        code, data = doctor(project)
        assert "STRAY_PROCESS" not in codes(data)
    finally:
        other.cleanup()


def test_doctor_reports_remote_worker(project: Project) -> None:
    other = project.other_project("elsewhere")
    remote = other.hand_worker("w1@build-box-7", cwd=other.root)
    try:
        remote.wait_output("ready", 30)
        _, data = doctor(project)
        node = next(n for n in data["nodes"] if n["name"] == "w1@build-box-7")
        assert node["this_host"] is False and node["host"] == "build-box-7"
        # With a problem (here: more workers than expected), each node is listed, with where it runs.
        extra = project.hand_worker("w2@build-box-8", cwd=other.root)
        extra.wait_output("ready", 30)
        human = project.run("doctor", "-A", project.app, timeout=60)
        assert f"node w1@build-box-7 (remote host build-box-7, pid {remote.pid})" in human.stdout, human.stdout
    finally:
        other.cleanup()


def test_doctor_broker_down(project: Project) -> None:
    code, data = doctor(project, "-b", f"redis://:pw123456@127.0.0.1:{free_port()}/0")
    assert code == 5 and data["status"] == "failure" and not data["broker_reachable"]
    assert "BROKER_UNREACHABLE" in codes(data)
    assert "pw123456" not in json.dumps(data) and ":***@" in data["broker_url"]


def test_doctor_config_risks(project: Project) -> None:
    app_file = project.root / f"{project.app}.py"
    app_file.write_text(
        app_file.read_text()
        + (
            "\napp.conf.update(task_acks_late=False, worker_prefetch_multiplier=8, accept_content=['json', 'pickle'],"
            " task_time_limit=7200, broker_transport_options={'visibility_timeout': 60})\n"
        )
    )
    code, data = doctor(project)
    assert {"ACKS_EARLY", "PREFETCH", "PICKLE", "VISIBILITY_SHORT", "NO_WORKERS"} <= codes(data)
    assert code == 13 and data["status"] == "warnings"
    assert all(f["fix"] for f in data["findings"] if f["code"] in ("ACKS_EARLY", "PREFETCH"))


def test_ps_and_stop_leave_nothing(project: Project) -> None:
    launched = project.launch("--concurrency", "2")
    _, worker_pid = launched.wait_output(READY, 30).groups()
    stray = project.hand_worker(f"stray@{HOST}")
    stray.wait_output("ready", 30)
    table = project.run("ps", "-A", project.app)
    assert re.search(
        rf"^{worker_pid}\s+worker\s+default\s+api{launched.pid}@\S+\s+\w+\s+\S+ s\s+\d+M\s+\S+s\s+2\s+{launched.pid}$",
        table.stdout,
        re.M,
    ), table.stdout
    assert re.search(rf"^{stray.pid}\s+worker\s+\S+\s+stray@.*STRAY$", table.stdout, re.M)
    rows = json.loads(project.run("ps", "-A", project.app, "--json").stdout)
    assert {r["pid"] for r in rows} == {int(worker_pid), stray.pid}
    result = project.run("stop", "-A", project.app, "--timeout", "20", timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"stopped launcher pid {launched.pid}" in result.stdout
    assert f"stopped stray worker pid {stray.pid}" in result.stdout
    assert launched.wait(10) == 0 and stray.wait(10) == 0
    assert gone([int(worker_pid)])
    assert "nothing of this project was running" in project.run("stop", "-A", project.app).stdout


def test_health(project: Project) -> None:
    launched = project.launch("--pool", "solo")
    node, worker_pid = launched.wait_output(READY, 30).groups()
    ok = project.run("health", "-A", project.app)
    assert ok.returncode == 0 and f"{node}: alive" in ok.stdout
    missing = project.run("health", "-A", project.app, "--node", "nobody@nowhere", "--timeout", "0.3", "--retries", "1")
    assert missing.returncode == 15 and "dead" in missing.stdout
    os.kill(int(worker_pid), signal.SIGSTOP)
    try:
        stopped = project.run("health", "-A", project.app, "--timeout", "0.3", "--retries", "0")
        assert stopped.returncode == 14 and "unknown" in stopped.stdout and "stopped (SIGSTOP)" in stopped.stdout
        _, data = doctor(project)
        assert "STOPPED_PROCESS" in codes(data)
    finally:
        os.kill(int(worker_pid), signal.SIGCONT)


def test_logs_list_show_and_follow(project: Project) -> None:
    logs = project.root / "logs"
    logs.mkdir()
    old = logs / "celery_worker_1.log"
    old.write_text("old line\n")
    new = logs / "celery_worker_2.log"
    new.write_text("".join(f"line {i}\n" for i in range(100)))
    (logs / "celery_worker_2.log.1").write_text("rotated\n")
    os.utime(old, (1, 1))
    listing = project.run("logs", "-A", project.app, "--list")
    assert listing.stdout.index("celery_worker_2.log") < listing.stdout.index("celery_worker_1.log")
    assert "celery_worker_2.log.1" in listing.stdout
    shown = project.run("logs", "-A", project.app, "-n", "3")
    assert shown.stdout.splitlines() == ["line 97", "line 98", "line 99"]
    assert project.run("logs", "-A", project.app, "celery_worker_1.log").stdout == "old line\n"
    follower = Launched(
        [PY, "-m", "tlrun", "logs", "-A", project.app, "-f", "-n", "0"],
        project.root,
        project.env(),
        project.base / "follow.txt",
    )
    project.started.append(follower)
    wait_for(lambda: follower.proc.poll() is None and follower.out.exists(), 10, "follower running")

    def appended() -> bool:
        with new.open("a") as fh:
            fh.write("fresh line\n")
        return "fresh line" in follower.output()

    wait_for(appended, 15, "the appended line to be followed", interval=0.3)
    # Rotation: the file is renamed and a new one starts; the follower reopens it.
    new.rename(logs / "celery_worker_2.log.2")
    new.write_text("after rotation\n")
    wait_for(lambda: "after rotation" in follower.output(), 15, "a line written after rotation")
    assert project.run("logs", "-A", project.app, "nope.log").returncode == 12


# -- RabbitMQ --------------------------------------------------------------------------------------------


def test_doctor_stop_health_and_worker_over_amqp(tmp_path: Path, amqp_vhost: str) -> None:
    proj = Project(tmp_path / "projects", amqp_vhost)
    try:
        stray = proj.hand_worker(f"twin@{HOST}")
        stray.wait_output("ready", 40)
        # On RabbitMQ the pidbox queue is exclusive: a second worker with the same name is refused by the
        # broker (RESOURCE_LOCKED) and exits, so duplicates cannot form there as they do on Redis.
        twin = proj.hand_worker(f"twin@{HOST}", cwd=proj.other_project("elsewhere").root)
        assert twin.wait(60) != 0
        assert "RESOURCE_LOCKED" in twin.output()
        code, data = doctor(proj)
        assert code == 9 and "STRAY_PROCESS" in codes(data)
        assert next(n for n in data["nodes"] if n["name"] == f"twin@{HOST}")["replies"] == 1
        # user and password are both "guest": masking by value hides the user too, which gives it away
        assert data["broker_url"].startswith("amqp://***:***@127.0.0.1:5672/") and "guest" not in data["broker_url"]
        fixed = proj.run("doctor", "-A", proj.app, "--fix", timeout=90)
        assert f"stopped stray worker pid {stray.pid}" in fixed.stdout
        launched = proj.launch()
        launched.wait_output(READY, 40)
        assert proj.run("health", "-A", proj.app).returncode == 0
        assert proj.run("stop", "-A", proj.app, "--timeout", "20", timeout=90).returncode == 0
        assert launched.wait(30) == 0
    finally:
        proj.cleanup()


def _heartbeat(project: Project) -> dict[str, Any]:
    """The worker's heartbeat file, as its lock record names it."""
    from tlrun.launch import guard

    record = guard.read_record(project.lock_file()) or {}
    path = Path(str(record.get("heartbeat") or "/nonexistent"))
    return json.loads(path.read_text()) if path.exists() else {}


RECEIVERS_TASK = """


@app.task
def task_signal_receivers():
    from celery import signals
    return [str(key) for key, _receiver in signals.task_prerun.receivers + signals.task_postrun.receivers]
"""


@pytest.mark.parametrize(("pool", "connected"), [("prefork", False), ("solo", True)])
def test_the_heartbeat_costs_prefork_tasks_nothing(project: Project, pool: str, connected: bool) -> None:
    """The heartbeat notes a task that blocks the main process's loop (solo, threads): only there does
    tlrun connect Celery's per-task signals, which, once connected, Celery sends for every task."""
    from helpers import send_task

    module = project.root / f"{project.app}.py"
    module.write_text(module.read_text() + RECEIVERS_TASK)
    launched = project.launch("--pool", pool)
    launched.wait_output(READY, 30)
    keys = send_task(project.broker_url, f"{project.app}.task_signal_receivers").get(timeout=30)
    assert any("tlrun-heartbeat" in k for k in keys) is connected, keys
    assert wait_for(lambda: _heartbeat(project).get("pid"), 30, "the worker's heartbeat")


def test_liveness_from_local_evidence_never_from_the_broker(project: Project, redis_server: Any) -> None:
    """A broker outage makes the worker not ready, never not alive (a liveness probe that restarts every pod
    during an outage makes it worse); a stopped worker is not alive; a busy solo task within its time limit
    is, though it blocks the event loop that writes the heartbeat."""
    import time

    launched = project.launch("--pool", "solo", "--time-limit", "60")
    node, worker_pid = launched.wait_output(READY, 30).groups()
    wait_for(lambda: _heartbeat(project).get("pid") == int(worker_pid), 30, "the worker's first heartbeat")
    alive = project.run("health", "-A", project.app, "--liveness")
    assert alive.returncode == 0 and f"{node}: alive (heartbeat" in alive.stdout, alive.stdout + alive.stderr
    redis_server.stop()
    try:
        live = project.run("health", "-A", project.app, "--liveness")
        assert live.returncode == 0, live.stdout + live.stderr
        ready = project.run("health", "-A", project.app, "--readiness", "--timeout", "0.5", "--retries", "0")
        assert ready.returncode == 5, ready.stdout + ready.stderr  # not ready: the broker is down
    finally:
        redis_server.restart()
    os.kill(int(worker_pid), signal.SIGSTOP)
    try:
        stopped = project.run("health", "-A", project.app, "--liveness")
        assert stopped.returncode == 14 and "is stopped" in stopped.stdout, stopped.stdout
    finally:
        os.kill(int(worker_pid), signal.SIGCONT)
    from helpers import send_task

    result = send_task(project.broker_url, f"{project.app}.sleep", 8)  # runs past the checks below, no longer
    wait_for(lambda: _heartbeat(project).get("busy_since"), 30, "the solo task to start")
    busy_at = _heartbeat(project)["t"]
    # Past a 2 s window with no heartbeat (the task blocks the loop): alive, as its task is within its limit.
    wait_for(lambda: time.time() - busy_at > 3, 10, "the heartbeat to age past the window")
    busy = project.run("health", "-A", project.app, "--liveness", "--window", "2")
    assert busy.returncode == 0 and "running a task for" in busy.stdout and "time limit 60 s" in busy.stdout
    assert result.get(timeout=40) == 8
