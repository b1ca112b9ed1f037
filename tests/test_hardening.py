"""What an audit with real processes broke, and now holds: a closed console, two launchers of one project,
planted symlinks, destructive steps before validation, leaked passwords, non-numbers, huge .env files."""

from __future__ import annotations

import signal
import socket
import subprocess

import pytest

from helpers import Project, send_task, wait_for

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
