"""What an audit with real processes broke, and now holds: a closed console, two launchers of one project,
planted symlinks, destructive steps before validation, leaked passwords, non-numbers, huge .env files."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from helpers import (
    Project,
    RedisServer,
    free_port,
    ping_replies,
    processes_under,
    send_task,
    throwaway_user,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)
HOST = socket.gethostname()


def test_a_closed_console_never_stalls_the_worker(project: Project) -> None:
    """`tlrun worker | head -5`: the console goes away; the worker keeps taking tasks that print a lot."""
    proc = subprocess.Popen(
        project.tlrun_argv("worker", "--concurrency", "1"),
        cwd=project.root,
        env=project.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        wait_for(lambda: b"worker ready" in proc.stdout.readline(), 40, "the verdict on the console")  # type: ignore[union-attr]
        proc.stdout.close()  # the reader goes away, as `head -5` does
        results = [send_task(project.broker_url, f"{project.app}.shout", 1500) for _ in range(4)]
        assert [r.get(timeout=60) for r in results] == [1500] * 4  # 4 x ~140 KB of output, all drained
        log = project.root / "logs" / f"celery_worker_{proc.pid}.log"
        wait_for(lambda: log.read_text().count("shout line 1499 ") == 4, 20, "every line in the log file")
        assert "tlrun: console output stopped" in log.read_text()
        health = project.run("health", "-A", project.app)
        assert health.returncode == 0, health.stdout + health.stderr
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


READY = r"(\d+) workers? ready: (\S+) \(pid (\d+)\)"


def test_one_launcher_per_project_whatever_the_environment(project: Project, tmp_path: Path) -> None:
    """Another XDG_RUNTIME_DIR and HOME, then a lock file removed by hand: still one launcher."""
    first = project.launch()
    first.wait_output(READY, 40)
    other_home = tmp_path / "home2"
    (other_home / "run").mkdir(parents=True, mode=0o700)
    env = project.env(HOME=str(other_home), XDG_RUNTIME_DIR=str(other_home / "run"), XDG_CACHE_HOME=str(other_home))
    second = project.run("worker", "-A", project.app, env=env, timeout=60)
    assert second.returncode == 6, second.stdout + second.stderr
    assert f"under tlrun launcher pid {first.pid}" in second.stderr
    # Remove the lock file under the running launcher: the process table still says who runs the project.
    project.lock_file().unlink()
    third = project.run("worker", "-A", project.app, timeout=60)
    assert third.returncode == 6, third.stdout + third.stderr
    assert f"under tlrun launcher pid {first.pid} (found in the process table)" in third.stderr
    assert len(ping_replies(project.broker_url)) == 1


def test_a_lock_file_replaced_under_a_waiter_is_not_taken(project: Project) -> None:
    """A lock only counts while its path names the locked file: release removes it, and a launcher that
    had opened the old file tries the path again."""
    from tlrun.launch.guard import ProjectLock

    path = project.lock_file()
    held = ProjectLock.try_acquire(path)
    assert held is not None and held.still_held()
    path.unlink()  # removed under the holder
    assert not held.still_held()
    again = ProjectLock.try_acquire(path)  # a new file at the path: a new lock
    assert again is not None and again.still_held()
    again.release()
    assert not path.exists()  # release removes the file it holds
    held.release()


def _fake_launcher(project: Project) -> subprocess.Popen[bytes]:
    """A process whose command line is a tlrun launcher's (`python bin/tlrun worker -A app`): two of these
    are what two launchers of one project look like in the process table."""
    script = project.root / "bin" / "tlrun"
    script.parent.mkdir(exist_ok=True)
    script.write_text("import time\ntime.sleep(120)\n")
    return subprocess.Popen(
        [sys.executable, str(script), "worker", "-A", project.app], cwd=project.root, start_new_session=True
    )


def test_doctor_reports_two_launchers_and_never_takes_a_lock(project: Project) -> None:
    fakes = [_fake_launcher(project) for _ in range(2)]
    try:
        # A process between fork and exec has an empty command line: not yet, rather than an IndexError.
        wait_for(lambda: all((psutil.Process(f.pid).cmdline() or [""])[-1] == project.app for f in fakes), 10, "fakes")
        doctor = subprocess.run(
            [
                "strace",
                "-f",
                "-qq",
                "-e",
                "trace=flock,openat",
                "-o",
                str(project.base / "strace.txt"),
                *project.tlrun_argv("doctor"),
                "--json",
            ],
            cwd=project.root,
            env=project.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        findings = {f["code"]: f for f in json.loads(doctor.stdout)["findings"]}
        assert findings["TWO_LAUNCHERS"]["severity"] == "error" and doctor.returncode == 9
        assert f"{fakes[0].pid}" in findings["TWO_LAUNCHERS"]["message"]
        # Probing never locks: a launcher starting at that moment can never be refused because of doctor.
        traced = (project.base / "strace.txt").read_text()
        assert "flock(" not in traced
        # One read of the process table serves the whole diagnosis (the workers and the launchers above):
        # each of this test's processes is read once. Other Celery processes on a busy machine (not this
        # test's) may be looked at again when doctor describes them: they are not counted.
        read = re.findall(r'openat\(.*"/proc/(\d+)/cmdline"', traced)
        assert all(read.count(str(fake.pid)) == 1 for fake in fakes), [read.count(str(f.pid)) for f in fakes]
        # And a real launcher refuses to start beside them.
        refused = project.run("worker", "-A", project.app, timeout=60)
        assert refused.returncode == 6 and "found in the process table" in refused.stderr
    finally:
        for fake in fakes:
            fake.kill()
            fake.wait(10)


@pytest.fixture
def other_user() -> Iterator[pwd.struct_passwd]:
    """A throwaway unprivileged user (removed afterwards), for what another local user can do."""
    with throwaway_user() as user:
        yield user


def _as(user: pwd.struct_passwd, *argv: str) -> None:
    subprocess.run(list(argv), user=user.pw_uid, group=user.pw_gid, check=True, timeout=10)


def _stopped_launcher(project: Project, *args: str) -> subprocess.Popen[bytes]:
    """A launcher that stops itself before exec, so that its pid (and so its log file's name) is known first."""
    argv = project.tlrun_argv("worker", *args)
    boot = f"import os, signal, sys; os.kill(os.getpid(), signal.SIGSTOP); os.execv(sys.executable, {argv!r})"
    proc = subprocess.Popen(
        [sys.executable, "-c", boot],
        cwd=project.root,
        env=project.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_for(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_STOPPED, 10, "the launcher to stop itself")
    return proc


def test_log_files_never_follow_a_planted_symlink(project: Project, other_user: pwd.struct_passwd) -> None:
    victim = project.base / "victim.txt"
    victim.write_text("root's file\n")
    # Like /tmp: anyone may create files, nobody may replace another's. Outside pytest's private tmp_path,
    # so that the other user can reach it.
    shared = Path(tempfile.mkdtemp(prefix="tlrun-shared-logs-"))
    shared.chmod(0o1777)
    proc = _stopped_launcher(project, "--log-dir", str(shared))
    try:
        _as(other_user, "ln", "-s", str(victim), str(shared / f"celery_worker_{proc.pid}.log"))
        proc.send_signal(signal.SIGCONT)
        out = proc.communicate(timeout=60)[0].decode()
        assert proc.returncode == 12, out
        # The sticky bit stops others replacing tlrun's files, not planting the next names: refused outright.
        assert "is writable by every user (mode 1777)" in out and "refusing it" in out, out
        assert victim.read_text() == "root's file\n"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)
        shutil.rmtree(shared, ignore_errors=True)
    # A link owned by the launcher's own user, which the kernel's protected_symlinks lets through (and macOS
    # has no such protection at all): O_NOFOLLOW alone refuses it.
    proc = _stopped_launcher(project)
    (project.root / "logs").mkdir(exist_ok=True)
    (project.root / "logs" / f"celery_worker_{proc.pid}.log").symlink_to(victim)
    proc.send_signal(signal.SIGCONT)
    out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 12 and f"celery_worker_{proc.pid}.log is a symlink" in out, out
    assert victim.read_text() == "root's file\n"


@pytest.mark.parametrize("kind", ["world-writable", "owned by another user"])
def test_an_unsafe_log_directory_is_refused(project: Project, other_user: pwd.struct_passwd, kind: str) -> None:
    logs = project.base / "unsafe-logs"
    logs.mkdir()
    if kind == "world-writable":
        logs.chmod(0o777)
    else:
        os.chown(logs, other_user.pw_uid, other_user.pw_gid)
    result = project.run("worker", "-A", project.app, "--log-dir", str(logs), timeout=60)
    assert result.returncode == 12, result.stdout + result.stderr
    assert "refusing it" in result.stderr and "Traceback" not in result.stderr


def test_a_symlink_in_the_middle_of_the_log_path_is_refused(project: Project, other_user: pwd.struct_passwd) -> None:
    """A folder another user owns (their project, run by root) holds `shared -> <root's directory>`; the log
    directory `shared/logs` then lands in root's directory, and its prune among root's files. Refused (exit 12)
    before anything is written; the victim is untouched."""
    theirs = project.base / "their-project"
    theirs.mkdir()
    victim = project.base / "roots-files"
    (victim / "logs").mkdir(parents=True)
    old = [victim / "logs" / f"celery_worker_{n}.log" for n in range(1, 13)]  # more than the prune keeps
    for path in old:
        path.write_text("root's own\n")
    os.chown(theirs, other_user.pw_uid, other_user.pw_gid)
    (theirs / "shared").symlink_to(victim)  # as they would make it (the test's folders are root's: 0700)
    os.lchown(theirs / "shared", other_user.pw_uid, other_user.pw_gid)
    result = project.run("worker", "-A", project.app, "--log-dir", str(theirs / "shared" / "logs"), timeout=60)
    assert result.returncode == 12, result.stdout + result.stderr
    assert "is a symlink another user could have planted" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in (victim / "logs").iterdir()) == sorted(p.name for p in old)  # nothing written
    assert all(p.read_text() == "root's own\n" for p in old)  # nothing pruned
    # The same link made by this user in a folder of its own is followed as before.
    from tlrun.launch.logfiles import check_log_dir

    mine = project.base / "my-link"
    mine.symlink_to(victim)
    check_log_dir(mine / "logs")


