"""Nothing left behind without Linux's parent-death signal (the lifeline alone, as on macOS), and tlrun as a
container's PID 1 (a fresh PID namespace, as root). Real processes, a real broker, real signals."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from helpers import PY, Launched, Project, RedisServer, client, close_clients, free_port, gone, send_task, wait_for
from tlrun.launch import _child, procs, spawn
from tlrun.launch.pid1 import Reaper
from tlrun.launch.supervise import requeue_margin

pytestmark = pytest.mark.timeout(120)
READY = r"tlrun: \d+ workers? ready: (\S+) \(pid (\d+)\)"
NO_PDEATHSIG = {"TLRUN_NO_PDEATHSIG": "1"}
# What macOS has, on Linux: no parent-death signal, no os.waitid (CPython < 3.13), no subreaper.
AS_ON_MACOS = {**NO_PDEATHSIG, "TLRUN_PORTABLE": "1"}
GRACE = 10.0

PDEATHSIG_TASK = """

@app.task
def pdeathsig():
    # The parent-death signal set on the process running this task (0: none).
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    sig = ctypes.c_int(0)
    libc.prctl(2, ctypes.byref(sig), 0, 0, 0)  # PR_GET_PDEATHSIG
    return sig.value
"""

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a PID namespace needs root")


def family(pid: int) -> list[int]:
    """A process, its descendants and the members of the group it leads."""
    pids = {pid}
    try:
        pids.update(c.pid for c in psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        pass
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pid:
                pids.add(proc.pid)
        except OSError:
            continue
    return sorted(pids)


def reaped(proc: psutil.Process) -> bool:
    """Gone from the process table: neither running nor a zombie (psutil checks the create time too)."""
    return not proc.is_running()


# -- units ---------------------------------------------------------------------------------------------------
def test_only_this_pythons_module_runs_in_place() -> None:
    assert _child.in_process_module([PY, "-m", "celery", "-A", "a", "worker"]) == "celery"
    assert _child.in_process_module([PY, "-m", "tlrun.launch.entry", "x"]) == "tlrun.launch.entry"
    assert _child.in_process_module(["/usr/bin/redis-server", "--port", "1"]) is None
    assert _child.in_process_module(["/other/python", "-m", "celery"]) is None  # another interpreter
    assert _child.in_process_module([PY, "-X", "dev", "-m", "celery"]) is None  # flags: a watchdog runs it
    assert _child.in_process_module([PY, "-m"]) is None


def test_a_child_behind_the_shim_is_still_recognised() -> None:
    inner = [PY, "-m", "celery", "-A", "proj", "worker", "-n", "api1@h", "-Q", "a,b"]
    shim = spawn.shim_argv(inner, spawn.Lifeline(), 30.0)
    assert shim[shim.index("--") + 1 :] == inner
    cmd = procs.parse_celery_argv(shim)
    assert cmd is not None and (cmd.app, cmd.subcommand, cmd.node) == ("proj", "worker", "api1@h")
    assert cmd.queues == frozenset({"a", "b"})
    assert procs.parse_celery_argv([PY, "-m", "tlrun.launch._child", "1", "3", "2", "--", "redis-server"]) is None


def test_the_backstop_is_off_when_asked() -> None:
    assert _child.set_pdeathsig({"TLRUN_NO_PDEATHSIG": "1"}) is False
    assert _child.set_pdeathsig({"TLRUN_PORTABLE": "1"}) is False


def test_the_watch_thread_fires_on_eof_and_only_then() -> None:
    read_fd, write_fd = os.pipe()
    fired = threading.Event()
    try:
        _child.watch(read_fd, os.getppid(), fired.set)
        assert not fired.wait(0.2)  # the write end is open: the "launcher" lives
        os.close(write_fd)
        assert fired.wait(5)
    finally:
        os.close(read_fd)


def test_the_watch_thread_fires_at_once_when_the_parent_is_not_the_launcher() -> None:
    read_fd, write_fd = os.pipe()
    fired = threading.Event()
    try:
        _child.watch(read_fd, os.getppid() + 100000, fired.set)  # our parent is not that "launcher"
        assert fired.wait(5)
    finally:
        os.close(read_fd)
        os.close(write_fd)


@pytest.mark.parametrize(
    ("grace", "version", "expected"),
    [
        (30.0, (5, 7, 0), 3.0),
        (6.0, (5, 5, 0), 3.0),
        (4.0, (5, 7, 0), 2.0),
        (2.9, (5, 7, 0), None),
        (30.0, (5, 4, 2), None),
    ],
)
def test_requeue_margin(grace: float, version: tuple[int, ...], expected: float | None) -> None:
    assert requeue_margin(grace, version) == expected


@pytest.mark.parametrize("portable", [False, True])
def test_the_reaper_reaps_orphans_and_never_a_known_child(monkeypatch: pytest.MonkeyPatch, portable: bool) -> None:
    if portable:  # macOS before Python 3.13: no os.waitid, the children's states instead
        monkeypatch.setenv("TLRUN_PORTABLE", "1")
    known = subprocess.Popen(["true"])
    orphan = subprocess.Popen(["true"])
    reaper = Reaper()
    try:
        wait_for(lambda: reaper.reap({known.pid}) and orphan.pid in dict(reaper.reaped), 5, "the other child reaped")
        assert known.wait(5) == 0  # still ours to wait for
    finally:
        known.wait(5)
        orphan.returncode = 0  # reaped by the Reaper: Popen must not wait for it again


# -- the lifeline alone, on the code paths macOS runs (TLRUN_NO_PDEATHSIG=1, TLRUN_PORTABLE=1) -----------
def test_launcher_sigkill_during_a_task_warm_shutdown_then_nothing_left(project: Project) -> None:
    launched = project.launch("--concurrency", "1", "--grace", f"{GRACE:g}", env=project.env(**AS_ON_MACOS))
    worker_pid = int(launched.wait_output(READY, 30).group(2))
    result = send_task(project.broker_url, f"{project.app}.sleep", 3)
    launched.wait_output(r"Task \S+\.sleep\[\S+\] received", 20)
    sleeper = send_task(project.broker_url, f"{project.app}.spawn_sleeper")  # queued behind the sleep
    tree = family(worker_pid)
    launched.send(signal.SIGKILL)
    launched.wait(5)
    killed_at = time.monotonic()
    assert result.get(timeout=20) == 3  # the warm shutdown let the running task finish
    wait_for(lambda: gone(tree), GRACE + 3, "worker, pool and group gone after the launcher's SIGKILL")
    assert time.monotonic() - killed_at < GRACE + 3
    assert sleeper.state == "PENDING"  # a warm shutdown takes nothing new
    log = (project.root / "logs" / f"celery_worker_{launched.pid}.log").read_text()
    # Its shutdown lines went to its log file, the console being gone with the launcher.
    assert "the launcher is gone: warm shutdown" in log
    assert "Warm shutdown" in log


def test_after_the_launcher_the_worker_logs_on_its_own_and_masks_the_password(tmp_path: Path) -> None:
    secret = "s3cret-lifeline-pw"
    server = RedisServer(tmp_path / "redis", password=secret)
    proj = Project(tmp_path / "projects", server.url())
    try:
        # The solo pool runs the task in the worker's main process, whose output the lifeline redirects.
        launched = proj.launch("--pool", "solo", "--grace", f"{GRACE:g}", env=proj.env(**AS_ON_MACOS))
        worker_pid = int(launched.wait_output(READY, 30).group(2))
        send_task(proj.broker_url, f"{proj.app}.echo_env", "CELERY_BROKER_URL", 1.5)
        launched.wait_output(r"Task \S+\.echo_env\[\S+\] received", 20)
        tree = family(worker_pid)
        launched.send(signal.SIGKILL)  # while the task sleeps: it prints after its launcher is gone
        launched.wait(5)
        wait_for(lambda: gone(tree), GRACE + 3, "the worker gone")
        log = (proj.root / "logs" / f"celery_worker_{launched.pid}.log").read_text()
        assert "ENV CELERY_BROKER_URL=redis://:***@127.0.0.1" in log, log
        assert secret not in log
    finally:
        proj.cleanup()
        close_clients()
        server.stop()


def test_a_tasks_subprocess_goes_with_the_worker(project: Project) -> None:
    launched = project.launch("--concurrency", "1", "--grace", f"{GRACE:g}", env=project.env(**AS_ON_MACOS))
    worker_pid = int(launched.wait_output(READY, 30).group(2))
    sleeper = send_task(project.broker_url, f"{project.app}.spawn_sleeper").get(timeout=20)
    assert psutil.Process(sleeper).name() == "sleep"
    tree = family(worker_pid)
    assert sleeper in tree  # in the worker's group (its parent, the pool child, is alive)
    launched.send(signal.SIGKILL)
    launched.wait(5)
    wait_for(lambda: gone([*tree, sleeper]), GRACE + 3, "worker and the task's `sleep 1000` gone")


def test_a_leftover_in_its_own_session_is_found_by_its_marker(project: Project) -> None:
    launched = project.launch("--concurrency", "1", env=project.env(**AS_ON_MACOS))
    worker_pid = int(launched.wait_output(READY, 30).group(2))
    sleeper = send_task(project.broker_url, f"{project.app}.spawn_sleeper", True).get(timeout=20)
    tree = [pid for pid in family(worker_pid) if pid != sleeper]
    launched.send(signal.SIGKILL)
    launched.wait(5)
    wait_for(lambda: gone(tree), GRACE + 3, "the worker gone")
    proc = psutil.Process(sleeper)
    # It left the worker's group (its own session): no group kill reaches it, only its marker tells.
    doctor = project.run("doctor", "-A", project.app, "--json")
    assert doctor.returncode != 0
    assert f"leftover process pid {sleeper} (sleep)" in doctor.stdout, doctor.stdout + doctor.stderr
    swept = project.run("sweep", "-A", project.app, "--grace", "2")
    assert swept.returncode == 0, swept.stdout + swept.stderr
    assert f"pid {sleeper}" in swept.stdout + swept.stderr
    wait_for(lambda: not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE, 10, "leftover stopped")


def test_idle_worker_beat_and_private_redis_gone_without_pdeathsig(tmp_path: Path) -> None:
    proj = Project(tmp_path / "projects", f"redis://:dev-pw@127.0.0.1:{free_port()}/0")
    (proj.root / f"{proj.app}.py").write_text((proj.root / f"{proj.app}.py").read_text() + PDEATHSIG_TASK)
    try:
        launched = proj.launch("--beat", "--pool", "solo", "--grace", "5", command="dev", env=proj.env(**AS_ON_MACOS))
        redis_pid = int(launched.wait_output(r"private redis-server \(pid (\d+)", 30).group(1))
        worker_pid = int(launched.wait_output(READY, 30).group(2))
        beat_pid = int(launched.wait_output(r"starting beat \(pid (\d+)\)", 10).group(1))
        # The solo pool runs the task in the worker's main process: the backstop is really off.
        assert send_task(proj.broker_url, f"{proj.app}.pdeathsig").get(timeout=20) == 0
        trees = family(worker_pid) + family(beat_pid) + family(redis_pid)
        launched.send(signal.SIGKILL)
        launched.wait(5)
        wait_for(lambda: gone(trees), 5 + 3, "worker, beat and the private redis-server gone")
    finally:
        proj.cleanup()


def blocked_signals(pid: int, tid: int) -> set[int]:
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            mask = int(line.split()[1], 16)
            return {n for n in range(1, 65) if mask & (1 << (n - 1))}
    return set()


def test_with_the_backstop_on_the_worker_has_pdeathsig(project: Project) -> None:
    (project.root / f"{project.app}.py").write_text((project.root / f"{project.app}.py").read_text() + PDEATHSIG_TASK)
    launched = project.launch("--pool", "solo")
    worker = int(launched.wait_output(READY, 30).group(2))
    # A Python child's backstop is the shim's own signal: its handler runs the lifeline's steps (an idle
    # worker goes at once), where SIGTERM would start Celery's warm shutdown first.
    assert send_task(project.broker_url, f"{project.app}.pdeathsig").get(timeout=20) == _child.PARENT_GONE_SIGNAL
    # The lifeline thread blocks every signal, so that the main thread (which runs Python's handlers) takes
    # them all: a signal taken by a helper thread would not interrupt the main thread's blocking calls.
    threads = {int(t.name): blocked_signals(worker, int(t.name)) for t in Path(f"/proc/{worker}/task").iterdir()}
    wanted = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGQUIT}
    assert not wanted & threads[worker]
    assert any(wanted <= blocked for tid, blocked in threads.items() if tid != worker)


FAKE_LAUNCHER = """
import os, subprocess, sys
r, w = os.pipe()
argv = [sys.executable, "-m", "tlrun.launch._child", str(os.getpid()), str(r), "2", "--", *sys.argv[1:]]
child = subprocess.Popen(argv, pass_fds=(r,), start_new_session=True)
print(child.pid, flush=True)
os._exit(0)  # Popen returned once the shim was exec'd: it is still starting Python, its thread not yet running
"""


@pytest.mark.parametrize("kind", ["python-module", "watchdog"])
def test_launcher_dead_before_the_lifeline_thread_runs(tmp_path: Path, kind: str) -> None:
    (tmp_path / "lingering.py").write_text("import time\ntime.sleep(1000)\n")
    argv = [PY, "-m", "lingering"] if kind == "python-module" else ["sleep", "1000"]
    env = {**os.environ, **AS_ON_MACOS, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [PY, "-c", FAKE_LAUNCHER, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
    )
    shim = int(out.stdout)
    try:
        wait_for(lambda: gone(family(shim)), 5, "the shim and its group gone")
    finally:
        for pid in family(shim):
            try:
                if os.getpgid(pid) == shim:
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


# -- PID 1 ------------------------------------------------------------------------------------------------------
def pid1_launch(project: Project, *args: str) -> tuple[Launched, psutil.Process]:
    """tlrun worker as PID 1 of a fresh PID namespace; returns it and tlrun's process (host view)."""
    argv = ["unshare", "--pid", "--fork", "--mount-proc", *project.tlrun_argv("worker", *args)]
    launched = Launched(argv, project.root, project.env(**NO_PDEATHSIG), project.base / "pid1-out.txt")
    project.started.append(launched)
    tlrun = wait_for(lambda: next(iter(psutil.Process(launched.pid).children()), None), 10, "tlrun as PID 1")
    return launched, tlrun


