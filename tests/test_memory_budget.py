"""One budget for one cgroup (issue 38): two roles of one launcher in a 600 MiB memory cgroup made by the test
share its limit. A task growing at 100 MB/s in one role and one growing at 1 GB/s in the other: the guard acts
before the kernel's OOM killer (its oom_kill count unchanged), each runs at most twice, the workers' main
processes live, and the other tasks complete."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from helpers import Launched, Project, client, wait_for
from test_memory_guard import lrange

pytestmark = pytest.mark.timeout(180)

LIMIT = 600 << 20

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


def _grow(key, step_mb, pause, total_mb):
    _rec.rpush(key + "-start", os.getpid())
    chunks = []
    for _ in range(total_mb // step_mb):  # each page written: resident at once
        chunks.append(b"\\x01" * (step_mb << 20))
        time.sleep(pause)
    _rec.rpush(key + "-done", os.getpid())


@app.task(name="mem.slow")
def slow():
    _grow("slow", 10, 0.1, 900)  # 100 MB/s


@app.task(name="mem.fast")
def fast():
    _grow("fast", 20, 0.02, 1200)  # 1 GB/s


@app.task(name="mem.note")
def note(i):
    time.sleep(0.05)
    _rec.rpush("notes", i)
"""

PROJECT = """[tool.tlrun]
app = "{app}"

[tool.tlrun.workers.a]
queues = ["qa"]
concurrency = 1

[tool.tlrun.workers.b]
queues = ["qb"]
concurrency = 1
"""


def _memory_cgroup() -> tuple[Path, int] | None:
    """This process's memory cgroup directory and version, where one can be made under it."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hierarchy, controllers, path = [*line.split(":", 2), "", ""][:3]
        if "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            if (base / "memory.limit_in_bytes").exists():
                return base, 1
        if hierarchy == "0" and controllers == "":
            for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
                base = root / path.lstrip("/")
                if (
                    "memory" in (base / "cgroup.subtree_control").read_text()
                    if (base / "cgroup.subtree_control").exists()
                    else False
                ):
                    return base, 2
    return None


@pytest.fixture
def cgroup() -> Iterator[tuple[Path, int]]:
    """A memory cgroup of 600 MiB made for the test (removed afterwards), else skipped with the reason."""
    found = _memory_cgroup()
    if os.geteuid() != 0 or found is None:
        pytest.skip("needs root and a memory cgroup (v1, or v2 with the memory controller delegated) to make one in")
    base, version = found
    path = base / f"tlrun-test-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir()
        (path / ("memory.max" if version == 2 else "memory.limit_in_bytes")).write_text(str(LIMIT))
    except OSError as exc:
        pytest.skip(f"cannot make a memory cgroup under {base}: {exc}")
    try:
        yield path, version
    finally:
        # Only this test's processes can be in the cgroup it made: a failed test's are SIGKILLed here (the
        # project's own teardown comes after this one's).
        for pid in (path / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        wait_for(lambda: not (path / "cgroup.procs").read_text().split(), 30, "the test cgroup to empty")
        path.rmdir()


def oom_kills(path: Path, version: int) -> int:
    text = (path / ("memory.events" if version == 2 else "memory.oom_control")).read_text()
    return int(re.search(r"^oom_kill (\d+)", text, re.M).group(1)) if "oom_kill" in text else 0  # type: ignore[union-attr]


def test_two_roles_in_one_cgroup_share_its_limit_and_the_guard_acts_before_the_kernel(
    project: Project, record_redis: Any, cgroup: tuple[Path, int]
) -> None:
    path, version = cgroup
    if version == 1 and "oom_kill " not in (path / "memory.oom_control").read_text():
        pytest.skip("this kernel's memory.oom_control has no oom_kill count")
    (project.root / f"{project.app}.py").write_text(APP.format(app=project.app))
    (project.root / "pyproject.toml").write_text(PROJECT.format(app=project.app))
    url = record_redis.url()
    env = project.env(TEST_RECORD_URL=url)
    argv = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(path / "cgroup.procs"), *project.tlrun_argv("worker")]
    launched = Launched(argv, project.root, env, project.root / "launcher-in-cgroup.out")
    project.started.append(launched)
    launched.wait_output(r"2 workers ready", 60)
    launched.wait_output(r"memory guard: .* share the cgroup's 536 MiB \(cgroup working set", 10)
    assert str(launched.pid) in (path / "cgroup.procs").read_text().split()
    before = oom_kills(path, version)
    rows = json.loads(project.run("ps", "--json", env=env).stdout)
    mains = [psutil.Process(r["pid"]) for r in rows if r.get("kind") == "worker"]
    assert len(mains) == 2
    app = client(project.broker_url)
    app.send_task("mem.slow", queue="qa")
    app.send_task("mem.fast", queue="qb")
    for i in range(20):
        app.send_task("mem.note", args=(i,), queue="qa" if i % 2 else "qb")
    wait_for(lambda: len(lrange(url, "notes")) == 20, 120, "every other task to complete")
    for name in ("fast", "slow"):  # killed twice, revoked at the second kill, then dropped by its worker
        launched.wait_output(rf"running task mem\.{name} \[([0-9a-f-]+)\]; its second kill: revoked", 60)
        launched.wait_output(rf"Discarding revoked task: mem\.{name}\[", 30)
    said = launched.output()
    kills = re.findall(r"SIGKILL to pool child \d+ running task (mem\.\w+) \[", said)
    assert sorted(set(kills)) == ["mem.fast", "mem.slow"], said[-3000:]
    assert kills.count("mem.fast") == 2 and kills.count("mem.slow") == 2, kills
    assert len(lrange(url, "fast-start")) == 2 and len(lrange(url, "slow-start")) == 2  # never a third time
    assert not lrange(url, "fast-done") and not lrange(url, "slow-done")
    assert oom_kills(path, version) == before, "the kernel's OOM killer acted before the guard"
    assert "OOM killer took" not in said
    assert all(m.is_running() and m.status() != psutil.STATUS_ZOMBIE for m in mains)  # the main processes live
    launched.send(signal.SIGTERM)
    assert launched.wait(60) == 0


MAIN = """
import subprocess, sys
while True:  # a worker's main process that replaces its pool child whenever it dies
    child = subprocess.Popen(["sleep", "1000"])
    print(child.pid, flush=True)
    child.wait()