def test_a_fifo_at_the_log_name_is_refused_at_once_and_logs_never_blocks(project: Project) -> None:
    """A FIFO where tlrun writes or reads a log would block open() forever (and ignore Ctrl-C there)."""
    proc = _stopped_launcher(project)
    logs = project.root / "logs"
    logs.mkdir(exist_ok=True)
    os.mkfifo(logs / f"celery_worker_{proc.pid}.log")
    proc.send_signal(signal.SIGCONT)
    out = proc.communicate(timeout=30)[0].decode()  # a blocked open() would time out here
    assert proc.returncode == 12 and "is not a regular file of yours" in out, out
    assert not [p for p in processes_under(project.base) if p.pid != os.getpid()]
    # `tlrun logs` (and -f) skip a FIFO named like a log instead of blocking on it.
    result = project.run("logs", "-A", project.app, timeout=20)
    assert result.returncode == 0 and "no log files" in result.stdout, result.stdout + result.stderr
    named = project.run("logs", "-A", project.app, f"celery_worker_{proc.pid}.log", "-f", timeout=20)
    assert named.returncode == 12 and "no log file named" in named.stderr, named.stdout + named.stderr


def test_doctor_textfile_never_replaces_what_is_not_a_regular_file(project: Project) -> None:
    import stat

    target = project.base / "metrics.prom"
    os.mkfifo(target)  # a special file of our own (a device node would do the same: never replaced)
    result = project.run("doctor", "-A", project.app, "--textfile", str(target), timeout=30)
    assert result.returncode == 2 and "exists and is not a regular file" in result.stderr, result.stderr
    assert result.stdout == "" and stat.S_ISFIFO(os.lstat(target).st_mode)


