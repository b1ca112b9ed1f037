"""Every input a user can get wrong: a clear message, a distinct exit code, no traceback, nothing left running.
The cases are the table in bad_inputs.py, which docs/reliability.md shows (test_docs.py keeps them equal)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from bad_inputs import CASES, Case
from helpers import Project, RedisServer, free_port

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(project: Project, case: Case) -> None:
    for name, text in case.files.items():
        (project.root / name).write_text(text)
    free = str(free_port())
    args = [a.replace("{app}", project.app).replace("{free}", free) for a in case.args]
    result = project.run(*args, env=project.env(**case.env), timeout=60)
    printed = result.stdout + result.stderr
    assert result.returncode == case.code, printed
    assert case.says in result.stderr, result.stderr
    assert "Traceback" not in printed and "internal error" not in printed, printed


def test_verbose_shows_what_the_worker_said_before_it_failed(project: Project) -> None:
    (project.root / "raiser.py").write_text("raise RuntimeError('boom at import')\n")
    result = project.run("-v", "worker", "-A", "raiser", timeout=60)
    assert result.returncode == 4 and "Traceback" in result.stderr and "boom at import" in result.stderr


def test_health_honours_its_timeout_against_a_hung_broker(project: Project) -> None:
    """A broker that accepts the connection and never answers: health gives up after about --timeout."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)  # connections complete in the kernel's backlog; nothing ever reads or answers
        url = f"redis://127.0.0.1:{hung.getsockname()[1]}/0"
        # A deadline, not a benchmark: before the fix the socket timeout was fixed at 5 s per attempt.
        result = project.run(
            "health", "-A", project.app, "-b", url, "--node", "x@y", "--timeout", "1", "--retries", "0", timeout=4.5
        )
    # Not ready: the broker cannot be reached (exit 5, as for any unreachable broker); never a traceback.
    assert result.returncode == 5 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert "x@y: unreachable (broker unreachable" in result.stdout


def test_wrong_redis_password(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", password="right-password")
    proj = Project(tmp_path / "projects", f"redis://:wrong-password@127.0.0.1:{server.port}/0")
    try:
        result = proj.run("worker", "-A", proj.app, timeout=60)
        assert result.returncode == 5
        assert "invalid username-password pair" in result.stderr or "WRONGPASS" in result.stderr
        assert "wrong-password" not in result.stderr + result.stdout
    finally:
        proj.cleanup()
        server.stop()


def test_project_path_with_spaces_and_non_ascii(tmp_path: Path, redis_server: RedisServer) -> None:
    proj = Project(tmp_path / "projects", redis_server.url(), dirname="my project ünïcødé")
    try:
        launched = proj.launch()
        launched.wait_output(r"1 worker ready", 40)
        launched.send(signal.SIGINT)
        assert launched.wait(30) == 0
    finally:
        proj.cleanup()


def test_full_disk_for_the_log_keeps_the_worker_running(project: Project) -> None:
    if shutil.which("mount") is None:
        pytest.skip("mount is not available")
    tiny = project.base / "tiny"
    tiny.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8k,mode=0755", "tmpfs", str(tiny)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with (tiny / "filler").open("wb", buffering=0) as fh:  # fill the disk: the log file can be created, not written
            try:
                while True:
                    fh.write(b"x" * 1024)

            except OSError:
                pass
        launched = project.launch("--log-dir", str(tiny))
        launched.wait_output(r"cannot write \S+ \(No space left on device\): console output continues", 40)
        launched.wait_output(r"1 worker ready", 40)
        launched.send(signal.SIGINT)
        assert launched.wait(30) == 0
    finally:
        project.cleanup()
        subprocess.run(["umount", str(tiny)], capture_output=True)
