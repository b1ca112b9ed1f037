"""A worker, a beat and a stack process never wait on their launcher (issue 37): each writes its own log file
and relays to the console through a pipe it never blocks on. Ctrl-Z on `tlrun dev` (SIGSTOP: nothing of the
launcher runs) must not stall the workers: tasks complete while it is stopped, the log files hold every line,
and after `fg` (SIGCONT) the console says how many lines it did not show."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import Project, client, wait_for

pytestmark = pytest.mark.timeout(240)
READY = r"tlrun: \d+ workers? ready"

ROLES = """
[tool.tlrun]
app = "{app}"
beat = true

[tool.tlrun.workers.default]
queues = ["celery"]
concurrency = 2

[tool.tlrun.workers.io]
queues = ["io"]
concurrency = 2

[tool.tlrun.processes.chatter]
command = ["{python}", "chatter.py"]
ready = "chatter"
"""


CHATTER = """
import time

while True:  # a dev server's access log: it must not stall either
    print("chatter " + "x" * 200, flush=True)
    time.sleep(0.002)
"""


def log_lines(project: Project, pattern: str) -> int:
    """Lines matching `pattern` in every log file of the project (rotated ones too)."""
    found = 0
    for path in (project.root / "logs").glob("*.log*"):
        found += len(re.findall(pattern, path.read_text(errors="replace")))
    return found


def test_ctrl_z_on_tlrun_dev_stalls_nothing(any_project: Project) -> None:
    import sys

    project = any_project

    (project.root / "pyproject.toml").write_text(ROLES.format(app=project.app, python=sys.executable))
    (project.root / "chatter.py").write_text(CHATTER)
    launched = project.launch(command="dev", fast=False, app_arg=False)
    try:
        launched.wait_output(READY, 60)
        launched.wait_output(r"\[chatter\] chatter", 30)
        wait_for(lambda: launched.output().count(" ready: ") >= 1 and "starting beat" in launched.output(), 30, "beat")
        # Ctrl-Z: the launcher stops, its children go on.
        os.kill(launched.pid, signal.SIGSTOP)
        app = client(project.broker_url)
        results = [app.send_task(f"{project.app}.add", (i, i), queue="celery" if i % 2 else "io") for i in range(1500)]
        deadline = time.monotonic() + 120
        for result in results:
            assert result.get(timeout=max(1.0, deadline - time.monotonic())) is not None
        assert os.waitpid(launched.pid, os.WNOHANG) == (0, 0)  # still stopped, all the while
        status = Path(f"/proc/{launched.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert status == "T", status
        # Every line of every task is in the log files (Celery logs each task's success).
        wait_for(lambda: log_lines(project, r"Task \S+\.add\[\S+\] succeeded") == 1500, 30, "1500 lines in the logs")
        os.kill(launched.pid, signal.SIGCONT)
        launched.wait_output(r"tlrun: [\d,]+ line\(s\) not shown while the console was not read; the log file", 30)
        launched.wait_output(r"\[chatter\] chatter", 10)
        launched.reap()
        assert launched.proc.returncode == 0, launched.output()[-3000:]
    finally:
        try:
            os.kill(launched.pid, signal.SIGCONT)
        except OSError:
            pass


@pytest.mark.timeout(420)
def test_liveness_holds_through_a_three_minute_broker_outage_and_fails_for_a_stopped_worker(
    project: Project, amqp_vhost: str, tmp_path: Path
) -> None:
    """The broker away for three minutes, on Redis and on RabbitMQ at once (each seen through a proxy that
    drops its connections and refuses new ones, as a stopped broker does): `health --liveness` with the
    documented window (30 s) says alive at every probe (the worker is retrying its connection: restarting it
    would not help, and restarting every pod at once would hurt), readiness says not ready; once the broker
    is back the worker is ready again; a SIGSTOPped worker fails liveness at once."""
    from urllib.parse import urlsplit

    from helpers import TcpProxy

    window, outage = 30, 180.0
    amqp = Project(tmp_path / "amqp-projects", amqp_vhost)
    proxies: list[TcpProxy] = []
    try:
        sides = []
        for proj in (project, amqp):
            proxy = TcpProxy(("127.0.0.1", urlsplit(proj.broker_url).port or 0))
            proxies.append(proxy)
            env = proj.env(CELERY_BROKER_URL=proxy.url(proj.broker_url))
            launched = proj.launch("--pool", "prefork", "--concurrency", "1", env=env)
            sides.append((proj, env, launched))
        pids = [int(launched.wait_output(READY + r": \S+ \(pid (\d+)\)", 60).group(1)) for _p, _e, launched in sides]

        def liveness(proj: Project, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
            return proj.run("health", "-A", proj.app, "--liveness", "--window", str(window), env=env)

        for proj, env, _launched in sides:
            assert liveness(proj, env).returncode == 0
        for proxy in proxies:
            proxy.outage()
        said: dict[str, set[str]] = {proj.broker_url: set() for proj, _e, _l in sides}
        ends = time.monotonic() + outage
        probes = 0
        while time.monotonic() < ends:
            for proj, env, _launched in sides:
                live = liveness(proj, env)
                assert live.returncode == 0, (proj.broker_url, live.stdout + live.stderr)
                said[proj.broker_url].add("retrying" if "retrying its broker connection" in live.stdout else "other")
            probes += 1
            time.sleep(5)  # a probe's period, not a synchronisation
        for proj, env, _launched in sides:
            ready = proj.run("health", "-A", proj.app, "--readiness", "--timeout", "1", "--retries", "0", env=env)
            assert ready.returncode != 0, ready.stdout
        assert all("retrying" in found for found in said.values()), said
        for proxy in proxies:
            proxy.back()
        for proj, env, _launched in sides:
            wait_for(
                lambda p=proj, e=env: p.run("health", "-A", p.app, "--timeout", "2", env=e).returncode == 0,
                90,
                f"ready again on {proj.broker_url}",
            )
        for (proj, env, _launched), pid in zip(sides, pids, strict=True):
            os.kill(pid, signal.SIGSTOP)
            try:
                stopped = liveness(proj, env)
                assert stopped.returncode == 14 and "is stopped" in stopped.stdout, stopped.stdout
            finally:
                os.kill(pid, signal.SIGCONT)
    finally:
        amqp.cleanup()
        for proxy in proxies:
            proxy.close()


def test_the_relay_takes_a_chunk_out_of_the_pipe_only_once_it_is_written() -> None:
    """What the relay thread holds when its process is SIGKILLed is lost unless it is still in the pipe: a
    chunk stays there (readable by the launcher) until the relay has written it; then it is taken out."""
    import fcntl
    import termios
    import threading

    from tlrun.launch import relay

    read_end, write_end = os.pipe()
    written: list[str] = []
    holding, go_on = threading.Event(), threading.Event()

    def slow_relay(text: str) -> None:
        holding.set()
        go_on.wait(30)  # the relay thread, between its read and its write (descheduled, or killed here)
        written.append(text)

    def in_pipe() -> int:
        return int.from_bytes(fcntl.ioctl(read_end, termios.FIONREAD, b"\0\0\0\0"), "little")

    thread = threading.Thread(target=relay.drain_written_first, args=(read_end, slow_relay, lambda t: t))
    thread.start()
    try:
        os.write(write_end, b"line one\nline two\n")
        assert holding.wait(30)
        assert in_pipe() == len(b"line one\nline two\n"), "read out of the pipe before it was written"
        go_on.set()
        wait_for(lambda: in_pipe() == 0, 30, "the written chunk to leave the pipe")
        assert written == ["line one\nline two\n"]
    finally:
        go_on.set()
        os.close(write_end)
        thread.join(30)
        os.close(read_end)
    assert not thread.is_alive()


def test_the_launcher_skips_the_lines_a_killed_relay_wrote_but_left_in_the_pipe(tmp_path: Path) -> None:
    """Whole lines the log file ends with, from the start of what is left in the pipe, and no more. (A line
    printed again, identical to the log's last one, is taken for the relay's own write: the copy dropped
    repeats a line the log has, where a chunk lost would have been lines it has not.)"""
    from tlrun.launch.outputs import logged_already

    log = tmp_path / "w.log"
    log.write_text("ready\nA\nB\nB\n")
    assert logged_already(log, ["A", "B", "B", "C"]) == 3  # written, then killed before the take-out
    assert logged_already(log, ["B", "C"]) == 1  # the log ends with this B: the relay's last write
    assert logged_already(log, ["B", "B", "C"]) == 2
    assert logged_already(log, ["C", "D"]) == 0
    log.write_text("xA\n")
    assert logged_already(log, ["A"]) == 0  # only whole lines
    log.write_text("partial")
    assert logged_already(log, ["partial"]) == 0
    assert logged_already(tmp_path / "none.log", ["A"]) == 0


def test_a_killed_workers_last_lines_reach_its_log_file(project: Project) -> None:
    """The worker writes its log itself; SIGKILLed (the OOM killer, kill -9) right after printing, its relay
    thread never wrote its last lines: they are still in the pipe (the relay takes a chunk out only once it is
    written), whose read end the launcher also holds, and the launcher puts them into the log file once the
    worker is gone, each once. Before, they were lost."""
    from helpers import send_task

    launched = project.launch("--pool", "solo")
    launched.wait_output(READY, 60)
    send_task(project.broker_url, f"{project.app}.last_words", 600)
    launched.wait_output(r"status 137", 30)
    launched.reap()
    text = "".join(p.read_text(errors="replace") for p in (project.root / "logs").glob("celery_worker_*.log*"))
    missing = [i for i in range(600) if f"last words {i}\n" not in text]
    assert not missing, f"{len(missing)} of 600 lines missing, from {missing[0]}"
    doubled = [i for i in range(600) if text.count(f"last words {i}\n") > 1]
    assert not doubled, f"{len(doubled)} lines written twice, from {doubled[0]}"


def test_the_liveness_probe_answers_without_click_as_the_full_command_does(project: Project) -> None:
    """The probe a pod runs every few seconds (`tlrun health --liveness`, docs/kubernetes.md's command and
    the Dockerfile's) is answered before click or the configuration's machinery is imported, with the same
    lines and exit code as the full command (`-v` makes the full command run): for two declared roles, one
    running and one not, with the worker alive and then stopped, from the root and with --project-dir."""
    (project.root / "pyproject.toml").write_text(
        f'[tool.tlrun]\napp = "{project.app}"\n\n[tool.tlrun.workers.default]\nqueues = ["celery"]\n'
        '\n[tool.tlrun.workers.other]\nqueues = ["other"]\n'
    )
    import sys

    launched = project.launch("--role", "default", app_arg=False)
    worker = int(launched.wait_output(READY + r": \S+ \(pid (\d+)\)", 60).group(1))
    env = {k: v for k, v in project.env().items() if k != "CELERY_APP"}
    outside = project.base

    def both(*args: str, cwd: Path = project.root) -> tuple[tuple[int, str], tuple[int, str]]:
        fast = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "tlrun", "health", "--liveness", *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert " click" not in fast.stderr and " psutil" not in fast.stderr, "the probe imported click or psutil"
        full = project.run("health", "--liveness", "-v", *args, env=env, cwd=cwd)
        ages = re.compile(r"\d+ s")  # the heartbeat's age moves on between the two
        return (fast.returncode, ages.sub("N s", fast.stdout)), (full.returncode, ages.sub("N s", full.stdout))

    for args, cwd in (((), project.root), (("--window", "30", "--project-dir", str(project.root)), outside)):
        fast, full = both(*args, cwd=cwd)
        assert fast == full and fast[0] == 15, (fast, full)  # `other` runs nowhere: dead
        assert re.search(r"default\d+@\S+: alive \((heartbeat|starting)", fast[1]), fast[1]
        assert "role other: not alive (no tlrun launcher runs it here)" in fast[1]
    # A role's pod probes its own role (tlrun export kubernetes): the other role is not its business.
    fast, full = both("--role", "default")
    assert fast == full and fast[0] == 0 and "other" not in fast[1], (fast, full)
    os.kill(worker, signal.SIGSTOP)
    try:
        fast, full = both("-A", project.app)
        assert fast == full and "is stopped" in fast[1], (fast, full)
    finally:
        os.kill(worker, signal.SIGCONT)