@needs_root
def test_as_pid1_sigterm_stops_the_worker_warm_and_exits_0(project: Project) -> None:
    launched, tlrun = pid1_launch(project, "--concurrency", "1")
    launched.wait_output(READY, 30)
    result = send_task(project.broker_url, f"{project.app}.sleep", 2)
    launched.wait_output(r"Task \S+\.sleep\[\S+\] received", 20)
    tlrun.send_signal(signal.SIGTERM)  # what `docker stop` does
    assert result.get(timeout=20) == 2
    assert launched.wait(30) == 0
    out = launched.output()
    assert "warm shutdown: SIGTERM to worker" in out
    assert "output on stdout" in out and "succeeded in" in out  # the worker's lines: on stdout
    assert not (project.root / "logs").exists()  # and no log file anywhere


@needs_root
def test_as_pid1_orphaned_pool_children_are_reaped_and_the_status_is_the_workers(project: Project) -> None:
    launched, tlrun = pid1_launch(project, "--concurrency", "2")
    launched.wait_output(READY, 30)
    worker = wait_for(lambda: next(iter(tlrun.children()), None), 5, "worker")
    pool = wait_for(lambda: worker.children() if len(worker.children()) == 2 else None, 10, "2 pool children")
    worker.send_signal(signal.SIGKILL)  # the OOM killer's way: the pool children are orphaned to PID 1
    assert launched.wait(30) == 128 + signal.SIGKILL
    assert "reaped 2 orphaned process(es) re-parented to tlrun" in launched.output()
    assert all(reaped(p) for p in pool)


