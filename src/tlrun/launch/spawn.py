"""Step 3 of the launch path: name the worker, build its argv and environment, start it.

argv and environment are built by pure functions. The worker runs in its own session (so a terminal's
Ctrl-C reaches only the launcher, which decides what the worker gets), behind the parent-death shim
(`_child.py`, holding the read end of the launcher's lifeline), with the broker URL in its environment and
never on its command line.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

from tlrun.config import ENV_BROKER, ENV_GUARD, ENV_MARKER, ENV_NODE, ENV_ROLE, Settings, WorkerOptions
from tlrun.launch._child import LOG_ENV, RELAY_FDS_ENV
from tlrun.launch.identity import Identity

PYTHON = sys.executable


INITIAL_PID_NS = 0xEFFFFFFC  # the kernel's PROC_PID_INIT_INO: the host's own pid namespace


def node_token(pid: int | None = None) -> int:
    """The number in a node name: this launcher's pid, unique on its host. In a container (pid 1, or a pid
    namespace of its own) every replica has the same pids, and containers started together may share a host
    name: a random 9-digit number then (no pid reaches 10^8, so it is never mistaken for one)."""
    pid = os.getpid() if pid is None else pid
    if pid == 1 or _own_pid_namespace():
        return _CONTAINER_TOKEN
    return pid


def _own_pid_namespace() -> bool:
    try:
        return os.stat("/proc/self/ns/pid").st_ino != INITIAL_PID_NS
    except OSError:  # no /proc (macOS): pids are the host's
        return False


_CONTAINER_TOKEN = 100_000_000 + secrets.randbelow(900_000_000)


def node_name(prefix: str, pid: int, hostname: str, suffix: int = 0) -> str:
    """`api4242@host`; with a suffix, `api4242-2@host` (used when the plain name already answers)."""
    tail = f"-{suffix}" if suffix else ""
    return f"{prefix}{pid}{tail}@{hostname}"


def unique_node_name(prefix: str, pid: int, hostname: str, taken: set[str]) -> str:
    suffix = 0
    while node_name(prefix, pid, hostname, suffix) in taken:
        suffix += 1
    return node_name(prefix, pid, hostname, suffix)


def worker_argv(
    app: str, opts: WorkerOptions, node: str, python: str = sys.executable, module: str = "celery"
) -> list[str]:
    """`python -m celery -A <app> worker -n <node> ...`: the options tlrun knows, then `--` extras verbatim.
    `module` is `tlrun.launch.entry` for tlrun dev (the same command line, see that module)."""
    argv = [python, "-m", module, "-A", app, "worker", "-n", node, "--loglevel", opts.loglevel]
    named: list[tuple[str, object]] = [
        ("--concurrency", opts.concurrency),
        ("--queues", opts.queues),
        ("--pool", opts.pool),
        ("--max-tasks-per-child", opts.max_tasks_per_child),
        ("--max-memory-per-child", opts.max_memory_per_child),
        ("--prefetch-multiplier", opts.prefetch_multiplier),
        ("--time-limit", opts.time_limit),
        ("--soft-time-limit", opts.soft_time_limit),
    ]
    for flag, value in named:
        if value is not None:
            argv += [flag, str(value)]
    if opts.events:
        argv.append("--events")
    argv += list(opts.extra)
    return argv


def beat_argv(app: str, schedule: Path, loglevel: str, python: str = sys.executable) -> list[str]:
    """`python -m celery -A <app> beat`, with its schedule in tlrun's state directory."""
    return [python, "-m", "celery", "-A", app, "beat", "-s", str(schedule), "--loglevel", loglevel]


NOTIFY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def worker_env(
    settings: Settings, node: str, launcher: Identity, broker_url: str | None, role: str | None = None
) -> dict[str, str]:
    """The child's environment: the user's, plus tlrun's markers (project, role, node, launcher)."""
    env = dict(settings.environ)
    for key in NOTIFY_ENV:  # systemd's: only the launcher (the service's main process) talks to systemd
        env.pop(key, None)
    if broker_url:
        # Celery reads this before the app's own broker setting: launcher and worker agree on the broker.
        env[ENV_BROKER] = broker_url
    env[ENV_GUARD] = launcher.encode()
    env[ENV_MARKER] = settings.project_id
    env[ENV_NODE] = node
    if role is not None:
        env[ENV_ROLE] = role
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the log as they are written
    pythonpath = settings.pythonpath(env.get("PYTHONPATH"))  # a src/ layout: the packages are found there first
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


