"""tlrun's memory guard on a real prefork worker: a task that allocates past a 200 MB limit loses its pool child
(never the main process), goes back to the queue once, is revoked at its second kill, and the other tasks
keep completing."""

from __future__ import annotations

import json
import re
import signal
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from helpers import Project, client, free_port, wait_for
from tlrun.errors import ConfigError
from tlrun.ops.memory import cgroup_limit, limit_from_cgroup
from tlrun.roles import parse_size

pytestmark = pytest.mark.timeout(180)

APP = """
import os
import time

import redis
from celery import Celery

app = Celery("{app}")
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
)
_rec = redis.Redis.from_url(os.environ["TEST_RECORD_URL"])


@app.task(name="mem.grow")
def grow():
    _rec.rpush("grow-start", os.getpid())
    chunks = []
    for _ in range(40):  # 800 MB in 2 s, each page written: it counts in RSS and PSS at once
        chunks.append(b"\\x01" * (20 << 20))
        time.sleep(0.05)
    _rec.rpush("grow-done", os.getpid())


@app.task(name="mem.hog_in_subprocess")
def hog_in_subprocess():
    # The memory is in a process the task starts and waits on (ffmpeg, LibreOffice), not in the pool child.
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "import time; x = b'x' * (400 << 20); time.sleep(300)"])
    _rec.rpush("hog-children", proc.pid)
    proc.wait()
    _rec.rpush("hog-done", proc.pid)


@app.task(name="mem.note")
def note(i):
    time.sleep(0.05)
    _rec.rpush("notes", i)
"""


def lrange(url: str, key: str) -> list[str]:
    import redis

    r = redis.Redis.from_url(url)
    try:
        return [x.decode() for x in r.lrange(key, 0, -1)]
    finally:
        r.close()


def test_sizes_parse_and_bad_ones_are_refused() -> None:
    assert parse_size("200MB", "k") == 200_000_000
    assert parse_size("1.5GiB", "k") == 1_610_612_736
    assert parse_size("512m", "k") == 512 * 1024 * 1024
    assert parse_size(300_000_000, "k") == 300_000_000
    for bad in ("lots", "10MB", "-5GB", True, "1.5.5G"):
        with pytest.raises(ConfigError):
            parse_size(bad, "memory_limit")