def test_prune_never_touches_another_users_files(project: Project, other_user: pwd.struct_passwd) -> None:
    logs = project.root / "logs"
    logs.mkdir()
    theirs = []
    for pid in range(100, 115):  # more launches than tlrun keeps, all older than ours, named like tlrun's
        path = logs / f"celery_worker_{pid}.log"
        path.write_text("theirs\n")
        os.chown(path, other_user.pw_uid, other_user.pw_gid)
        os.utime(path, (1_000_000, 1_000_000))
        theirs.append(path)
    launched = project.launch("--concurrency", "1")
    launched.wait_output(r"worker ready", 60)
    launched.send(signal.SIGINT)
    assert launched.wait(30) == 0
    assert all(p.exists() for p in theirs)


def test_ide_files_never_follow_a_planted_symlink(project: Project) -> None:
    victim = project.base / "victim.json"
    victim.write_text("{}\n")
    vscode = project.root / ".vscode"
    vscode.mkdir()
    (vscode / "launch.json.tmp").symlink_to(victim)  # the old fixed temporary name
    result = project.run("ide", "vscode", "-A", project.app)
    assert result.returncode == 0, result.stderr
    assert victim.read_text() == "{}\n" and "tlrun dev" in (vscode / "launch.json").read_text()
    (vscode / "launch.json").unlink()
    (vscode / "launch.json").symlink_to(victim)
    linked = project.run("ide", "vscode", "-A", project.app, "--force")
    assert linked.returncode == 3 and "a symlink is never followed" in linked.stderr
    assert victim.read_text() == "{}\n"


