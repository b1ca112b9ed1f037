from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import Project, RedisServer, close_clients, processes_under


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    try:
        yield server
    finally:
        close_clients()
        server.stop()


@pytest.fixture
def record_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A second private Redis where tasks record what they did (the broker may be RabbitMQ)."""
    server = RedisServer(tmp_path / "record-redis")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def project(tmp_path: Path, redis_server: RedisServer) -> Iterator[Project]:
    """A unique project on a private Redis. Teardown stops what the test started, then fails the test
    if anything that ran in the project's directories is still alive (after killing it, by pid)."""
    base = tmp_path / "projects"
    proj = Project(base, redis_server.url())
    try:
        yield proj
    finally:
        proj.cleanup()
        leftovers = processes_under(base)
        described = [_describe(proc) for proc in leftovers]  # before the kill: what it was, for the failure
        for proc in leftovers:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        psutil.wait_procs(leftovers, timeout=5)
        if leftovers:
            pytest.fail(f"test left processes running: {described}")


@pytest.fixture(params=["redis", "amqp"])
def any_project(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Project]:
    """A project on a private Redis, or on a throwaway vhost of the local RabbitMQ."""
    if request.param == "redis":
        yield request.getfixturevalue("project")
        return
    proj = Project(tmp_path / "amqp-projects", request.getfixturevalue("amqp_vhost"))
    try:
        yield proj
    finally:
        proj.cleanup()
        close_clients()


def _describe(proc: psutil.Process) -> str:
    """pid, parent, age and command line of a leftover (what teardown found still running)."""
    try:
        with proc.oneshot():
            age = time.time() - proc.create_time()
            return f"{proc.pid} (ppid {proc.ppid()}, {proc.status()}, up {age:.1f} s): {' '.join(proc.cmdline())[:160]}"
    except psutil.Error:
        return f"{proc.pid} (gone)"


@pytest.fixture(autouse=True)
def _no_inherited_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(("TL_CELERY", "TLRUN_")):
            monkeypatch.delenv(key)


def _rabbit_available() -> bool:
    if shutil.which("rabbitmqctl") is None:
        return False
    try:
        socket.create_connection(("127.0.0.1", 5672), 0.5).close()
        return True
    except OSError:
        return False


@pytest.fixture
def amqp_vhost() -> Iterator[str]:
    """A vhost of its own on the local RabbitMQ, so no other worker can answer our pings."""
    if not _rabbit_available():
        pytest.skip("no RabbitMQ on 127.0.0.1:5672")
    vhost = f"tlrun-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["rabbitmqctl", "add_vhost", vhost], check=True, capture_output=True, timeout=60)
    subprocess.run(
        ["rabbitmqctl", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    try:
        yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    finally:
        subprocess.run(["rabbitmqctl", "delete_vhost", vhost], capture_output=True, timeout=60)
