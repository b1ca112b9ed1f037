"""Production reload without downtime: `tlrun reload` and SIGHUP to `tlrun worker`, on real workers.

A stream of tasks runs through three reloads with a 4 s task in the old worker each time: every task records
its own id, the code version it ran and when it completed, in a Redis of the test's own, so that a lost task,
a task run twice, a gap without a consumer and the code each task ran are all visible.
"""

from __future__ import annotations

import itertools
import signal
import subprocess
import threading
import time
from typing import Any

import pytest

from helpers import PY, Project, client, ping_replies, wait_for

TASKS = """
import os
import time

import redis

from {app} import app

VERSION = {version}
{broken}

_rec = None


def _r():
    global _rec
    if _rec is None:
        _rec = redis.Redis.from_url(os.environ["TEST_RECORD_URL"])
    return _rec


@app.task(name="stream.step")
def step(i, seconds=0.0):
    if seconds:
        _r().rpush("long-started", i)
    time.sleep(seconds)
    _r().rpush("done", "%s:%s:%.4f" % (i, VERSION, time.time()))
    return VERSION
"""

APP = """
import os

from celery import Celery

app = Celery("{app}", include=["{app}_tasks"])
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=int(os.environ.get("TEST_PREFETCH", "1")),
    broker_connection_retry_on_startup=True,
    broker_transport_options={{"visibility_timeout": 3600}},
)
"""


def write_code(project: Project, version: int, broken: bool = False) -> None:
    (project.root / f"{project.app}.py").write_text(APP.format(app=project.app))
    tasks = TASKS.format(app=project.app, version=version, broken="import no_such_module_xyz" if broken else "")
    (project.root / f"{project.app}_tasks.py").write_text(tasks)


def records(url: str, key: str = "done") -> list[tuple[int, int, float]]:
    import redis

    r = redis.Redis.from_url(url)
    try:
        out = []
        for raw in r.lrange(key, 0, -1):
            i, version, stamp = raw.decode().split(":")
            out.append((int(i), int(version), float(stamp)))
        return out
    finally:
        r.close()


def long_started(url: str) -> list[int]:
    import redis

    r = redis.Redis.from_url(url)
    try:
        return [int(x) for x in r.lrange("long-started", 0, -1)]
    finally:
        r.close()


def run_once(broker_url: str, record_url: str, i: int) -> int:
    """Send task i; the code version it ran with."""
    client(broker_url).send_task("stream.step", args=(i,))
    found = wait_for(lambda: [v for j, v, _t in records(record_url) if j == i], 20, f"task {i} to run")
    return found[0]


def start_worker(project: Project, env: dict[str, str], *args: str) -> Any:
    launched = project.launch("--concurrency", "2", *args, env=env)
    launched.wait_output(r"tlrun: \d+ workers? ready", 60)
    return launched


def reload(project: Project, env: dict[str, str], *args: str) -> Any:
    return project.run("reload", "-A", project.app, *args, env=env, timeout=120)


def test_reload_swaps_beside_and_a_broken_module_keeps_the_old_worker(project: Project, record_redis: Any) -> None:
    write_code(project, 1)
    env = project.env(TEST_RECORD_URL=record_redis.url())
    worker = start_worker(project, env)
    first = wait_for(lambda: ping_replies(project.broker_url), 10, "the first worker's pong")
    assert len(first) == 1 and "@" in first[0]

    write_code(project, 2, broken=True)
    done = reload(project, env)
    assert done.returncode == 18, done.stdout + done.stderr
    assert "no_such_module_xyz" in done.stdout + done.stderr
    assert "keeps running the previous code" in done.stdout + done.stderr
    assert ping_replies(project.broker_url) == first  # the old worker serves on, alone

    write_code(project, 2)
    done = reload(project, env)
    assert done.returncode == 0, done.stdout + done.stderr
    base = first[0].split("@")[0]
    assert f"{base}-2@" in done.stdout
    assert run_once(project.broker_url, record_redis.url(), 1) == 2
    worker.wait_output(r"finished its tasks and stopped|was idle: drained and stopped", 30)
    assert [n.split("@")[0] for n in ping_replies(project.broker_url)] == [f"{base}-2"]

    write_code(project, 3)
    worker.send(signal.SIGHUP)  # systemctl reload
    worker.wait_output(rf"reloaded: asked by SIGHUP; new worker {base}-3@", 60)
    assert run_once(project.broker_url, record_redis.url(), 2) == 3
    wait_for(lambda: len(ping_replies(project.broker_url)) == 1, 30, "the second generation to stop")
    ps = project.run("ps", "--json", env=env)
    assert f"{base}-3@" in ps.stdout
    assert worker.proc.poll() is None