class Lifeline:
    """A pipe whose write end only this launcher holds; every child gets the read end and sees EOF when the
    launcher is gone, however it died (see `_child.py`). Both ends are close-on-exec: a child gets the read
    end through `pass_fds` only, and tlrun never forks without exec while holding the write end (the one
    exception, a task of the debug mode's in-process worker that forks, delays its children's EOF)."""

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe()

    def close(self) -> None:
        for fd in (self.read_fd, self._write_fd):
            try:
                os.close(fd)
            except OSError:
                pass


def environment_bin() -> Path | None:
    """The `bin/` of the virtual environment tlrun runs in (the project's: tlrun hands over to it), else None."""
    return None if sys.prefix == sys.base_prefix else Path(sys.prefix) / "bin"


def project_path(current: str | None) -> str:
    """PATH for the stack's processes: the project's environment first, as if it were activated, so that
    `python manage.py runserver` in a Procfile runs the interpreter the workers run, whether or not the shell
    or IDE that started tlrun activated it (export writes the same PATH into services)."""
    parts = [p for p in (current or os.defpath).split(os.pathsep) if p]
    first = environment_bin()
    if first is None:
        return os.pathsep.join(parts)
    return os.pathsep.join([str(first), *(p for p in parts if p != str(first))])


def shim_argv(argv: list[str], lifeline: Lifeline, grace: float) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tlrun.launch._child",
        str(os.getpid()),
        str(lifeline.read_fd),
        f"{grace:g}",
        "--",
        *argv,
    ]


# The read end of each child's own output pipe (relay.py), by pid: the child's relay thread reads it while the
# child lives; what it had not read when the child was killed (SIGKILL, the OOM killer: its last lines, the
# ones that say why) is still in the pipe, and the launcher appends it to the log file (`unread`).
_unread: dict[int, int] = {}
MAX_UNREAD = 1 << 20


def unread(pid: int, dead: bool) -> bytes:
    """What child `pid` wrote and its relay never read; b"" while it lives (`dead` False: never read then,
    the relay is its reader). The descriptor is closed either way."""
    fd = _unread.pop(pid, None)
    if fd is None:
        return b""
    import select

    data = b""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    try:
        # O_NONBLOCK would be shared with the child's relay (one open file): a zero-timeout poll instead.
        while dead and len(data) < MAX_UNREAD and poller.poll(0):
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    finally:
        os.close(fd)
    return data


def spawn(
    argv: list[str],
    env: Mapping[str, str],
    cwd: Path,
    lifeline: Lifeline,
    grace: float,
    pass_fds: tuple[int, ...] = (),
    stdin_data: bytes | None = None,
) -> subprocess.Popen[bytes]:
    """Start argv in a new session behind the parent-death shim. Must run on the main thread: the kernel
    sends Linux's parent-death signal when the thread that forked exits. `stdin_data` (a secret that must
    not be on a command line or on disk) is written to the child's standard input, which is then closed."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("tlrun spawns workers from the main thread only")
    env = dict(env)
    own: tuple[int, ...] = ()
    if LOG_ENV in env:  # the child relays its own output (relay.py) through a pipe this launcher also holds
        own = os.pipe()
        env[RELAY_FDS_ENV] = f"{own[0]},{own[1]}"
    try:
        popen = subprocess.Popen(
            shim_argv(argv, lifeline, grace),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL if stdin_data is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            pass_fds=(lifeline.read_fd, *pass_fds, *own),
        )
    finally:
        if own:
            os.close(own[1])
    if own:
        _unread[popen.pid] = own[0]  # blocking, as the child's relay reads it: `unread` polls before each read
    if stdin_data is not None and popen.stdin is not None:
        try:
            popen.stdin.write(stdin_data)  # far below a pipe's buffer: never blocks
        except BrokenPipeError:
            pass  # it died at once: the supervisor sees that
        finally:
            popen.stdin.close()
    return popen