@needs_root
@pytest.mark.parametrize("mode", ["pid1", "init"])
def test_a_grandchild_that_outlives_its_task_leaves_no_zombie(project: Project, mode: str) -> None:
    if mode == "pid1":
        launched, tlrun = pid1_launch(project, "--concurrency", "1")
    else:
        launched = project.launch("--concurrency", "1", "--init", env=project.env(**NO_PDEATHSIG))
        tlrun = psutil.Process(launched.pid)
    launched.wait_output(READY, 30)
    send_task(project.broker_url, f"{project.app}.orphan_grandchild", 1).get(timeout=20)
    # Its shell exited at once: the `sleep 1` now belongs to tlrun (PID 1, or a subreaper with --init).
    grandchild = wait_for(
        lambda: next((c for c in tlrun.children() if c.name() == "sleep"), None), 5, "the sleep re-parented to tlrun"
    )
    wait_for(lambda: reaped(grandchild), 10, "the grandchild reaped after it exits (no zombie)")
    assert not [c for c in tlrun.children() if c.status() == psutil.STATUS_ZOMBIE]
    tlrun.send_signal(signal.SIGTERM)
    assert launched.wait(30) == 0


# -- the end of the grace: Celery 5.5+ requeues what cannot finish ----------------------------------------
@pytest.mark.matrix
def test_a_task_still_running_near_the_deadline_goes_back_to_the_queue(project: Project) -> None:
    launched = project.launch("--concurrency", "1", "--grace", "6")
    launched.wait_output(READY, 30)
    result = send_task(project.broker_url, f"{project.app}.sleep", 30)
    launched.wait_output(r"Task \S+\.sleep\[\S+\] received", 20)
    launched.send(signal.SIGTERM)
    assert launched.wait(20) == 0
    out = launched.output()
    assert "still stopping 3 s before the deadline" in out
    assert "1 task(s) still running near the deadline: cold shutdown (SIGQUIT)" in out
    assert "grace period over" not in out  # Celery's cold shutdown ended it before the SIGKILL
    # The cancelled task (late ack) is back in the queue: the next worker receives it again.
    again = project.launch("--concurrency", "1", "--grace", "6")
    again.wait_output(rf"Task \S+\.sleep\[{result.id}\] received", 30)
    again.send(signal.SIGTERM)
    assert again.wait(20) == 0