@pytest.mark.parametrize(
    ("bad", "code"),
    [(["-b", "redis://127.0.0.1:{free}/0"], 5), (["--log-dir", "not-a-dir/logs"], 12), (["-A", "no_such_mod"], 4)],
)
def test_nothing_is_stopped_before_everything_is_validated(project: Project, bad: list[str], code: int) -> None:
    """--replace with a dead broker, a bad log directory or a missing app: the healthy launcher and a stray
    both survive."""
    (project.root / "not-a-dir").write_text("a file\n")
    healthy = project.launch()
    healthy.wait_output(READY, 40)
    other = project.other_project("stray-home")  # a stray of the *same* project needs the project's directory
    stray = project.hand_worker(f"stray@{HOST}")
    stray.wait_output("ready", 30)
    args = [a.replace("{free}", str(free_port())) for a in bad]
    if "-A" not in args:
        args = ["-A", project.app, *args]
    result = project.run("worker", *args, "--replace", timeout=60)
    assert result.returncode == code, result.stdout + result.stderr
    assert healthy.proc.poll() is None and stray.proc.poll() is None
    assert "stopping stray" not in result.stdout and "--replace: asking" not in result.stdout
    other.cleanup()


@pytest.mark.parametrize(
    "form",
    [
        "redis://:{pw}@127.0.0.1:{port}/0",
        "redis://127.0.0.1:{port}/0?password={pw}",
        "redis://{pw}@127.0.0.1:{port}/0",
    ],
)
@pytest.mark.parametrize("secret", ["wr0ng#pw/x?y", "wr0ngplain"])
def test_no_form_of_a_password_is_ever_printed(tmp_path: Path, form: str, secret: str) -> None:
    server = RedisServer(tmp_path / "redis", password="the-right-one")
    proj = Project(tmp_path / "projects", form.format(pw=secret, port=server.port))
    try:
        for command in (["worker"], ["doctor", "--json"], ["health", "--node", "x@y", "--timeout", "0.5"]):
            via_env = proj.run(*command, "-A", proj.app, timeout=60)
            via_flag = proj.run(*command, "-A", proj.app, "-b", proj.broker_url, env=proj.env(), timeout=60)
            for result in (via_env, via_flag):
                printed = result.stdout + result.stderr
                assert result.returncode != 0 and "Traceback" not in printed, printed
                assert secret not in printed and secret.split("#")[0] not in printed, printed
    finally:
        proj.cleanup()
        server.stop()


def test_stop_catches_a_launcher_that_is_still_starting(project: Project) -> None:
    """Before a launcher holds its lock (here: importing a slow app to read its broker), `tlrun stop` still
    finds it in the process table and stops it, instead of saying nothing runs."""
    flag = project.base / "importing"
    source = f"""
import pathlib, time
pathlib.Path({str(flag)!r}).write_text("")
time.sleep(4)
from celery import Celery
app = Celery("slow", broker={project.broker_url!r})
"""
    (project.root / f"{project.app}.py").write_text(source)
    env = project.env()
    env.pop("CELERY_BROKER_URL")
    launched = project.launch(env=env)
    wait_for(flag.exists, 20, "the launcher to import the app (to read its broker), before its lock")
    stop = project.run("stop", "-A", project.app, env=env)
    assert stop.returncode == 0 and f"stopped launcher pid {launched.pid}" in stop.stdout, stop.stdout + stop.stderr
    assert launched.wait(30) == 128 + signal.SIGTERM
    assert "ready" not in launched.output()


