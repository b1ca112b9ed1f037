"""tlrun dev's reload and stop: prepare the next worker, drain the idle one, never two, never a killed task."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import redis

from helpers import Project, ping_replies, send_task, wait_for
from test_dev import READY, call, dev, write_app

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def dev_project(project: Project) -> Project:
    write_app(project, 1)
    return project


def _runs(project: Project) -> list[str]:
    client = redis.Redis.from_url(project.broker_url)
    try:
        return [x.decode() for x in client.lrange("runs", 0, -1)]
    finally:
        client.close()


def test_twenty_reloads_never_two_workers_and_every_task_exactly_once(dev_project: Project) -> None:
    launched = dev(dev_project, "--reload", "--concurrency", "2")
    launched.wait_output(READY, 30)
    most, stop = 0, threading.Event()

    def poll() -> None:  # raw ping replies: two consuming workers would both answer
        nonlocal most
        while not stop.is_set():
            most = max(most, len(ping_replies(dev_project.broker_url, timeout=0.2)))

    sent = 0

    def send() -> None:  # 200 tasks spread over the reloads, many of them published during a drain
        nonlocal sent
        for i in range(200):
            if stop.is_set():
                return
            send_task(dev_project.broker_url, f"{dev_project.app}.record", i)
            sent += 1
            stop.wait(0.08)

    threads = [threading.Thread(target=poll, daemon=True), threading.Thread(target=send, daemon=True)]
    for thread in threads:
        thread.start()
    try:
        for n in range(20):
            write_app(dev_project, n + 2)
            wait_for(lambda n=n: launched.output().count("reloaded:") > n, 30, f"reload {n + 1}")
        wait_for(lambda: sent == 200, 60, "all 200 tasks sent")
        wait_for(lambda: len(_runs(dev_project)) >= 200, 60, "all 200 tasks run")
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert most == 1, f"{most} workers answered at once"
    ids = sorted(int(run.split(":")[0]) for run in _runs(dev_project))
    assert ids == list(range(200)), "every task exactly once"
    assert call(dev_project, "value") == 21  # the last save's code
    assert "was idle: drained and stopped" in launched.output()  # some swaps took the fast path
    launched.send(signal.SIGINT)
    assert launched.wait(30) == 0


@pytest.mark.matrix
def test_a_task_running_at_the_save_finishes_and_the_new_code_follows(dev_project: Project) -> None:
    launched = dev(dev_project, "--reload")
    launched.wait_output(READY, 30)
    busy = send_task(dev_project.broker_url, f"{dev_project.app}.sleep", 3)
    wait_for(lambda: "sleep[" in launched.output(), 20, "the task to start")
    write_app(dev_project, 2)
    launched.wait_output(r"reload: \S+ gets the warm stop ladder \(1 task\(s\) active\)", 30)
    assert busy.get(timeout=30) == 3  # not killed
    launched.wait_output(r"reloaded: ", 30)
    assert call(dev_project, "value") == 2
    launched.send(signal.SIGINT)
    assert launched.wait(30) == 0


@pytest.mark.matrix
def test_ctrl_c_drains_an_idle_worker_and_waits_for_a_busy_one(dev_project: Project) -> None:
    idle = dev(dev_project)
    idle.wait_output(READY, 30)
    idle.send(signal.SIGINT)
    assert idle.wait(30) == 0
    assert "stop: " in idle.output() and "was idle: drained and stopped in" in idle.output()

    busy_launcher = dev(dev_project)
    busy_launcher.wait_output(READY, 30)
    busy = send_task(dev_project.broker_url, f"{dev_project.app}.sleep", 3)
    wait_for(lambda: "sleep[" in busy_launcher.output(), 20, "the task to start")
    busy_launcher.send(signal.SIGINT)
    assert busy.get(timeout=30) == 3
    assert busy_launcher.wait(30) == 0
    assert "gets the warm stop ladder (1 task(s) active)" in busy_launcher.output()


def test_a_worker_that_does_not_answer_gets_the_warm_ladder(dev_project: Project) -> None:
    launched = dev(dev_project, "--grace", "2")
    worker = int(launched.wait_output(READY, 30).group(2))
    os.kill(worker, signal.SIGSTOP)  # alive, but it answers no control command
    launched.send(signal.SIGINT)
    assert launched.wait(40) == 128 + signal.SIGKILL  # the grace period ended it: its status is the exit code
    assert "gets the warm stop ladder (it did not answer active_queues)" in launched.output()
    assert "grace period over: SIGKILL" in launched.output()


def test_tlrun_worker_still_stops_warm_by_default(project: Project) -> None:
    launched = project.launch("--concurrency", "1")
    launched.wait_output(READY, 30)
    launched.send(signal.SIGINT)
    assert launched.wait(30) == 0
    assert "warm shutdown: SIGTERM to worker" in launched.output() and "drained" not in launched.output()