def test_init_writes_no_log_file_and_needs_no_writable_project(project: Project) -> None:
    """`--init` (docker run --init, compose `init: true`) means what PID 1 means: output on stdout, no log
    file unless a log directory is set. The example image's /app is root's while the worker runs as `app`:
    here the project directory is made read-only (a read-only bind mount of itself: root ignores modes)."""
    import subprocess

    root = str(project.root)
    if os.geteuid() == 0:
        if subprocess.run(["mount", "--bind", "-o", "ro", root, root], timeout=30).returncode != 0:
            pytest.skip("cannot bind-mount the project directory read-only here")
    else:
        os.chmod(root, 0o555)
    try:
        assert not os.access(root, os.W_OK) or os.geteuid() == 0
        launched = project.launch("--init")
        launched.wait_output(READY, 30)
        assert "output on stdout" in launched.output()
        launched.send(signal.SIGTERM)
        assert launched.wait(30) == 0, launched.output()
        assert not (project.root / "logs").exists()
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", root], timeout=30)
        else:
            os.chmod(root, 0o755)


@needs_root
def test_pid1_replicas_started_together_never_share_a_node_name(project: Project) -> None:
    """Two containers with one host name (host networking, `hostname:` with --scale), each running tlrun worker
    as PID 1, started at the same instant: as PID 1 the pid says nothing, so the node name carries a random
    9-digit number instead. 10 rounds: distinct names, one ping reply each."""
    from helpers import ping_replies

    replica = project.other_project("replica")  # its own checkout (as another container's filesystem)
    for round_ in range(10):
        started = []
        for proj in (project, replica):
            tlrun = " ".join(shlex.quote(a) for a in proj.tlrun_argv("worker", "--pool", "solo"))
            argv = [
                "unshare",
                "--pid",
                "--fork",
                "--mount-proc",
                "--uts",
                "sh",
                "-c",
                f"hostname rhost && exec {tlrun}",
            ]
            launched = Launched(
                argv, proj.root, proj.env(**NO_PDEATHSIG), proj.base / f"replica-{round_}-{len(started)}.txt"
            )
            project.started.append(launched)  # the fixture's teardown reaps both replicas' launchers
            started.append(launched)
        nodes = [launched.wait_output(READY, 30).group(1) for launched in started]
        assert len(set(nodes)) == 2 and all(re.match(r"^api\d{9}@rhost$", n) for n in nodes), nodes
        assert sorted(ping_replies(project.broker_url)) == sorted(nodes)  # one reply each
        for launched in started:
            tlrun_proc = wait_for(
                lambda run=launched: next(iter(psutil.Process(run.pid).children()), None), 10, "tlrun"
            )
            tlrun_proc.send_signal(signal.SIGTERM)
        for launched in started:
            assert launched.wait(30) == 0, launched.output()


