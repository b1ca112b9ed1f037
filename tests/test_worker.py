"""`tlrun worker` end to end: real redis-server, real Celery workers, real signals."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from helpers import PY, Launched, Project, RedisServer, gone, ping_replies, reap, wait_for
from tlrun.launch.hold import Hold
from tlrun.launch.rundir import read_record

pytestmark = pytest.mark.timeout(90)

READY = r"tlrun: (\d+) workers? ready: (\S+) \(pid (\d+)\)"
HOST = socket.gethostname()


def ready(launched: Launched, timeout: float = 40) -> tuple[str, int]:
    match = launched.wait_output(READY, timeout)
    return match.group(2), int(match.group(3))


def worker_tree(pid: int) -> list[int]:
    proc = psutil.Process(pid)
    return [pid] + [c.pid for c in proc.children(recursive=True)]


def lock_file(proj: Project) -> Path:
    return proj.lock_file()


@pytest.mark.matrix
@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_a_held_worker_says_when_it_consumes_and_keeps_no_channel_to_its_launcher(project: Project, pool: str) -> None:
    """The launcher pings a released worker only once it says `consuming` (each ping costs the launcher CPU):
    the word comes once the worker answers pings, and no process of the worker keeps the socket afterwards
    (a pool child forked before it holds a copy until it closes it)."""
    hold = Hold()
    node = f"held-{pool}@{HOST}"
    argv = [PY, "-m", "tlrun.launch.entry", "-A", project.app, "worker", "-n", node, "-P", pool, "-c", "2"]
    argv += ["--without-mingle", "--without-gossip", "--loglevel", "INFO"]
    env = {**project.env(), **hold.env()}
    with open(project.base / f"held-{pool}.out", "wb") as out:
        proc = subprocess.Popen(
            argv, cwd=project.root, env=env, stdout=out, stderr=subprocess.STDOUT, pass_fds=(hold.child_fd,),
            start_new_session=True,
        )  # fmt: skip
    hold.spawned()
    try:
        alive = lambda: proc.poll() is None  # noqa: E731
        assert hold.wait_prepared(time.monotonic() + 60, alive), "the worker never said it imported its app"
        assert ping_replies(project.broker_url) == [], "a held worker connected before `go`"
        watcher = hold._ours.dup()  # the launcher's end, to see EOF once every copy of the worker's end is closed
        hold.release()
        said = wait_for(lambda: hold.wait_consuming(0.5, alive) or None, 60, "the worker's `consuming`")
        assert said and hold._said and not hold._eof, "the word itself came, not an EOF"
        # It said so once its consumer started; the launcher pings from then on until it answers (so does this).
        wait_for(lambda: node in ping_replies(project.broker_url), 30, "the worker that said it consumes to answer")
        watcher.setblocking(False)

        def closed_everywhere() -> bool:
            try:
                return watcher.recv(64) == b""
            except BlockingIOError:
                return False

        wait_for(closed_everywhere, 30, "every process of the worker to close its end of the hold socket")
        watcher.close()
        assert proc.poll() is None
    finally:
        hold.close()
        reap(proc)


@pytest.mark.matrix
def test_worker_reaches_verdict_and_sigint_ends_everything(project: Project) -> None:
    launched = project.launch("--concurrency=2", "--grace", "10")
    node, worker_pid = ready(launched)
    assert node == f"api{launched.pid}@{HOST}"
    assert re.search(rf"1 worker ready: {re.escape(node)} \(pid {worker_pid}\) in \d+\.\d s", launched.output())
    tree = worker_tree(worker_pid)
    assert len(tree) >= 3, "prefork with concurrency 2 has a main process and two children"
    assert ping_replies(project.broker_url) == [node]
    # The worker runs in its own process group, not the launcher's.
    assert os.getpgid(worker_pid) == worker_pid != os.getpgid(launched.pid)
    record = read_record(lock_file(project)) or {}
    assert record["pid"] == launched.pid and record["node"] == node and record["worker_pid"] == worker_pid
    log = Path(project.root / "logs" / f"celery_worker_{launched.pid}.log")
    assert log.stat().st_mode & 0o777 == 0o600
    assert f"{node} ready." in log.read_text()

    launched.send(signal.SIGINT)
    assert launched.wait(20) == 0
    wait_for(lambda: gone(tree), 5, "worker tree gone after SIGINT")
    assert "warm shutdown" in launched.output()
    # The lock is free: a new launcher of the project gets it at once.
    again = project.launch()
    ready(again)
    again.send(signal.SIGINT)
    assert again.wait(20) == 0


def test_stray_worker_is_swept_and_decoys_survive(project: Project, tmp_path: Path) -> None:
    stray = project.hand_worker(f"stray@{HOST}")
    stray.wait_output(r"stray@\S+ ready", 30)
    # Decoys: a sleep whose arguments mention `celery worker`, a worker of another app in this directory,
    # a worker of the same app in another directory.
    sleeper = subprocess.Popen(
        ["sh", "-c", "exec sleep 300", "celery", "worker", "-A", project.app], cwd=project.root, start_new_session=True
    )
    pydecoy = subprocess.Popen(
        [PY, "-c", "import time; time.sleep(300)", "-m", "celery", "-A", project.app, "worker"],
        cwd=project.root,
        start_new_session=True,
    )
    other_app = Project(project.base, project.broker_url, dirname="proj")  # same dir, new app name
    other_app_worker = other_app.hand_worker(f"otherapp@{HOST}")
    other_dir = project.other_project("elsewhere")
    other_dir_worker = other_dir.hand_worker(f"otherdir@{HOST}", cwd=other_dir.root)
    other_app_worker.wait_output(r"ready", 30)
    other_dir_worker.wait_output(r"ready", 30)
    try:
        launched = project.launch("--grace", "10")
        node, _ = ready(launched)
        out = launched.output()
        assert re.search(rf"stopping stray worker pid {stray.pid} \(stray@{re.escape(HOST)}, up \d+ s\)", out)
        assert stray.wait(15) == 0, "the stray got a warm shutdown (SIGTERM to its main process)"
        replies = sorted(ping_replies(project.broker_url))
        assert replies == sorted([node, f"otherapp@{HOST}", f"otherdir@{HOST}"])
        for decoy in (sleeper, pydecoy, other_app_worker.proc, other_dir_worker.proc):
            assert decoy.poll() is None, f"decoy {decoy.args[:3]} was killed"
        # The census follows the verdict (its window starts once ours answered).
        out = launched.wait_output(r"warning: 3 workers answer on this broker, expected 1", 10).string
        assert "also answering: otherapp@" in out
        assert f"pid {other_app_worker.pid} on this host" in out
    finally:
        for decoy in (sleeper, pydecoy):
            decoy.kill()
            decoy.wait(5)
        other_app.cleanup()
        other_dir.cleanup()


def test_dry_run_lists_stray_and_stops_nothing(project: Project) -> None:
    stray = project.hand_worker(f"stray@{HOST}")
    stray.wait_output(r"ready", 30)
    result = project.run("sweep", "-A", project.app, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"would stop stray worker pid {stray.pid}" in result.stdout
    assert stray.proc.poll() is None


def test_duplicate_node_names_are_reported(project: Project) -> None:
    other = project.other_project("elsewhere")
    twins = [other.hand_worker(f"twin@{HOST}", cwd=other.root) for _ in range(2)]
    for twin in twins:
        twin.wait_output(r"ready", 30)
    try:
        launched = project.launch()
        ready(launched)
        launched.wait_output(
            rf"also answering: twin@{re.escape(HOST)} \(pid \d+, \d+ on this host, DUPLICATE: 2 replies\)", 10
        )
        launched.wait_output("3 workers answer", 10)
        launched.send(signal.SIGINT)
        assert launched.wait(20) == 0
        strict = project.launch("--strict")
        assert strict.wait(40) == 9
        assert "--strict: 3 workers answer, expected 1" in strict.output()
    finally:
        other.cleanup()


def test_taken_node_name_is_made_unique(project: Project) -> None:
    # Learn the launcher's pid before it runs: a shell that prints its pid, waits, then execs tlrun.
    argv = project.tlrun_argv("worker")
    script = 'echo $$; read _; exec "$@"'
    holder = subprocess.Popen(
        ["sh", "-c", script, "sh", *argv],
        cwd=project.root,
        env=project.env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        pid = int(holder.stdout.readline())
        other = project.other_project("elsewhere")
        squatter = other.hand_worker(f"api{pid}@{HOST}", cwd=other.root)
        squatter.wait_output("ready", 30)
        holder.stdin.write(b"\n")
        holder.stdin.close()
        lines: list[str] = []
        assert holder.stdout is not None
        # The verdict comes at our worker's own pong; the census that follows it finds the name answered
        # twice and restarts ours under a unique one, with a verdict of its own.
        for raw in holder.stdout:
            lines.append(raw.decode())
            if f"ready: api{pid}-1@{HOST}" in lines[-1]:
                break
        text = "".join(lines)
        assert f"node name api{pid}@{HOST} already answers on the broker: restarting as api{pid}-1@{HOST}" in text
        assert sorted(ping_replies(project.broker_url)) == sorted([f"api{pid}@{HOST}", f"api{pid}-1@{HOST}"])
        other.cleanup()
    finally:
        holder.send_signal(signal.SIGINT)
        try:
            holder.wait(20)
        finally:
            if holder.poll() is None:
                os.killpg(holder.pid, signal.SIGKILL)
                holder.wait(5)
            if holder.stdout is not None:
                holder.stdout.close()


def test_second_launcher_is_refused_and_replace_takes_over(project: Project) -> None:
    first = project.launch("--grace", "10")
    node, first_worker = ready(first)
    second = project.run("worker", "-A", project.app, timeout=30)
    assert second.returncode == 6
    assert f"tlrun launcher pid {first.pid}, node {node}" in second.stderr
    assert "--replace" in second.stderr
    assert "Traceback" not in second.stderr

    third = project.launch("--replace", "--grace", "10")
    new_node, _new_worker = ready(third)
    assert new_node == f"api{third.pid}@{HOST}"
    assert first.wait(20) == 0, "the replaced launcher stopped its worker gracefully"
    assert gone([first_worker])
    assert ping_replies(project.broker_url) == [new_node]
    assert f"--replace: asking launcher pid {first.pid} to stop" in third.output()


def test_sigkill_of_launcher_leaves_no_worker(project: Project) -> None:
    launched = project.launch("--concurrency=2")
    _, worker_pid = ready(launched)
    tree = worker_tree(worker_pid)
    launched.send(signal.SIGKILL)
    launched.wait(5)
    t0 = time.monotonic()
    wait_for(lambda: gone(tree), 3, "worker tree gone within 3 s of the launcher's SIGKILL")
    assert time.monotonic() - t0 < 3
    # The kernel dropped the lock with the launcher: the next launcher starts at once.
    again = project.launch()
    ready(again)


def test_app_that_does_not_import(project: Project) -> None:
    (project.root / "broken_app.py").write_text("import module_that_does_not_exist_xyz\n")
    result = project.run("worker", "-A", "broken_app", timeout=40)
    assert result.returncode == 4, result.stdout + result.stderr
    assert "app 'broken_app' does not import" in result.stderr
    assert "module_that_does_not_exist_xyz" in result.stderr
    assert "Traceback (most recent call last)" not in result.stderr

    result = project.run("worker", "-A", "no_such_module_at_all", timeout=40)
    assert result.returncode == 4
    assert "no_such_module_at_all" in result.stderr


def test_broker_down_fails_fast(project: Project) -> None:
    from helpers import free_port

    url = f"redis://:hunter22@127.0.0.1:{free_port()}/0"
    t0 = time.monotonic()
    result = project.run("worker", "-A", project.app, "-b", url, timeout=30)
    elapsed = time.monotonic() - t0
    assert result.returncode == 5
    assert "refused the connection" in result.stderr and ":***@127.0.0.1" in result.stderr
    assert "hunter22" not in result.stdout + result.stderr
    assert elapsed < 10


def test_password_never_appears(tmp_path: Path) -> None:
    secret = "s3cr3t-Pa55word"
    server = RedisServer(tmp_path / "redis-auth", password=secret)
    proj = Project(tmp_path / "projects", server.url())
    try:
        # The task prints the broker URL it sees: tlrun must mask it in the console and the log too.
        (proj.root / f"{proj.app}.py").write_text(
            (proj.root / f"{proj.app}.py").read_text()
            + "\nprint('broker is', os.environ['CELERY_BROKER_URL'], flush=True)\n"
        )
        launched = proj.launch()
        _, worker_pid = ready(launched)
        cmdlines = [" ".join(psutil.Process(pid).cmdline()) for pid in [*worker_tree(worker_pid), launched.pid]]
        assert all(secret not in line for line in cmdlines)
        launched.send(signal.SIGINT)
        launched.wait(20)
        out = launched.output()
        assert "broker is redis://:***@127.0.0.1" in out
        logs = "".join(p.read_text() for p in (proj.root / "logs").iterdir())
        assert "broker is redis://:***@" in logs
        assert secret not in out and secret not in logs
        bad = proj.run("worker", "-A", proj.app, "-b", f"redis://:{secret}x@127.0.0.1:{server.port}/0")
        assert bad.returncode == 5 and secret not in bad.stdout + bad.stderr
    finally:
        proj.cleanup()
        server.stop()


def test_launch_from_inside_a_worker_is_refused_and_stale_guard_is_not(project: Project) -> None:
    me = psutil.Process()
    # This test process is an ancestor of the tlrun it starts: tlrun is "inside" our launch.
    env = project.env(TL_CELERY_STARTED=f"{me.pid}:{me.create_time():.2f}")
    nested = project.run("worker", "-A", project.app, env=env, timeout=30)
    assert nested.returncode == 7
    assert "inside a worker launched by tlrun" in nested.stderr
    stop = project.run("stop", "-A", project.app, env=env, timeout=30)  # `tlrun stop` from a task's subprocess
    assert stop.returncode == 7 and "refusing to stop from inside a task" in stop.stderr, stop.stderr

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = project.launch(env=project.env(TL_CELERY_STARTED=f"{dead.pid}:12345.00"))
    ready(stale)
    assert f"stale TL_CELERY_STARTED (launcher pid {dead.pid} is gone): going on" in stale.output()


def test_symlink_at_lock_path_is_refused(project: Project, tmp_path: Path) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("do not touch")
    lock = lock_file(project)
    lock.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock.symlink_to(target)
    result = project.run("worker", "-A", project.app, timeout=30)
    assert result.returncode == 11
    assert "is a symlink" in result.stderr
    assert target.read_text() == "do not touch"


def test_worker_crash_is_reported_with_log_tail(project: Project) -> None:
    launched = project.launch("--pool", "solo")
    _, worker_pid = ready(launched)
    os.kill(worker_pid, signal.SIGKILL)
    status = launched.wait(20)
    assert status == 128 + signal.SIGKILL
    assert "exited on its own with status 137" in launched.output()
    assert "last lines of its log" in launched.output()


def test_python_m_tlrun_and_help_do_not_import_celery() -> None:
    code = "import sys; from tlrun.cli import cli; assert 'celery' not in sys.modules; print('ok')"
    assert subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=30).stdout.strip() == "ok"
    result = subprocess.run([PY, "-m", "tlrun", "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and "worker" in result.stdout


def test_malformed_dotenv_is_reported_with_file_and_line(project: Project) -> None:
    (project.root / ".env").write_text("CELERY_APP=x\nnot an assignment at all\n")
    result = project.run("worker", "-A", project.app, timeout=30)
    assert result.returncode == 3
    assert f"{project.root / '.env'}:2: malformed line" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_option_value_is_a_usage_error(project: Project) -> None:
    result = project.run("worker", "-A", project.app, "--concurrency=0", timeout=30)
    assert result.returncode == 2
    assert "--concurrency" in result.stderr and "Traceback" not in result.stderr


def test_second_interrupt_turns_warm_shutdown_cold(project: Project) -> None:
    from helpers import send_task

    launched = project.launch("--concurrency=1", "--grace", "60")
    ready(launched)
    send_task(project.broker_url, f"{project.app}.sleep", 60)
    launched.wait_output(r"Task \S+\.sleep\[\S+\] received", 20)
    launched.send(signal.SIGINT)
    launched.wait_output("warm shutdown: SIGTERM to worker", 10)
    with pytest.raises(subprocess.TimeoutExpired):
        launched.wait(1.5)  # a warm shutdown waits for the running task
    launched.send(signal.SIGINT)
    launched.wait_output("cold shutdown: SIGQUIT to worker", 10)
    launched.wait(15)