def test_a_stop_signal_never_speaks_from_inside_the_launchers_own_output(tmp_path: Path) -> None:
    """A signal handler runs between any two bytecodes of the main thread, which may be writing to the very
    stream the handler would write to (a reentrant write raises RuntimeError) or holding the password
    masking's lock (a deadlock). So the handler only acts (signals the children); its words wait for the
    main loop. Here the second stop signal arrives while the launcher is saying what the first one did."""
    from tlrun.launch.supervise import Supervisor

    said: list[str] = []
    inside = False
    reentered = False

    def on_step(message: str) -> None:
        nonlocal inside, reentered
        reentered = reentered or inside
        inside = True
        try:
            said.append(message)
            if len(said) == 1:
                signal.raise_signal(signal.SIGTERM)  # runs the handler now, inside this call
        finally:
            inside = False

    def sigmask(pid: int, field: str) -> int:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field + ":")), 16)

    def both_ready(shim: int) -> bool:
        """The shim forwards SIGTERM (it caught it) to a child that ignores it: both stay for the second."""
        term = 1 << (signal.SIGTERM - 1)
        try:
            kids = psutil.Process(shim).children()
            return bool(sigmask(shim, "SigCgt") & term) and any(sigmask(k.pid, "SigIgn") & term for k in kids)
        except (OSError, psutil.Error):
            return False

    stays = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    with Supervisor(5.0, on_step) as sup:
        child = sup.start("worker", [sys.executable, "-c", stays], dict(os.environ), tmp_path)
        try:
            wait_for(lambda: both_ready(child.pid), 10, "the child behind its shim, ignoring SIGTERM")
            signal.raise_signal(signal.SIGINT)  # the first stop: SIGTERM to the child, words queued
            assert said == []
            sup.flush_steps()
            assert not reentered
            assert [m.split(":")[0] for m in said] == ["warm shutdown", "cold shutdown"]
        finally:
            sup.kill("worker")
            if child.stdout is not None:
                child.stdout.close()
    assert child.poll() is not None


# -- a local broker run by another user ------------------------------------------------------------------------
def test_listener_owners_are_read_from_proc_net(tmp_path: Path) -> None:
    from tlrun.launch import owner

    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    (tmp_path / "tcp").write_text(
        header
        + "   0: 0100007F:18EB 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1001        0 1 1\n"
        + "   1: 0100007F:18EB 0100007F:9C40 01 00000000:00000000 00:00000000 00000000  1002        0 2 1\n"
        + "   2: 00000000:1538 00000000:0000 0A 00000000:00000000 00:00000000 00000000   107        0 3 1\n"
    )
    (tmp_path / "tcp6").write_text(header)
    assert owner.listener_uids(0x18EB, tmp_path) == {1001}  # the established connection does not count
    assert owner.foreign_listener("redis://127.0.0.1:6379/0", tmp_path) == 1001
    assert owner.foreign_listener("amqp://guest:guest@localhost:5432//", tmp_path) is None  # uid 107: a service
    assert owner.foreign_listener("redis://10.0.0.5:6379/0", tmp_path) is None  # not this host's loopback


def test_a_broker_run_by_another_user_is_a_warning_and_a_doctor_finding(
    project: Project, other_user: pwd.struct_passwd
) -> None:
    if not Path("/proc/net/tcp").exists():
        pytest.skip("no /proc/net/tcp")
    port = free_port()
    theirs = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            "/tmp",
        ],
        user=other_user.pw_uid,
        group=other_user.pw_gid,
        cwd="/tmp",
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        url = f"redis://127.0.0.1:{port}/0"
        from tlrun.launch import owner

        wait_for(lambda: owner.listener_uids(port) == {other_user.pw_uid}, 10, "their redis-server to listen")
        env = project.env(CELERY_BROKER_URL=url, TEST_RESULT_BACKEND=url)
        launched = project.launch(env=env)
        launched.wait_output(r"worker ready", 60)
        assert f"is run by {other_user.pw_name}, another local user" in launched.output()
        doctor = project.run("doctor", "-A", project.app, "--json", env=env)
        codes = [f["code"] for f in json.loads(doctor.stdout)["findings"]]
        assert "FOREIGN_BROKER" in codes, doctor.stdout
        launched.send(signal.SIGINT)
        assert launched.wait(30) == 0
    finally:
        theirs.terminate()
        theirs.wait(10)