# -- a killed launcher's idle worker goes at once; one that holds a task stops warm ------------------------
def _orphaned_log(project: Project, launched: Launched, worker_pid: int) -> str:
    """SIGKILL the launcher, wait until its worker's tree is gone, and return the worker's log."""
    tree = family(worker_pid)
    launched.send(signal.SIGKILL)
    launched.wait(5)
    wait_for(lambda: gone(tree), GRACE + 3, "the worker's tree gone")
    return (project.root / "logs" / f"celery_worker_{launched.pid}.log").read_text()


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_an_idle_worker_goes_at_once_after_its_launcher_is_killed(project: Project, pool: str) -> None:
    launched = project.launch("--pool", pool, "-c", "2", "--grace", f"{GRACE:g}", env=project.env(**AS_ON_MACOS))
    worker_pid = int(launched.wait_output(READY, 30).group(2))
    assert send_task(project.broker_url, f"{project.app}.add", 2, 3).get(timeout=20) == 5
    log = _orphaned_log(project, launched, worker_pid)
    assert "holds no task: stopping at once" in log, log[-2000:]
    assert "warm shutdown" not in log
    # It stopped consuming before it went: a task sent now waits in the queue for the next worker.
    later = send_task(project.broker_url, f"{project.app}.add", 1, 1)
    relaunched = project.launch("--pool", pool, "-c", "2", env=project.env(**AS_ON_MACOS))
    relaunched.wait_output(READY, 30)
    assert later.get(timeout=20) == 2
    relaunched.reap()


