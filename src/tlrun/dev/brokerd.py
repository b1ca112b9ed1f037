"""A broker that just works in development: when the broker is a local Redis URL (or none is configured)
and nothing answers there, start a private redis-server for the session, supervised like the worker.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from tlrun.errors import BrokerError
from tlrun.events import Notice
from tlrun.launch.broker import check_reachable
from tlrun.launch.guard import runtime_dir
from tlrun.launch.steps import Step
from tlrun.redact import redact_url

if TYPE_CHECKING:
    from tlrun.launch.launcher import Launcher
    from tlrun.launch.outputs import Outputs
    from tlrun.launch.supervise import Supervisor

DEFAULT_DEV_BROKER = "redis://127.0.0.1:6379/0"
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def local_redis_address(url: str) -> tuple[str, int] | None:
    """(host, port) of a Redis URL on this machine's loopback, else None."""
    try:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss") or parts.hostname not in LOCAL_HOSTS:
            return None
        return ("127.0.0.1" if parts.hostname == "localhost" else parts.hostname, parts.port or 6379)
    except ValueError:
        return None


def answers(host: str, port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout):
            return True
    except OSError:
        return False


def redis_server_argv(executable: str, host: str, port: int, workdir: Path, config: Path | None) -> list[str]:
    """No persistence, loopback only. A password goes in a 0600 config file, never on the command line."""
    argv = [executable]
    if config is not None:
        argv.append(str(config))
    argv += ["--bind", host, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(workdir)]
    return argv


def plan_private_redis(url: str, state_dir: Path) -> list[str] | None:
    """The argv of a private redis-server to start for `url`, or None when none is needed."""
    address = local_redis_address(url)
    if address is None or answers(*address):
        return None
    executable = shutil.which("redis-server")
    if executable is None:
        raise BrokerError(
            f"nothing answers at {redact_url(url)} and redis-server is not installed",
            hint="install Redis (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis), "
            "start it, or point CELERY_BROKER_URL at a running broker",
        )
    password = urlsplit(url).password
    config = None
    if password:
        config = state_dir / f"redis-{address[1]}.conf"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f'requirepass "{password}"\n')
    return redis_server_argv(executable, address[0], address[1], state_dir, config)


def start_private(sup: Supervisor, outputs: Outputs, url: str, argv: list[str], state_dir: Path) -> int:
    """Start the planned redis-server as the supervisor's "broker" child, stopped after the workers; its
    output goes to `redis_<launcher pid>.log` only. Returns its pid once it listens."""
    child = sup.start("broker", argv, dict(os.environ), state_dir, stop_order=1)
    outputs.attach("broker", child, f"redis_{os.getpid()}", echo=False)
    wait_listening(url, 5.0, lambda: sup.running("broker"))
    return child.pid


def wait_listening(url: str, timeout: float, alive: object) -> None:
    address = local_redis_address(url)
    assert address is not None
    deadline = time.monotonic() + timeout
    while not answers(*address, timeout=0.1):
        if time.monotonic() > deadline or not callable(alive) or not alive():
            raise BrokerError(f"the private redis-server for {redact_url(url)} did not start")
        time.sleep(0.05)


class PrivateBrokerStep(Step):
    """tlrun dev: a private redis-server when the broker is a local Redis URL that does not answer (or nothing
    is configured at all), planned before anything is stopped and started once the project's lock is ours."""

    name = "private broker"

    def __init__(self) -> None:
        self._argv: list[str] | None = None

    def validate(self, launcher: Launcher) -> None:
        if launcher.broker_source == "default":  # nothing configured anywhere: the local Redis of a laptop
            launcher.broker_url = DEFAULT_DEV_BROKER
        self._argv = plan_private_redis(launcher.broker_url, runtime_dir(os.environ))
        launcher.broker_provided = self._argv is not None

    def prepare(self, launcher: Launcher) -> None:
        if self._argv is None:
            return
        url = launcher.broker_url
        pid = start_private(launcher.sup, launcher.outputs, url, self._argv, runtime_dir(os.environ))
        address = local_redis_address(url) or ("?", 0)
        launcher.report(
            Notice(
                f"no broker answered at {address[0]}:{address[1]}: started a private redis-server "
                f"(pid {pid}, no persistence) for this session; it stops on exit"
            )
        )
        check_reachable(url)
