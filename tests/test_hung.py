"""HUNG_TASK: a task past the hard time limit it runs under (or past hung_after without one), on real workers.

The threads pool enforces no time limit at all (celery#9203): a task sleeping in C runs on forever. tlrun
reports it in its output, doctor, health and metrics, and with --restart recovers it: the worker restarted
on the threads pool, only the pool child killed on prefork."""

from __future__ import annotations

import json
import os
import re
import signal

import psutil
import pytest
import redis

from helpers import Project, client, wait_for

pytestmark = pytest.mark.timeout(180)
FAST_CHECK = {"TLRUN_CONSUME_CHECK_EVERY": "0.5"}


def active_on(project: Project, node: str) -> list[dict[str, object]]:
    replies = client(project.broker_url).control.inspect(destination=[node], timeout=1.0).active() or {}
    return list(replies.get(node) or [])


def node_of(project: Project) -> str:
    rows = json.loads(project.run("ps", "--json").stdout)
    return next(str(r["node"]) for r in rows if r.get("kind") == "worker")


def test_threads_pool_task_past_its_time_limit_is_reported_everywhere(project: Project) -> None:
    env = project.env(**FAST_CHECK)
    launched = project.launch("--pool", "threads", "--concurrency", "2", "--time-limit", "2", "--grace", "3", env=env)
    launched.wait_output(r"1 worker ready", 60)
    node = node_of(project)
    app = client(project.broker_url)
    app.send_task(f"{project.app}.sleep", args=(1.0,))  # within its limit: never hung
    doctor = project.run("doctor", "-A", project.app, "--json", env=env)
    assert not [f for f in json.loads(doctor.stdout)["findings"] if f["code"] == "HUNG_TASK"]
    result = app.send_task(f"{project.app}.sleep", args=(60.0,))  # time.sleep: C, which no thread limit stops
    found = launched.wait_output(r"HUNG_TASK: task \S+\.sleep \[([0-9a-f-]+)\] on (\S+) \(pid (\d+)\) has run", 30)
    assert found.group(1) == result.id and found.group(2) == node
    assert "1.0" not in launched.output().split("HUNG_TASK")[1].split("\n")[0]
    doctor = project.run("doctor", "-A", project.app, "--json", env=env)
    assert doctor.returncode == 20, doctor.stdout + doctor.stderr
    hung = [f for f in json.loads(doctor.stdout)["findings"] if f["code"] == "HUNG_TASK"]
    assert len(hung) == 1 and hung[0]["task"]["id"] == result.id and hung[0]["task"]["limit"] == 2.0
    assert hung[0]["task"]["node"] == node and hung[0]["task"]["runtime"] > 2.0
    assert "past its hard time limit of 2 s" in hung[0]["message"]
    health = project.run("health", "-A", project.app, env=env)
    assert health.returncode == 20 and "hung (HUNG_TASK" in health.stdout, health.stdout
    prom = project.run("doctor", "-A", project.app, "--format", "prometheus", env=env)
    assert re.search(r'tlrun_hung_tasks\{hostname="[^"]+",worker="[^"]*"\} 1\.0', prom.stdout), prom.stdout
    launched.send(signal.SIGTERM)
    launched.wait(60)  # it stops within its grace (the hung task is killed at its end)


def test_threads_pool_hung_task_restarts_the_worker_with_restart(project: Project) -> None:
    env = project.env(**FAST_CHECK)
    args = ("--pool", "threads", "--concurrency", "2", "--time-limit", "2", "--grace", "2", "--restart")
    launched = project.launch(*args, env=env)
    launched.wait_output(r"1 worker ready", 60)
    before = json.loads(project.run("ps", "--json").stdout)
    first = next(r["pid"] for r in before if r.get("kind") == "worker")
    client(project.broker_url).send_task(f"{project.app}.sleep", args=(60.0,))
    launched.wait_output(r"hung task \S+ \[[0-9a-f-]+\] on \S+: restarting the worker with the stop ladder", 30)
    launched.wait_output(r"restart 1 in", 30)

    def restarted() -> bool:
        rows = json.loads(project.run("ps", "--json").stdout)
        return any(r.get("kind") == "worker" and r["pid"] != first for r in rows)

    wait_for(restarted, 60, "a new worker after the hung task")
    assert not psutil.pid_exists(first) or psutil.Process(first).status() == psutil.STATUS_ZOMBIE
    launched.send(signal.SIGTERM)
    launched.wait(60)  # it stops within its grace (the hung task is killed at its end)


