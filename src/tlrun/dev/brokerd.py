"""A broker that just works in development: when the broker is a local Redis URL (or none is configured)
and nothing answers there, start a private redis-server for the session, supervised like the worker.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from tlrun.config import ENV_GUARD, ENV_MARKER
from tlrun.errors import BrokerError
from tlrun.events import Notice
from tlrun.launch import owner, procs
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


def redis_server_argv(executable: str, host: str, port: int, workdir: Path, config_on_stdin: bool) -> list[str]:
    """No persistence, loopback only. A password goes on the server's standard input (`-`), never on its
    command line (every user reads it) nor in a file (which would outlive the session)."""
    argv = [executable, *(["-"] if config_on_stdin else [])]
    argv += ["--bind", host, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(workdir)]
    return argv


def redis_config(password: str) -> bytes:
    """`requirepass "<password>"` in redis.conf's quoting: `"` and `\\` escaped, anything unprintable as \\xHH."""
    out = []
    for char in password:
        if char in '"\\':
            out.append("\\" + char)
        elif char.isprintable():
            out.append(char)
        else:
            out.extend(f"\\x{byte:02x}" for byte in char.encode())
    return f'requirepass "{"".join(out)}"\n'.encode()


@dataclass(frozen=True)
class PrivateRedis:
    argv: list[str]
    config: bytes | None  # fed on the server's standard input


def plan_private_redis(url: str, state_dir: Path) -> PrivateRedis | None:
    """The private redis-server to start for `url`, or None when none is needed."""
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
    # The URL carries it percent-encoded; the server gets what clients send after decoding it.
    config = redis_config(unquote(password)) if password else None
    return PrivateRedis(redis_server_argv(executable, address[0], address[1], state_dir, config is not None), config)


def start_private(
    sup: Supervisor,
    outputs: Outputs,
    url: str,
    plan: PrivateRedis,
    state_dir: Path,
    marks: dict[str, str] | None = None,
) -> int:
    """Start the planned redis-server as the supervisor's "broker" child, stopped after the workers; its
    output goes to `redis_<launcher pid>.log` only. Returns its pid once it listens. `marks`: tlrun's
    markers (project, launcher, `broker`), so that ps lists it and a stray one is found."""
    env = {**os.environ, **(marks or {})}
    child = sup.start("broker", plan.argv, env, state_dir, stop_order=1, stdin_data=plan.config)
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
        self._plan: PrivateRedis | None = None

    def validate(self, launcher: Launcher) -> None:
        if launcher.broker_source == "default":  # nothing configured anywhere: the local Redis of a laptop
            launcher.broker_url = DEFAULT_DEV_BROKER
            stranger = owner.foreign_listener(DEFAULT_DEV_BROKER)
            if stranger is not None:  # never fall back to another user's broker where we would start our own
                raise BrokerError(
                    f"nothing is configured, and {DEFAULT_DEV_BROKER} is run by {owner.user_name(stranger)}, "
                    "another local user: tlrun dev will not hand your tasks to their broker",
                    hint="put CELERY_BROKER_URL=redis://127.0.0.1:<a free port>/0 in .env: tlrun dev then starts a "
                    "private redis-server there",
                )
        self._plan = plan_private_redis(launcher.broker_url, runtime_dir(os.environ))
        launcher.broker_provided = self._plan is not None
        if self._plan is not None and self._plan.config is None:
            others = owner.other_login_users()
            if others:
                # Any local user can connect to a password-less Redis on loopback, read every message and
                # have this worker run tasks of their choosing. Alone on the machine, nobody else can.
                shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
                raise BrokerError(
                    f"this host has other login users ({shown}): a private redis-server without a password "
                    "would let them read your tasks and run theirs in your worker",
                    hint="give it a password in .env, which your web app reads too: "
                    "CELERY_BROKER_URL=redis://:<a password>@"
                    + ":".join(map(str, local_redis_address(launcher.broker_url) or ("127.0.0.1", 6379)))
                    + (urlsplit(launcher.broker_url).path or "/0"),  # the user's own db number
                )

    def prepare(self, launcher: Launcher) -> None:
        if self._plan is None:
            return
        url = launcher.broker_url
        marks = {
            ENV_MARKER: launcher.s.project_id,
            ENV_GUARD: procs.Identity.of_self().encode(),
            procs.ENV_PROCESS: "broker",
        }
        pid = start_private(launcher.sup, launcher.outputs, url, self._plan, runtime_dir(os.environ), marks)
        address = local_redis_address(url) or ("?", 0)
        launcher.report(
            Notice(
                f"no broker answered at {address[0]}:{address[1]}: started a private redis-server "
                f"(pid {pid}, no persistence) for this session; it stops on exit"
            )
        )
        check_reachable(url)