def test_a_renamed_project_directory_is_still_one_project(project: Project) -> None:
    """Started with --project-dir from elsewhere, then the directory is renamed: a second launcher in the new
    path is refused (it is the same directory), and `tlrun stop` there stops the first one."""
    from helpers import PY, Launched

    old = project.root
    argv = [PY, "-m", "tlrun", "worker", "-A", project.app, "--project-dir", str(old), "--", "--without-mingle"]
    first = Launched(argv, project.base, project.env(), project.base / "first.out")
    project.started.append(first)
    first.wait_output(r"worker ready", 60)
    new = project.base / "renamed"
    old.rename(new)
    try:
        second = project.run("worker", "-A", project.app, "--project-dir", str(new), cwd=project.base, timeout=60)
        assert second.returncode == 6 and "renamed or moved since" in second.stderr, second.stderr
        stop = project.run("stop", "-A", project.app, "--project-dir", str(new), cwd=project.base, timeout=60)
        assert stop.returncode == 0 and f"stopped launcher pid {first.pid}" in stop.stdout, stop.stdout + stop.stderr
        assert first.wait(30) == 0
    finally:
        new.rename(old)


# -- tlrun's state directories do not grow --------------------------------------------------------------
def test_stale_lock_files_and_old_schedules_are_pruned_and_live_ones_kept(tmp_path: Path) -> None:
    import time

    from tlrun.launch import guard, tidy

    lock_dir = guard.lock_dir()
    stale = lock_dir / f"{'a' * 16}.testhost.worker.lock"
    stale.write_text('{"pid": 999999999}')  # what a SIGKILLed launcher leaves
    held_path = lock_dir / f"{'b' * 16}.testhost.beat.lock"
    held = guard.ProjectLock.try_acquire(held_path)
    assert held is not None
    foreign = lock_dir / "notes.txt"  # not named as tlrun names its locks: never touched
    foreign.write_text("mine")
    try:
        removed = tidy.stale_locks(lock_dir)
        assert stale in removed and not stale.exists()
        assert held_path.exists() and held.still_held() and foreign.exists()
    finally:
        held.release()
        foreign.unlink()
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    old = runtime / f"{'c' * 16}.celerybeat-schedule"
    recent = runtime / f"{'d' * 16}.celerybeat-schedule"
    other = runtime / "redis-x.conf"
    for path in (old, recent, other):
        path.write_text("x")
    month_ago = time.time() - tidy.SCHEDULE_MAX_AGE - 60
    os.utime(old, (month_ago, month_ago))
    os.utime(other, (month_ago, month_ago))
    assert tidy.old_schedules(runtime) == [old]
    assert not old.exists() and recent.exists() and other.exists()
    # Broker records: of a project that stopped a day ago, removed; of a running one, or a recent one, kept.
    gone, running, fresh = (lock_dir / f"{c * 16}.broker.json" for c in "ef0")
    running_lock = guard.ProjectLock.try_acquire(lock_dir / f"{'f' * 16}.testhost.worker.lock")
    assert running_lock is not None
    try:
        for path in (gone, running, fresh):
            path.write_text("{}")
        day_ago = time.time() - tidy.RECORD_MAX_AGE - 60
        for path in (gone, running):
            os.utime(path, (day_ago, day_ago))
        assert tidy.old_broker_records(lock_dir) == [gone]
        assert not gone.exists() and running.exists() and fresh.exists()
    finally:
        running_lock.release()
        for path in (running, fresh):
            path.unlink(missing_ok=True)
    # Task count files: a gone launcher's (or one named with this launcher's pid) removed; a live one's kept.
    live = subprocess.Popen(["sleep", "60"])
    try:
        dead_pid = 999999999
        gone_counts = runtime / f"{'1' * 16}.default.{dead_pid}.tasks.4242.json"
        reused = runtime / f"{'1' * 16}.default.{os.getpid()}.tasks.4243.json"
        kept = runtime / f"{'1' * 16}.io_bound.{live.pid}.tasks.4244.json"
        for path in (gone_counts, reused, kept):
            path.write_text("{}")
        assert sorted(tidy.dead_task_counts(runtime)) == sorted([gone_counts, reused])
        assert kept.exists() and other.exists()
    finally:
        live.kill()
        live.wait(10)