def test_prefork_stopped_child_mid_task_is_the_only_process_killed(project: Project) -> None:
    env = project.env(TLRUN_HUNG_AFTER="2", **FAST_CHECK)  # no time limit: hung_after decides
    launched = project.launch("--concurrency", "2", "--grace", "3", "--restart", env=env)
    launched.wait_output(r"1 worker ready", 60)
    node = node_of(project)
    main = psutil.Process(next(r["pid"] for r in json.loads(project.run("ps", "--json").stdout) if r["node"] == node))
    children = {c.pid for c in main.children()}
    assert len(children) == 2
    client(project.broker_url).send_task(f"{project.app}.sleep", args=(60.0,))
    running = wait_for(lambda: active_on(project, node), 20, "the task to start")
    victim = int(str(running[0]["worker_pid"]))
    assert victim in children
    os.kill(victim, signal.SIGSTOP)  # a wedged child: Celery itself enforces no limit here (none set)
    launched.wait_output(rf"SIGKILL to pool child {victim} of {re.escape(node)}", 30)
    wait_for(
        lambda: not psutil.pid_exists(victim) or psutil.Process(victim).status() == psutil.STATUS_ZOMBIE,
        10,
        "the child to die",
    )
    assert main.is_running() and main.status() != psutil.STATUS_ZOMBIE
    survivors = children - {victim}
    assert all(psutil.pid_exists(pid) for pid in survivors)  # the other child lives
    wait_for(lambda: len(main.children()) == 2, 20, "Celery to replace the killed child")
    assert "restarting the worker" not in launched.output()
    launched.send(signal.SIGTERM)
    launched.wait(60)  # it stops within its grace (the hung task is killed at its end)


def test_prefork_hung_task_with_a_subprocess_is_killed_with_it_then_revoked(project: Project) -> None:
    """A prefork task that waits on a subprocess of its own, hung (no time limit: hung_after decides): its pool
    child and the subprocess are killed, never the idle child; late acks bring it back, and the second time it
    is revoked before the kill, so it never runs a third time. No subprocess is left behind."""
    env = project.env(TLRUN_HUNG_AFTER="2", **FAST_CHECK)
    launched = project.launch("--concurrency", "2", "--grace", "3", "--restart", env=env)
    launched.wait_output(r"1 worker ready", 60)
    node = node_of(project)
    main = psutil.Process(next(r["pid"] for r in json.loads(project.run("ps", "--json").stdout) if r["node"] == node))
    result = client(project.broker_url).send_task(f"{project.app}.hang_with_child", args=(300,))
    killed = [launched.wait_output(rf"\[{result.id}\]: SIGKILL to pool child (\d+) of {re.escape(node)}", 30)]
    launched.wait_output(rf"\[{result.id}\] hung twice: revoked", 30)
    wait_for(
        lambda: len(re.findall(rf"\[{result.id}\]: SIGKILL to pool child", launched.output())) == 2, 20, "a 2nd kill"
    )
    launched.wait_output(rf"Discarding revoked task: \S+\[{result.id}\]", 30)  # the worker drops it
    raw = redis.Redis.from_url(project.broker_url)
    try:
        subprocesses = [int(p) for p in raw.lrange("hang_children", 0, -1)]
    finally:
        raw.close()
    assert len(subprocesses) == 2, subprocesses  # it ran twice, never a third time
    for pid in subprocesses:  # each kill took the task's own subprocess with it
        wait_for(
            lambda pid=pid: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
            10,
            f"sleep {pid} gone",
        )
    assert "gave up" not in launched.output() and "restarting the worker" not in launched.output()
    assert main.is_running() and main.status() != psutil.STATUS_ZOMBIE
    wait_for(lambda: len(main.children()) == 2, 20, "Celery to replace the killed children")
    assert int(killed[0].group(1)) not in {c.pid for c in main.children()}
    launched.send(signal.SIGTERM)
    assert launched.wait(60) == 0


def test_solo_hung_task_is_found_from_the_heartbeat_file(project: Project) -> None:
    """-P solo: a task sleeping past its 3 s limit blocks the only thread, so the worker answers no remote
    control. Found from its heartbeat file: reported, and health says hung (exit 20), not unknown."""
    env = project.env(**FAST_CHECK)
    launched = project.launch("--pool", "solo", "--time-limit", "3", "--grace", "2", env=env)
    launched.wait_output(r"1 worker ready", 60)
    node = node_of(project)
    result = client(project.broker_url).send_task(f"{project.app}.sleep", args=(300.0,))
    found = launched.wait_output(r"HUNG_TASK: task \S+\.sleep \[([0-9a-f-]+)\] on (\S+) \(pid (\d+)\) has run", 30)
    assert found.group(1) == result.id and found.group(2) == node
    health = project.run("health", "-A", project.app, "--timeout", "1", env=env)
    assert health.returncode == 20 and "hung (HUNG_TASK" in health.stdout, health.stdout + health.stderr
    doctor = project.run("doctor", "-A", project.app, "--json", env=env)
    assert doctor.returncode == 20, doctor.stdout + doctor.stderr
    launched.send(signal.SIGTERM)
    launched.wait(60)  # its grace, then the hung task is killed


def test_solo_hung_task_restarts_the_worker_and_the_queued_tasks_run(project: Project) -> None:
    env = project.env(**FAST_CHECK)
    launched = project.launch("--pool", "solo", "--time-limit", "3", "--grace", "2", "--restart", env=env)
    launched.wait_output(r"1 worker ready", 60)
    app = client(project.broker_url)
    hung = app.send_task(f"{project.app}.sleep", args=(300.0,))
    queued = [app.send_task(f"{project.app}.add", args=(i, i)) for i in range(5)]
    launched.wait_output(rf"hung task \S+ \[{hung.id}\] on \S+: restarting the worker with the stop ladder", 30)
    assert [r.get(timeout=90) for r in queued] == [2 * i for i in range(5)]
    launched.send(signal.SIGTERM)
    launched.wait(60)