def test_a_worker_holding_an_eta_task_stops_warm_and_gives_it_back(project: Project) -> None:
    launched = project.launch("-c", "1", "--grace", f"{GRACE:g}", env=project.env(**AS_ON_MACOS))
    worker_pid = int(launched.wait_output(READY, 30).group(2))
    scheduled = client(project.broker_url).send_task(f"{project.app}.add", (20, 22), countdown=8)
    launched.wait_output(r"Task \S+\.add\[\S+\] received", 20)  # held in the worker's timer, not running
    log = _orphaned_log(project, launched, worker_pid)
    assert "the launcher is gone: warm shutdown" in log and "stopping at once" not in log, log[-2000:]
    # The warm shutdown gave its message back: the next worker runs it at its ETA.
    relaunched = project.launch("-c", "1", env=project.env(**AS_ON_MACOS))
    relaunched.wait_output(READY, 30)
    assert scheduled.get(timeout=30) == 42
    relaunched.reap()


def test_on_amqp_an_idle_worker_goes_at_once_and_a_queued_task_waits(tmp_path: Path, amqp_vhost: str) -> None:
    proj = Project(tmp_path / "projects", amqp_vhost)
    try:
        launched = proj.launch("-c", "2", "--grace", f"{GRACE:g}", env=proj.env(**AS_ON_MACOS))
        log = _orphaned_log(proj, launched, int(launched.wait_output(READY, 30).group(2)))
        assert "holds no task: stopping at once" in log, log[-2000:]
        queued = send_task(proj.broker_url, f"{proj.app}.add", 2, 2)
        relaunched = proj.launch("-c", "1", env=proj.env(**AS_ON_MACOS))
        relaunched.wait_output(READY, 30)
        assert queued.get(timeout=20) == 4
    finally:
        proj.cleanup()
        close_clients()