def test_three_reloads_at_once_all_answer(project: Project, record_redis: Any) -> None:
    """Three `tlrun reload` started at once share one request file: a later one may replace another's before
    the launcher reads it. Every caller gets its answer (the reload it asked for, or a later one) and exits 0;
    the worker runs the new code (before: a caller waited its whole timeout, then exit 18)."""
    write_code(project, 1)
    env = project.env(TEST_RECORD_URL=record_redis.url())
    worker = start_worker(project, env)
    write_code(project, 2)
    callers = [
        subprocess.Popen(
            [PY, "-m", "tlrun", "reload", "-A", project.app, "--timeout", "40"],
            cwd=project.root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(3)
    ]
    try:
        said = [c.communicate(timeout=90)[0] for c in callers]
    finally:
        for c in callers:
            if c.poll() is None:
                c.kill()
                c.wait(10)
    assert [c.returncode for c in callers] == [0, 0, 0], said
    assert all("reloaded:" in out for out in said), said
    assert run_once(project.broker_url, record_redis.url(), 1) == 2
    assert worker.proc.poll() is None


def test_reload_with_nothing_running_says_so(project: Project) -> None:
    write_code(project, 1)
    done = reload(project, project.env())
    assert done.returncode == 19, done.stdout + done.stderr
    assert "nothing to reload" in done.stderr


class Stream:
    """Send `total` tasks at a steady rate from a thread (the test's main thread runs the reloads)."""

    def __init__(self, url: str, total: int, rate: float) -> None:
        from celery import Celery

        self.total, self.rate = total, rate
        self.app = Celery("test-stream", broker=url, set_as_current=False)  # its own: made here, not in the thread
        self.sent = 0
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Stream:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            app = self.app
            began = time.monotonic()
            for i in range(self.total):
                pause = began + i / self.rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                app.send_task("stream.step", args=(i,))
                self.sent = i + 1
        except BaseException as exc:  # reported by the test
            self.error = exc

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the task stream did not finish"
        self.app.close()
        assert self.error is None, self.error


def stream_through_reloads(project: Project, broker_url: str, record_url: str, prefetch: int) -> None:
    write_code(project, 1)
    env = project.env(TEST_RECORD_URL=record_url, TEST_PREFETCH=str(prefetch), CELERY_BROKER_URL=broker_url)
    worker = start_worker(project, env)
    total, rate = 1000, 40.0
    app = client(broker_url)
    stream = Stream(broker_url, total, rate).start()
    longs = []
    for version in (2, 3, 4):
        wait_for(
            lambda v=version: stream.sent >= (v - 1) * total // 4, 60, f"a quarter of the stream before v{version}"
        )
        long_id = 10_000 + version
        app.send_task("stream.step", args=(long_id, 4.0))
        longs.append(long_id)
        wait_for(lambda lid=long_id: lid in long_started(record_url), 30, "the 4 s task to start in the old worker")
        write_code(project, version)
        done = reload(project, env)
        assert done.returncode == 0, done.stdout + done.stderr
        reloaded_at = time.time()
    stream.join(120)
    expected = set(range(total)) | set(longs)
    wait_for(lambda: len(records(record_url)) >= len(expected), 90, "every task to complete")
    wait_for(lambda: len(ping_replies(broker_url)) == 1, 30, "the old workers to finish")
    done = records(record_url)
    ids = [i for i, _v, _t in done]
    assert sorted(set(ids)) == sorted(expected), f"lost: {sorted(expected - set(ids))[:20]}"
    twice = sorted({i for i in ids if ids.count(i) > 1})
    assert not twice, f"run twice: {twice[:20]}"
    stamps = sorted(t for i, _v, t in done if i < total)
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert max(gaps) < 1.0, f"longest gap between two completions: {max(gaps):.2f} s"
    late = [(i, v) for i, v, t in done if t > reloaded_at + 0.5 and i < total and v != 4]
    assert not late, f"tasks after the last reload ran old code: {late[:10]}"
    assert worker.proc.poll() is None


@pytest.mark.parametrize("prefetch", [1, 4])
def test_stream_through_three_reloads_on_redis(project: Project, record_redis: Any, prefetch: int) -> None:
    stream_through_reloads(project, project.broker_url, record_redis.url(), prefetch)


@pytest.mark.parametrize("prefetch", [1, 4])
def test_stream_through_three_reloads_on_rabbitmq(
    project: Project, record_redis: Any, amqp_vhost: str, prefetch: int
) -> None:
    project.broker_url = amqp_vhost
    stream_through_reloads(project, amqp_vhost, record_redis.url(), prefetch)