def test_cgroup_limits_v1_and_v2_minus_headroom(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    (v2 / "app").mkdir(parents=True)
    (v2 / "app" / "memory.max").write_text("1073741824\n")
    (tmp_path / "cg2").write_text("0::/app\n")
    assert cgroup_limit(v2, tmp_path / "cg2") == 1 << 30
    assert limit_from_cgroup(1 << 30) == (1 << 30) - (1 << 30) // 10
    (v2 / "app" / "memory.max").write_text("max\n")
    assert cgroup_limit(v2, tmp_path / "cg2") is None
    v1 = tmp_path / "v1"
    (v1 / "memory" / "docker" / "x").mkdir(parents=True)
    (v1 / "memory" / "docker" / "x" / "memory.limit_in_bytes").write_text("536870912\n")
    (tmp_path / "cg1").write_text("12:cpu,cpuacct:/docker/x\n4:memory:/docker/x\n")
    assert cgroup_limit(v1, tmp_path / "cg1") == 512 << 20
    (v1 / "memory" / "docker" / "x" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cgroup_limit(v1, tmp_path / "cg1") is None


def test_a_task_past_the_limit_loses_its_child_then_is_revoked(project: Project, record_redis: Any) -> None:
    (project.root / f"{project.app}.py").write_text(APP.format(app=project.app))
    url = record_redis.url()
    port = free_port()
    env = project.env(TEST_RECORD_URL=url)
    launched = project.launch(
        "--concurrency", "2", "--memory-limit", "200MB", "--metrics-port", str(port), "--metrics-addr", "127.0.0.1",
        env=env,
    )  # fmt: skip
    launched.wait_output(r"1 worker ready", 60)
    launched.wait_output(r"memory guard: \S+ 191 MiB", 10)
    rows = json.loads(project.run("ps", "--json", env=env).stdout)
    main = psutil.Process(next(r["pid"] for r in rows if r.get("kind") == "worker"))
    children = {c.pid for c in main.children()}
    app = client(project.broker_url)
    for i in range(10):
        app.send_task("mem.note", args=(i,))
    app.send_task("mem.grow")
    for i in range(10, 30):
        app.send_task("mem.note", args=(i,))
    kills = wait_for(
        lambda: (
            re.findall(r"SIGKILL to pool child (\d+) running task mem\.grow \[[0-9a-f-]+\](.*)", launched.output())
            if len(re.findall(r"SIGKILL to pool child", launched.output())) >= 2
            else None
        ),
        60,
        "two kills of the growing task",
    )
    assert len(kills) == 2 and "revoked" not in kills[0][1] and "revoked, it will not run again" in kills[1][1]
    wait_for(lambda: len(lrange(url, "notes")) == 30, 60, "every other task to complete")
    assert sorted(int(i) for i in lrange(url, "notes")) == list(range(30))
    assert len(lrange(url, "grow-start")) == 2 and not lrange(url, "grow-done")  # ran twice, never a third time
    assert main.is_running() and main.status() != psutil.STATUS_ZOMBIE  # the main process lives
    killed = {int(pid) for pid, _rest in kills}
    assert all(psutil.pid_exists(pid) for pid in children - killed)  # the child that did not grow lives
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'tlrun_memory_kills_total{task="mem.grow"} 2.0' in body, body
    ps = wait_for(lambda: json.loads(project.run("ps", "--json", env=env).stdout), 10, "ps")
    row = next(r for r in ps if r.get("kind") == "worker")
    assert row["memory_limit"] == 200_000_000
    wait_for(
        lambda: (
            'tlrun_memory_kills_total{task="mem.grow"} 2.0'
            in project.run("doctor", "-A", project.app, "--format", "prometheus", env=env).stdout
        ),
        10,
        "doctor's counter",
    )
    launched.send(signal.SIGTERM)
    assert launched.wait(60) == 0


def test_a_task_whose_memory_is_in_its_subprocess_loses_that_tree_only(project: Project, record_redis: Any) -> None:
    """A task waits on a 400 MB subprocess of its own, under a 300 MB limit: the guard counts each pool child
    with what it started, kills that task's child and its subprocess (never the idle child), memory falls
    back, the task is revoked at its second kill, and the other tasks keep completing."""
    (project.root / f"{project.app}.py").write_text(APP.format(app=project.app))
    url = record_redis.url()
    env = project.env(TEST_RECORD_URL=url)
    launched = project.launch("--concurrency", "2", "--memory-limit", "300MB", env=env)
    launched.wait_output(r"1 worker ready", 60)
    rows = json.loads(project.run("ps", "--json", env=env).stdout)
    main = psutil.Process(next(r["pid"] for r in rows if r.get("kind") == "worker"))
    app = client(project.broker_url)
    app.send_task("mem.hog_in_subprocess")
    for i in range(10):
        app.send_task("mem.note", args=(i,))
    kills = wait_for(
        lambda: (
            re.findall(r"(SIGKILL to|could not kill) pool child (\d+) running (.*)", launched.output())
            if len(re.findall(r"pool child \d+ running", launched.output())) >= 2
            else None
        ),
        90,
        "two kills of the task whose subprocess grew",
    )
    assert all(
        done == "SIGKILL to" and what.startswith("task mem.hog_in_subprocess") for done, _pid, what in kills[:2]
    ), kills
    assert "revoked, it will not run again" in kills[1][2]
    hogs = [int(pid) for pid in lrange(url, "hog-children")]
    assert len(hogs) == 2 and not lrange(url, "hog-done")  # ran twice, never a third time
    for pid in hogs:  # each subprocess died with its task's child: nothing orphaned
        wait_for(
            lambda pid=pid: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
            10,
            f"hog {pid} gone",
        )
    wait_for(lambda: len(lrange(url, "notes")) == 10, 60, "every other task to complete")
    assert main.is_running() and main.status() != psutil.STATUS_ZOMBIE

    def pool_memory() -> dict[str, int]:
        row = next(r for r in json.loads(project.run("ps", "--json", env=env).stdout) if r.get("kind") == "worker")
        return dict(row.get("pool_memory") or {})

    # Each pool child's task tree, as the guard last recorded it: none holds the 400 MB any more.
    wait_for(lambda: (sizes := pool_memory()) and max(sizes.values()) < 150_000_000, 20, "the trees small again")
    assert len(re.findall(r"pool child \d+ running", launched.output())) == 2  # no idle child was ever killed
    launched.send(signal.SIGTERM)
    assert launched.wait(60) == 0