"""


def _end_main(main: Any) -> None:
    """The MAIN process and the child it runs now, by pid."""
    main.send_signal(signal.SIGSTOP)  # it starts no new child meanwhile
    try:
        for proc in psutil.Process(main.pid).children():  # its own children: they would outlive it
            proc.kill()
    except psutil.Error:
        pass
    main.kill()
    main.wait(10)
    if main.stdout is not None:
        main.stdout.close()


def test_a_kernel_oom_kill_counts_toward_the_poison_task_rule(tmp_path: Path) -> None:
    """The kernel's OOM killer takes a pool child (here: a real child SIGKILLed while the cgroup's oom_kill
    count goes up, in a cgroup directory written by the test): the kill is counted for the task that child ran,
    and the second one revokes that task, as the guard's own kills do."""
    import subprocess
    import sys

    from tlrun.ops.budget import Cgroup, SharedBudget

    (tmp_path / "memory.limit_in_bytes").write_text(str(LIMIT))
    (tmp_path / "memory.usage_in_bytes").write_text(str(100 << 20))
    (tmp_path / "memory.stat").write_text("total_inactive_file 0\n")
    events = tmp_path / "memory.oom_control"
    events.write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    main = subprocess.Popen([sys.executable, "-c", MAIN], stdout=subprocess.PIPE, text=True)
    revoked: list[str] = []
    try:
        assert main.stdout is not None
        shared = SharedBudget(
            Cgroup(tmp_path, 1), LIMIT, lambda nodes: None, lambda *a: False, lambda i: revoked.append(i) or True, {}
        )
        for n in (1, 2):
            child = int(main.stdout.readline())
            shared.book._book, shared.book._known = {child: ("mem.burst", "task-1")}, True  # the last answer
            assert shared.look([("w1@host", main.pid)], 0.0) == []
            os.kill(child, signal.SIGKILL)
            events.write_text(f"oom_kill_disable 0\nunder_oom 0\noom_kill {n}\n")
            wait_for(
                lambda child=child: child not in [c.pid for c in psutil.Process(main.pid).children()], 10, "reaped"
            )
            kills = shared.look([("w1@host", main.pid)], 0.0)
            assert [(k.by, k.pid, k.task_id, k.revoked) for k in kills] == [("kernel", child, "task-1", n == 2)]
        assert shared.killed_ids == {"task-1": 2} and revoked == ["task-1"]
        shared.close()
    finally:
        _end_main(main)


@pytest.mark.parametrize("workers_answer", [True, False])
def test_a_kill_names_the_task_the_frozen_child_runs_now_not_the_books_older_answer(
    tmp_path: Path, workers_answer: bool
) -> None:
    """The book of running tasks is up to a question old: the child it lists as running a small task has taken
    the runaway one since (redelivered after its last kill). The guard freezes the child, asks the workers
    again, and blames what they say it runs now; only when they do not answer, the book's entry. (The shared
    cgroup's end-to-end test met this on a busy machine: a small task was blamed for the runaway's kill.)"""
    import subprocess
    import sys

    from tlrun.launch import signals
    from tlrun.ops.budget import Cgroup, SharedBudget

    (tmp_path / "memory.limit_in_bytes").write_text(str(LIMIT))
    (tmp_path / "memory.usage_in_bytes").write_text(str(LIMIT + (64 << 20)))  # past the limit: the guard acts
    (tmp_path / "memory.stat").write_text("total_inactive_file 0\n")
    (tmp_path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    main = subprocess.Popen([sys.executable, "-c", MAIN], stdout=subprocess.PIPE, text=True)
    asked_while: list[str] = []
    killed: list[int] = []
    try:
        assert main.stdout is not None
        child = int(main.stdout.readline())

        def running_now(nodes: list[str]) -> dict[int, tuple[str, str]] | None:
            asked_while.append(psutil.Process(child).status())
            return {child: ("mem.fast", "task-fast")} if workers_answer else None

        def kill(main_pid: int, pid: int, started: list[psutil.Process]) -> bool:
            killed.append(pid)
            return signals.kill_pool_child(main_pid, pid, also=started)

        shared = SharedBudget(
            Cgroup(tmp_path, 1), LIMIT, lambda nodes: None, kill, lambda i: True, {}, signals.pause_pool_child,
            running_now,
        )  # fmt: skip
        shared.book._book, shared.book._known = {child: ("mem.note", "task-note")}, True  # the last answer
        kills = shared.look([("w1@host", main.pid)], 0.0)
        assert killed == [child]
        assert asked_while == [psutil.STATUS_STOPPED], "asked while the child was frozen"
        expected = ("mem.fast", "task-fast") if workers_answer else ("mem.note", "task-note")
        assert [(k.pid, k.task, k.task_id) for k in kills] == [(child, *expected)]
        shared.close()
    finally:
        _end_main(main)
