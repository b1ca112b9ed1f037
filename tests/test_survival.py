"""Prove it survives: races, kills, reused pids, poisoned state, scope, stop semantics, broker restarts,
crashes and task loss. Real processes, a real broker, each bounded in time, each leaving nothing running."""

from __future__ import annotations

import ast
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from helpers import PY, Launched, Project, RedisServer, gone, send_task, wait_for
from tlrun.launch import guard, procs

pytestmark = pytest.mark.timeout(150)
HOST = socket.gethostname()
READY = r"tlrun: \d+ workers? ready: (\S+) \(pid (\d+)\)"


def lock_file(proj: Project, kind: str = "worker") -> Path:
    return proj.lock_file(kind)


def tree(pid: int) -> list[int]:
    return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]


def fake_celery(directory: Path, body: str) -> Path:
    """A script named `celery`: `python .../celery -A app worker` looks like a worker to the process table."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    script = directory / "celery"
    script.write_text(body)
    script.chmod(0o755)
    return script


# 1 -------------------------------------------------------------------------------------------------
def test_twenty_launchers_at_once_start_exactly_one_worker(project: Project) -> None:
    fifo = project.base / "start-gate"
    os.mkfifo(fifo)
    argv = project.tlrun_argv("worker")
    racers = [
        Launched(
            ["sh", "-c", 'read _ < "$0"; exec "$@"', str(fifo), *argv],
            project.root,
            project.env(),
            project.base / f"race-{i}.txt",
        )
        for i in range(20)
    ]
    project.started.extend(racers)
    # Hold the FIFO open (read-write: no blocking) until every racer reads it as its stdin, then close it:
    # all twenty see end-of-file and exec tlrun at the same instant.
    gate = os.open(fifo, os.O_RDWR)

    def all_waiting() -> bool:
        try:
            return all(os.readlink(f"/proc/{r.pid}/fd/0") == str(fifo) for r in racers)
        except OSError:
            return False

    try:
        wait_for(all_waiting, 30, "all racers waiting at the gate")
    finally:
        os.close(gate)
    winners = [r for r in racers if r.wait_output(r"ready:|error:", 60) and "ready:" in r.output()]
    assert len(winners) == 1
    winner = winners[0]
    for racer in racers:
        if racer is not winner:
            assert racer.wait(60) == 6
            assert f"tlrun launcher pid {winner.pid}" in racer.output()
    from helpers import ping_replies

    assert ping_replies(project.broker_url) == [f"api{winner.pid}@{HOST}"]


# 2 -------------------------------------------------------------------------------------------------
def test_sigkilled_launcher_tree_gone_and_lock_free(project: Project) -> None:
    first = project.launch("--concurrency", "2")
    worker_pid = int(first.wait_output(READY, 30).group(2))
    family = tree(worker_pid)
    first.send(signal.SIGKILL)
    first.wait(5)
    # The parent-death SIGTERM gives the worker a warm shutdown, which an idle prefork worker of Celery 5.7
    # takes about 2.05 s to finish here (bench/results.md): allow twice that.
    wait_for(lambda: gone(family), 4.0, "worker tree gone after the launcher's SIGKILL")
    with lock_file(project).open("a") as fh:  # the lock is free at once: take it without blocking
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fh, fcntl.LOCK_UN)


# 3, 4 ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("poison", ["reused-pid", "pid-1", "garbage", "other-user"])
def test_poisoned_lock_record_is_never_signalled(project: Project, poison: str) -> None:
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        records = {
            "reused-pid": {"pid": bystander.pid, "create_time": psutil.Process(bystander.pid).create_time() - 1000},
            "pid-1": {"pid": 1, "create_time": psutil.Process(1).create_time()},
            "garbage": "\x00not json{{",
            "other-user": {"pid": bystander.pid, "create_time": psutil.Process(bystander.pid).create_time()},
        }
        path = lock_file(project)
        record = records[poison]
        path.write_text(record if isinstance(record, str) else json.dumps(record))
        path.chmod(0o600)
        # While somebody holds the lock, --replace must explain and signal nothing.
        with path.open("r") as held:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            result = project.run("worker", "-A", project.app, "--replace", timeout=30)
            assert result.returncode == 6, result.stderr
            assert "Traceback" not in result.stderr
            stopped = project.run("stop", "-A", project.app, "--timeout", "1", timeout=30)
            assert stopped.returncode == 0
        assert bystander.poll() is None, "an unrelated process was signalled"
        assert psutil.Process(1).is_running()
        # Once the lock is free, the poisoned record is simply replaced: tlrun recovers.
        launched = project.launch()
        launched.wait_output(READY, 30)
        assert (guard.read_record(path) or {}).get("pid") == launched.pid
    finally:
        bystander.kill()
        bystander.wait(5)


def test_a_lock_record_being_rewritten_is_never_read_empty_or_torn(tmp_path: Path) -> None:
    """A launcher rewrites its record as its state changes (starting, ready, reloading) while ps, probes and
    stop read it from other processes: every read sees one whole record, the old or the new."""
    path = tmp_path / "records.lock"
    reader = (
        "import sys\n"
        "from tlrun.launch.rundir import read_record\n"
        "bad = []\n"
        "for _ in range(20000):\n"
        "    record = read_record(sys.argv[1])\n"
        "    if record is None or record.get('n') is None:\n"
        "        bad.append(open(sys.argv[1], 'rb').read()[:80])\n"
        "print(len(bad), bad[:3])\n"
    )
    lock = guard.ProjectLock.try_acquire(path)
    assert lock is not None
    with lock:
        lock.write({"n": 0, "state": "starting"})
        proc = subprocess.Popen([PY, "-c", reader, str(path)], stdout=subprocess.PIPE, text=True)
        try:
            n = 0
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                n += 1  # records of alternating lengths: a shorter one after a longer one, and back
                lock.write({"n": n, "state": "ready" if n % 2 else "reloading", "pad": "x" * (n % 3) * 200})
            out, _ = proc.communicate(timeout=30)
        finally:
            proc.kill()
            proc.wait(5)
    assert n > 100, "the reader ended before the writer got going: nothing was tested"
    bad, _, samples = out.partition(" ")
    assert bad == "0", f"{bad} of 20000 reads saw no whole record while it was rewritten {n} times: {samples}"


# 5 -------------------------------------------------------------------------------------------------
def test_sweep_spares_another_users_process(project: Project, tmp_path: Path) -> None:
    if os.getuid() != 0 or not os.path.exists("/usr/bin/python3"):
        pytest.skip("needs root to run a process as another user")
    script = fake_celery(Path("/tmp") / f"tlrun-other-user-{os.getpid()}", "import time\ntime.sleep(300)\n")
    other = subprocess.Popen(
        ["/usr/bin/python3", str(script), "-A", project.app, "worker", "-n", "theirs@h"],
        cwd=project.root,
        user=65534,
        group=65534,
        start_new_session=True,
    )
    try:
        wait_for(lambda: psutil.Process(other.pid).cmdline()[-1] == "theirs@h", 10, "the other user's process")
        result = project.run("sweep", "-A", project.app, "--grace", "1")
        assert "no stray workers or beats" in result.stdout
        assert other.poll() is None
    finally:
        other.kill()
        other.wait(5)
        script.unlink()
        script.parent.rmdir()


# 6 -------------------------------------------------------------------------------------------------
@pytest.mark.matrix
def test_stopping_a_busy_prefork_worker_lets_its_task_finish(project: Project) -> None:
    launched = project.launch("--concurrency", "1", "--grace", "60")
    launched.wait_output(READY, 30)
    result = send_task(project.broker_url, f"{project.app}.sleep", 10)
    launched.wait_output(r"Task \S+\.sleep\[\S+\] received", 20)
    time.sleep(0.5)  # not synchronisation: the task must be *running*, half a second in, when the stop comes
    launched.send(signal.SIGINT)
    assert result.get(timeout=40) == 10
    assert result.state == "SUCCESS"
    assert launched.wait(30) == 0
    log = (project.root / "logs" / f"celery_worker_{launched.pid}.log").read_text()
    assert "WorkerLostError" not in log


def test_control_sigterm_to_the_whole_group_kills_the_running_task(project: Project) -> None:
    worker = project.hand_worker(f"control@{HOST}", extra=("--pool", "prefork", "--concurrency", "1"))
    worker.wait_output("ready", 30)
    send_task(project.broker_url, f"{project.app}.sleep", 10)
    worker.wait_output(r"Task \S+\.sleep\[\S+\] received", 20)
    time.sleep(0.5)
    os.killpg(worker.pid, signal.SIGTERM)  # what supervisor's stopasgroup=true does
    worker.wait(30)
    assert "WorkerLostError" in worker.output() or "exited with 'signal 15 (SIGTERM)'" in worker.output()


# 7 -------------------------------------------------------------------------------------------------
def test_a_worker_that_ignores_sigterm_is_killed_with_its_group(project: Project) -> None:
    body = (
        "import os, signal, subprocess, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "kids = [subprocess.Popen(['sleep', '300']) for _ in range(2)]\n"
        "print('children', ' '.join(str(k.pid) for k in kids), flush=True)\n"
        "time.sleep(300)\n"
    )
    script = fake_celery(project.base / "bin", body)
    stubborn = Launched(
        [PY, str(script), "-A", project.app, "worker", "-n", f"stubborn@{HOST}"],
        project.root,
        project.env(),
        project.base / "stubborn.txt",
    )
    project.started.append(stubborn)
    children = [int(p) for p in stubborn.wait_output(r"children (\d+) (\d+)", 10).groups()]
    started = time.monotonic()
    result = project.run("sweep", "-A", project.app, "--grace", "1", timeout=30)
    assert f"stopping stray worker pid {stubborn.pid}" in result.stdout
    wait_for(lambda: gone([stubborn.pid, *children]), 10, "the stubborn main process and its children")
    assert time.monotonic() - started < 15


# 8 -------------------------------------------------------------------------------------------------
def test_stop_ends_a_sigstopped_worker(project: Project) -> None:
    launched = project.launch("--pool", "solo", "--grace", "2")
    worker_pid = int(launched.wait_output(READY, 30).group(2))
    os.kill(worker_pid, signal.SIGSTOP)
    unknown = project.run("health", "-A", project.app, "--timeout", "0.3", "--retries", "0")
    assert unknown.returncode == 14
    result = project.run("stop", "-A", project.app, "--timeout", "4", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # The launcher had to SIGKILL its stopped worker: stop must not claim a warm stop.
    assert f"stopped launcher pid {launched.pid}" in result.stdout and "warm" not in result.stdout
    wait_for(lambda: gone([worker_pid, launched.pid]), 5, "stopped worker and launcher gone")


# 9 -------------------------------------------------------------------------------------------------
def test_no_zombies_after_reloads_and_stops(project: Project) -> None:
    launched = project.launch("--reload", command="dev", fast=False)
    launched.wait_output(READY, 30)
    app_file = project.root / f"{project.app}.py"
    for n in range(2):
        app_file.write_text(app_file.read_text() + f"\n# change {n}\n")
        wait_for(lambda n=n: launched.output().count("reloaded:") > n, 30, f"reload {n + 1}")

    # One worker and, for the next save, one spare (Celery imported, held before it loads the app). The spare
    # starts just after the reload's verdict line is printed: wait for it.
    def worker_and_spare() -> list[int]:
        children = psutil.Process(launched.pid).children()
        assert all(c.status() != psutil.STATUS_ZOMBIE for c in children)
        found = [c.pid for c in children if procs.parse_celery_argv(c.cmdline())]
        return found if len(found) == 2 else []

    workers = wait_for(worker_and_spare, 15, "the worker and the next spare")
    record = guard.read_record(project.lock_file())
    assert record is not None and record["worker_pid"] in workers


# 11 ------------------------------------------------------------------------------------------------
def test_broker_restart_while_worker_runs(project: Project, redis_server: RedisServer) -> None:
    launched = project.launch()
    launched.wait_output(READY, 30)
    redis_server.restart()
    result = send_task(project.broker_url, f"{project.app}.add", 2, 3)
    assert result.get(timeout=60) == 5
    assert launched.proc.poll() is None


# 12 ------------------------------------------------------------------------------------------------
def test_task_that_exits_the_worker_is_reported(project: Project) -> None:
    launched = project.launch("--pool", "solo")
    launched.wait_output(READY, 30)
    send_task(project.broker_url, f"{project.app}.crash", 3)
    assert launched.wait(30) == 3
    out = launched.output()
    assert "exited on its own with status 3" in out and "last lines of its log" in out


# no task loss ----------------------------------------------------------------------------------------
def _runs(proj: Project) -> list[int]:
    import redis

    return [int(x) for x in redis.Redis.from_url(proj.broker_url).lrange("runs", 0, -1)]


def _send_batch(proj: Project, n: int = 50) -> None:
    for i in range(n):
        send_task(proj.broker_url, f"{proj.app}.record", i, 0.2)


def _report(name: str, runs: list[int], n: int = 50) -> dict[str, int]:
    figures = {
        "sent": n,
        "completed": len(set(runs)),
        "lost": n - len(set(runs)),
        "ran_twice": len(runs) - len(set(runs)),
    }
    print(f"\n[no-task-loss] {name}: {json.dumps(figures)}", file=sys.stderr)
    return figures


def test_no_task_lost_when_worker_is_replaced_mid_stream(project: Project) -> None:
    first = project.launch("--concurrency", "2")
    first.wait_output(READY, 30)
    _send_batch(project)
    wait_for(lambda: len(_runs(project)) >= 10, 30, "ten tasks done")
    second = project.launch("--replace", "--concurrency", "2")
    second.wait_output(READY, 60)
    assert first.wait(60) == 0
    wait_for(lambda: set(_runs(project)) == set(range(50)), 90, "all 50 tasks completed")
    assert _report("replace", _runs(project))["lost"] == 0


def _pending_job_pipe(child: int) -> bool:
    """Does a pipe of this pool child, other than its stdout/stderr, hold unread bytes (a job's message)?"""
    import termios

    def inode(fd: str) -> str:
        return os.readlink(f"/proc/{child}/fd/{fd}")

    console = {inode("1"), inode("2")}
    for fd in os.listdir(f"/proc/{child}/fd"):
        try:
            target = inode(fd)
            if not target.startswith("pipe:") or target in console:
                continue
            reader = os.open(f"/proc/{child}/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            pending = fcntl.ioctl(reader, termios.FIONREAD, b"\0\0\0\0")
        finally:
            os.close(reader)
        if int.from_bytes(pending, sys.byteorder) > 0:
            return True
    return False


@pytest.mark.matrix
@pytest.mark.parametrize("fix", ["on", "off"])
def test_a_task_handed_to_a_pool_child_as_the_stop_begins_does_not_stall_the_stop(project: Project, fix: str) -> None:
    """Celery's defect (docs/celery-settings.md): at a warm shutdown `AsynPool.flush()` drops
    every job no child has acknowledged, even one already written to a child's pipe; the child runs it, nobody
    reads its result, and billiard's child waits ~30 s for the parent to count it. The race, made certain: the
    only pool child is stopped (SIGSTOP) while a job is written to it, the stop begins, and the child resumes
    once the consumer has flushed. tlrun's fix (in the worker it runs in place) keeps the job; without it the
    stop stalls into tlrun's stop ladder (the requeue request 3 s before the grace period ends, where the pool,
    which runs no task any more, is stopped) and the message's ack never goes out."""
    import celery

    if fix == "off" and celery.VERSION[:2] < (5, 6):
        # Measured in the version matrix: Celery 5.5's flush kept this job (the warm stop ended at once,
        # status 0, without the fix); the unconditional discard of not-accepted jobs came with 5.6.
        pytest.skip("Celery 5.5's flush does not drop the written job: the defect is 5.6's and later")
    grace = "10"
    env = project.env(**({"TLRUN_CELERY_FIX": "0"} if fix == "off" else {}))
    launched = project.launch("--concurrency", "1", "--loglevel", "debug", "--grace", grace, env=env)
    worker = int(launched.wait_output(READY, 30).group(2))
    (child,) = psutil.Process(worker).children()
    os.kill(child.pid, signal.SIGSTOP)
    try:
        send_task(project.broker_url, f"{project.app}.record", 7, 0.1)
        wait_for(lambda: _pending_job_pipe(child.pid), 20, "the job written to the stopped pool child")
        launched.send(signal.SIGTERM)
        launched.wait_output(r"Stopping Pool", 20)  # the consumer has stopped (and flushed the pool)
    finally:
        os.kill(child.pid, signal.SIGCONT)
    status = launched.proc.wait(30)
    out = launched.output()
    assert re.search(r"record\[[0-9a-f-]+\] succeeded", out), out[-3000:]
    seen = _redis_accounting(project.broker_url)
    if fix == "on":
        assert status == 0 and "grace period over" not in out, out[-3000:]
        # Its result was read, so its late ack went out: the message is gone from Redis, done once.
        assert seen["queued"] == seen["unacked"] == set() and seen["done"] == {7}, seen
    else:
        # Its child waits 30 s for the parent to read the result: still there when tlrun's ladder goes on; at
        # the requeue point the worker runs no task, so its pool is stopped and the stop ends 0 (no SIGKILL).
        assert "still stopping 3 s before the deadline" in out, out[-3000:]
        assert "idle pool process(es) stopped" in out and status == 0, out[-3000:]
        # It ran, but its ack never went out: the message is back, and would run a second time.
        assert seen["queued"] | seen["unacked"] == {7} and seen["done"] == {7}, seen


def test_no_task_lost_when_a_stray_is_swept_mid_stream(project: Project) -> None:
    stray = project.hand_worker(f"stray@{HOST}", extra=("--pool", "prefork", "--concurrency", "2"))
    stray.wait_output("ready", 30)
    _send_batch(project)
    wait_for(lambda: len(_runs(project)) >= 10, 30, "ten tasks done")
    launched = project.launch("--concurrency", "2")
    launched.wait_output(READY, 60)
    assert stray.wait(30) == 0, launched.output()[-3000:] + "\n--- the stray:\n" + stray.output()[-3000:]
    wait_for(lambda: set(_runs(project)) == set(range(50)), 90, "all 50 tasks completed")
    assert _report("sweep", _runs(project))["lost"] == 0


def _task_arg(payload: dict[str, Any]) -> int:
    """The `i` of a `record(i, seconds)` message as kombu stores it in Redis."""
    return int(ast.literal_eval(payload["headers"]["argsrepr"])[0])


def _redis_accounting(url: str) -> dict[str, set[int]]:
    """Where every task is, as Redis holds it: waiting in the queue, delivered but unacked, or completed."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        queued = {_task_arg(json.loads(raw)) for raw in client.lrange("celery", 0, -1)}
        unacked = {_task_arg(json.loads(raw)[0]) for raw in client.hgetall("unacked").values()}
        done = {int(x) for x in client.lrange("runs", 0, -1)}
        mutex = {1} if client.exists("unacked_mutex") else set()
    finally:
        client.close()
    return {"queued": queued, "unacked": unacked, "done": done, "mutex_left": mutex}


def test_worker_killed_mid_stream_on_redis_every_task_is_accounted_for(project: Project) -> None:
    """SIGKILL with the recommended settings on Redis. kombu's transport removes a message from the queue by
    BRPOP and only then writes it into the unacked hash (QoS.append): a SIGKILL between the two, or while the
    BRPOP's reply is in flight, loses that one message whatever task_acks_late says. So: right after the
    kill, every task is done, queued or unacked, except at most the one message of that window (one BRPOP
    per worker connection); everything else completes; the missing one never does."""
    env = project.env(TEST_ACKS_LATE="1", TEST_VISIBILITY="3")
    first = project.launch("--concurrency", "2", env=env)
    worker_pid = int(first.wait_output(READY, 30).group(2))
    tree = [worker_pid, *(c.pid for c in psutil.Process(worker_pid).children(recursive=True))]
    _send_batch(project)
    wait_for(lambda: len(_runs(project)) >= 10, 30, "ten tasks done")
    os.killpg(worker_pid, signal.SIGKILL)  # a crash: no warm shutdown, no restore
    wait_for(lambda: gone(tree), 10, "the killed worker's tree gone")
    seen = _redis_accounting(project.broker_url)
    missing = set(range(50)) - seen["queued"] - seen["unacked"] - seen["done"]
    assert len(missing) <= 1, f"more than the BRPOP window can lose: {sorted(missing)}"
    first.wait(30)
    second = project.launch("--concurrency", "2", env=env)
    second.wait_output(READY, 30)
    # Unacked messages come back after the visibility timeout (3 s here) through the live worker; after the
    # restore mutex a killed worker may have left expires (5 s here, kombu's default is 300 s).
    expected = set(range(50)) - missing
    try:
        wait_for(lambda: set(_runs(project)) == expected, 90, "every accounted task completed")
    except AssertionError:
        runs = set(_runs(project))
        raise AssertionError(
            f"not completed: {sorted(expected - runs)}; completed although missing at the kill: "
            f"{sorted(runs - expected)}; at the kill: { ({k: sorted(v) for k, v in seen.items()}) }"
        ) from None
    figures = _report("SIGKILL, recommended settings, Redis", _runs(project))
    assert figures["lost"] == len(missing)
    print(f"[no-task-loss] in the BRPOP window at the kill: {sorted(missing) or 'none'}", file=sys.stderr)


def test_worker_killed_mid_stream_on_rabbitmq_loses_nothing(
    tmp_path: Path, redis_server: RedisServer, amqp_vhost: str
) -> None:
    """On RabbitMQ a delivered, unacked message returns to the queue when the connection dies: all 50."""
    proj = Project(tmp_path / "projects", amqp_vhost)
    runs_url = redis_server.url()
    env = proj.env(TEST_ACKS_LATE="1", TEST_RESULT_BACKEND=runs_url)
    try:
        first = proj.launch("--concurrency", "2", env=env)
        worker_pid = int(first.wait_output(READY, 40).group(2))
        for i in range(50):
            send_task(amqp_vhost, f"{proj.app}.record", i, 0.2)
        import redis

        runs = redis.Redis.from_url(runs_url)
        try:
            wait_for(lambda: runs.llen("runs") >= 10, 30, "ten tasks done")
            os.killpg(worker_pid, signal.SIGKILL)
            first.wait(30)
            second = proj.launch("--concurrency", "2", env=env)
            second.wait_output(READY, 40)
            done = lambda: {int(x) for x in runs.lrange("runs", 0, -1)}  # noqa: E731
            wait_for(lambda: done() == set(range(50)), 90, "all 50 tasks completed")
            assert (
                _report("SIGKILL, recommended settings, RabbitMQ", [int(x) for x in runs.lrange("runs", 0, -1)])["lost"]
                == 0
            )
        finally:
            runs.close()
    finally:
        proj.cleanup()


def test_worker_killed_mid_stream_without_acks_late_loses_its_running_tasks(project: Project) -> None:
    """The control: with task_acks_late off, the tasks running at the kill were acked already: gone."""
    env = project.env(TEST_ACKS_LATE="0", TEST_VISIBILITY="3")
    first = project.launch("--concurrency", "2", env=env)
    worker_pid = int(first.wait_output(READY, 30).group(2))
    _send_batch(project)
    wait_for(lambda: len(_runs(project)) >= 10, 30, "ten tasks done")
    os.killpg(worker_pid, signal.SIGKILL)
    first.wait(30)
    second = project.launch("--concurrency", "2", env=env)
    second.wait_output(READY, 30)
    wait_for(lambda: len(set(_runs(project))) >= 40, 60, "the rest of the queue")
    time.sleep(8)  # not synchronisation: give lost tasks more than the visibility timeout to come back
    figures = _report("SIGKILL, task_acks_late off", _runs(project))
    assert figures["lost"] > 0, "the control run should show acked-but-unfinished tasks lost"
