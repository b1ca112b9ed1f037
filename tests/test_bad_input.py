"""Every input a user can get wrong: a clear message, a distinct exit code, no traceback, nothing left running.
docs/reliability.md records these answers."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from helpers import Project, RedisServer, free_port

pytestmark = pytest.mark.timeout(90)


def _write(project: Project, name: str, text: str) -> None:
    (project.root / name).write_text(text)


CASES = {
    # name: (setup, extra args, expected exit code, expected message fragment)
    "unknown app": (None, ["-A", "no_such_module_xyz"], 4, "does not import"),
    "app with a syntax error": (("synerr.py", "def broken(:\n"), ["-A", "synerr"], 4, "SyntaxError"),
    "app raising at import": (
        ("raiser.py", "raise RuntimeError('boom at import')\n"),
        ["-A", "raiser"],
        4,
        "boom at import",
    ),
    "wrong broker scheme": (None, ["-b", "rediss-typo://127.0.0.1:1/0"], 5, "unsupported scheme"),
    "unreachable broker": (None, ["-b", "redis://127.0.0.1:{free}/0"], 5, "did not answer"),
    "malformed .env": ((".env", "A=1\nthis line is wrong\n"), [], 3, ".env:2: malformed line"),
    "unknown option": (None, ["--bogus"], 2, "No such option '--bogus'"),
    "zero concurrency": (None, ["--concurrency", "0"], 2, "--concurrency"),
    "negative concurrency": (None, ["--concurrency", "-3"], 2, "--concurrency"),
    "bad value in the environment": (
        None,
        ["--env", "TLRUN_READY_TIMEOUT=soon"],
        3,
        "TLRUN_READY_TIMEOUT='soon': expected a number",
    ),
    "extremely long node prefix": (None, ["--node-prefix", "x" * 5000], 3, "node prefix"),
    "prefix with an @": (None, ["--node-prefix", "a@b"], 3, "node prefix"),
    "unwritable log directory": (
        ("not-a-dir", "a file"),
        ["--log-dir", "not-a-dir/logs"],
        12,
        "cannot write the worker log",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(project: Project, case: str) -> None:
    setup, args, code, fragment = CASES[case]
    if setup is not None:
        _write(project, *setup)
    env = project.env()
    argv = ["worker"]
    if "-A" not in args:
        argv += ["-A", project.app]
    for arg in args:
        if arg == "--env":
            continue
        if "=" in arg and arg.startswith("TLRUN_"):
            key, value = arg.split("=", 1)
            env[key] = value
            continue
        argv.append(arg.replace("{free}", str(free_port())))
    result = project.run(*argv, env=env, timeout=60)
    assert result.returncode == code, result.stdout + result.stderr
    assert fragment in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


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
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(tiny)], capture_output=True).returncode:
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
