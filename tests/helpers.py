"""Test helpers: real processes, polled with deadlines, always reaped."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil

PY = sys.executable
T = TypeVar("T")

APP_SOURCE = """
import os
import time

from celery import Celery

app = Celery("{name}")
app.conf.update(
    result_backend=os.environ.get("TEST_RESULT_BACKEND"),
    broker_connection_retry_on_startup=True,
    task_acks_late=os.environ.get("TEST_ACKS_LATE", "1") == "1",
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_transport_options={{
        "visibility_timeout": float(os.environ.get("TEST_VISIBILITY", "3600")),
        # kombu 5.7 looks for expired unacked messages every interval, but scans only every throttle-th time
        # (defaults 10 s and 10: up to ~100 s late). Scan every second in tests.
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
        # A worker restores expired unacked messages under a Redis mutex held up to this long (kombu: 300 s).
        # A worker SIGKILLed during its restore scan leaves the mutex: every other worker waits that long.
        "unacked_mutex_expire": 5,
    }},
)


@app.task
def record(i, seconds=0.2):
    # Sleep, then note that task i completed (a list: duplicates stay visible).
    import redis

    time.sleep(seconds)
    redis.Redis.from_url(os.environ["TEST_RESULT_BACKEND"]).rpush("runs", i)
    return i


@app.task
def crash(code):
    os._exit(code)


@app.task
def add(x, y):
    return x + y


@app.task
def sleep(seconds):
    time.sleep(seconds)
    return seconds


@app.task
def hang_with_child(seconds):
    # A task that waits on a process of its own (an ffmpeg, a LibreOffice): each run notes that pid.
    import subprocess

    import redis

    proc = subprocess.Popen(["sleep", str(seconds)])
    redis.Redis.from_url(os.environ["TEST_RESULT_BACKEND"]).rpush("hang_children", proc.pid)
    proc.wait()
    return seconds


@app.task
def whoami():
    return os.getpid()


@app.task
def spawn_sleeper(new_session=False):
    # A background process the task does not wait for (it inherits the worker's environment and marker).
    import subprocess

    proc = subprocess.Popen(
        ["sleep", "1000"], start_new_session=new_session, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return proc.pid


@app.task
def orphan_grandchild(seconds):
    # The shell starts `sleep` in the background and exits: the sleep is re-parented (to PID 1, a subreaper,
    # or the host's init), and whoever gets it must reap it when it exits.
    import subprocess

    out = subprocess.run(
        ["sh", "-c", "sleep %s >/dev/null 2>&1 & echo $!" % seconds], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


@app.task
def echo_env(key, delay=0.0):
    # Print a variable of the worker's environment after a delay (the broker URL: is it masked?).
    time.sleep(delay)
    print("ENV %s=%s" % (key, os.environ.get(key)), flush=True)
    return True


@app.task
def last_words(lines):
    # Lines, then SIGKILL of this process (the OOM killer, kill -9): written, never relayed by the process.
    import signal

    for i in range(lines):
        print("last words %d" % i, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


@app.task
def shout(lines):
    # Much more output than a pipe holds (64 KiB): a worker whose output nobody drains blocks here.
    for i in range(lines):
        print("shout line %d " % i + "x" * 80, flush=True)
    return lines
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll until predicate() is truthy; fail with `what` after the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def reap(proc: subprocess.Popen[Any], first: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Stop a process the test started (and its session's group), and reap it."""
    if proc.poll() is None:
        try:
            proc.send_signal(first)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # start_new_session=True: the group is the process's own
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


class RedisServer:
    def __init__(self, workdir: Path, password: str | None = None) -> None:
        self.password = password
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        # A free port is free only until something binds it: another socket can take it before redis-server
        # does. Then redis-server exits, and whatever holds the port must never pass for it: try another.
        for _ in range(5):
            self.port = free_port()
            self.proc = subprocess.Popen(self._argv(), cwd=workdir, stdout=subprocess.DEVNULL, start_new_session=True)
            if wait_for(self._listening_or_gone, 10, f"redis-server on port {self.port}") == "listening":
                return
        raise AssertionError(f"redis-server exited with {self.proc.returncode} on five free ports in a row")

    def _argv(self) -> list[str]:
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        argv += ["--dir", str(self.workdir)]
        if self.password:
            argv += ["--requirepass", self.password]
        return argv

    def _listening_or_gone(self) -> str | None:
        """ "listening" once this redis-server process (not any other) listens on its port; "gone" if it exited."""
        if self.proc.poll() is not None:
            return "gone"
        try:
            sockets = psutil.Process(self.proc.pid).net_connections(kind="tcp")
        except psutil.Error:
            return None
        listening = any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port for c in sockets)
        return "listening" if listening else None

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        reap(self.proc)

    def restart(self) -> None:
        """Stop and start again on the same port (nothing is persisted)."""
        reap(self.proc)
        self.proc = subprocess.Popen(self._argv(), cwd=self.workdir, stdout=subprocess.DEVNULL, start_new_session=True)
        if wait_for(self._listening_or_gone, 10, f"redis-server back on port {self.port}") == "gone":
            raise AssertionError(f"redis-server exited with {self.proc.returncode} when started again on {self.port}")


def ping_replies(url: str, timeout: float = 1.0) -> list[str]:
    """Raw broadcast ping replies, counted the way tlrun counts them (duplicates kept)."""
    from celery import Celery

    app = Celery("test-probe", broker=url, set_as_current=False)
    try:
        return [name for reply in app.control.ping(timeout=timeout) for name in reply]
    finally:
        app.close()


class Launched:
    """A background process whose output goes to a file, for polling."""

    def __init__(self, argv: list[str], cwd: Path, env: dict[str, str], out: Path) -> None:
        self.argv = argv
        self.out = out
        self._fh = out.open("wb")
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.pid = self.proc.pid

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_output(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            match = re.search(pattern, self.output())
            if match is None and self.proc.poll() is not None:
                match = re.search(pattern, self.output())
                if match is None:
                    raise AssertionError(
                        f"process exited ({self.proc.returncode}) before printing {pattern!r}:\n{self.output()}"
                    )
            return match

        return wait_for(found, timeout, f"{pattern!r} in output of {self.argv[:4]}")

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def reap(self, first: int = signal.SIGINT) -> None:
        reap(self.proc, first)
        self._fh.close()


class Project:
    """A throwaway project: unique directory and unique app module, its own runtime dir and broker."""

    def __init__(
        self, base: Path, broker_url: str, name: str | None = None, dirname: str = "proj", write_app: bool = True
    ) -> None:
        self.base = base
        self.app = name or f"tlapp_{uuid.uuid4().hex[:10]}"
        self.root = base / dirname
        self.root.mkdir(parents=True, exist_ok=True)
        if write_app:
            (self.root / f"{self.app}.py").write_text(APP_SOURCE.format(name=self.app))
        self.runtime = base / "run"
        self.runtime.mkdir(mode=0o700, exist_ok=True)
        self.broker_url = broker_url
        self.started: list[Launched] = []
        self._n = 0

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("CELERY_", "TLRUN_", "TL_CELERY")) and k not in ("REDIS_URL", "DEBUG_MODE")
        }
        env.update(
            XDG_RUNTIME_DIR=str(self.runtime),
            CELERY_BROKER_URL=self.broker_url,
            NO_COLOR="1",
            TEST_RESULT_BACKEND=self.broker_url if self.broker_url.startswith("redis") else "rpc://",
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    def _out(self, label: str) -> Path:
        self._n += 1
        return self.base / f"out-{self._n}-{label}.txt"

    def tlrun_argv(self, command: str, *args: str, fast: bool = True, app_arg: bool = True) -> list[str]:
        argv = [PY, "-m", "tlrun", command, *(["-A", self.app] if app_arg else []), *args]
        if command == "worker" and fast:
            argv += ["--", "--without-mingle", "--without-gossip"]
        return argv

    def launch(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        fast: bool = True,
        command: str = "worker",
        app_arg: bool = True,
    ) -> Launched:
        argv = self.tlrun_argv(command, *args, fast=fast, app_arg=app_arg)
        launched = Launched(argv, self.root, env or self.env(), self._out("tlrun"))
        self.started.append(launched)
        return launched

    def run(
        self, command: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PY, "-m", "tlrun", command, *args],
            cwd=cwd or self.root,
            env=env or self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def hand_worker(
        self, node: str, app: str | None = None, cwd: Path | None = None, extra: tuple[str, ...] = ()
    ) -> Launched:
        """A worker started by hand (as an IDE or a shell would), not by tlrun."""
        argv = [
            PY,
            "-m",
            "celery",
            "-A",
            app or self.app,
            "worker",
            "-n",
            node,
            "--pool",
            "solo",
            "--without-mingle",
            "--without-gossip",
            "--loglevel",
            "info",
            *extra,
        ]
        launched = Launched(argv, cwd or self.root, self.env(), self._out("celery"))
        self.started.append(launched)
        return launched

    def other_project(self, dirname: str) -> Project:
        """Another directory with the same app module name (for the "same app, other directory" decoy)."""
        other = Project(self.base, self.broker_url, name=self.app, dirname=dirname)
        return other

    def lock_file(self, kind: str = "worker") -> Path:
        """Where tlrun keeps this project's lock of `kind` (worker, worker-ROLE, beat) on this host."""
        from tlrun.config import project_id
        from tlrun.launch.guard import lock_path

        return lock_path(project_id(self.root, self.app), kind, socket.gethostname())

    def cleanup(self) -> None:
        for launched in reversed(self.started):
            launched.reap()
        # The lock directory is the user's own (not the test's): remove what a killed launcher left there.
        from tlrun.config import project_id

        lock = self.lock_file()
        for path in lock.parent.glob(f"{project_id(self.root, self.app)}.*"):
            path.unlink(missing_ok=True)


def processes_under(base: Path) -> list[psutil.Process]:
    """Every live process whose working directory is inside `base` (the test's own processes)."""
    found = []
    base_str = str(base)
    for proc in psutil.process_iter(["pid", "cwd", "status"]):
        cwd = proc.info.get("cwd") or ""
        if proc.info.get("status") == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
            continue
        if cwd == base_str or cwd.startswith(base_str + os.sep):
            found.append(proc)
    return found


def gone(pids: list[int]) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            continue
    return True


_CLIENTS: dict[str, Any] = {}


def client(url: str) -> Any:
    """One Celery client app per broker (results in the same Redis), closed by close_clients()."""
    from celery import Celery

    if url not in _CLIENTS:
        backend = url if url.startswith("redis") else "rpc://"
        _CLIENTS[url] = Celery("test-client", broker=url, backend=backend, set_as_current=False)
    return _CLIENTS[url]


def close_clients() -> None:
    """Close the client apps' connections: broker pool, result backend pool, result pub/sub. Results the
    test dropped are collected first, while their Redis still runs; a result collected later finds no
    pub/sub to unsubscribe from (Celery 5.5 would reconnect to the stopped server from its __del__)."""
    import gc

    gc.collect()
    for app in _CLIENTS.values():
        try:
            backend = app.backend
            consumer = getattr(backend, "result_consumer", None)
            pubsub = getattr(consumer, "_pubsub", None)
            if pubsub is not None:
                pubsub.close()
                if not hasattr(consumer, "_pending_unsubscribe"):
                    # Celery 5.5 and 5.6: cancel_for skips a None pub/sub (5.7's queues the unsubscribe and
                    # never reconnects from __del__).
                    consumer._pubsub = None
            redis_client = getattr(backend, "client", None)
            if redis_client is not None:
                redis_client.connection_pool.disconnect()
        except Exception:
            pass
        app.close()
    _CLIENTS.clear()


def send_task(url: str, name: str, *args: Any) -> Any:
    """Send a task by name; its result comes back through the same Redis."""
    return client(url).send_task(name, args=args)


SUPERVISORD_CONF = """
[unix_http_server]
file={run}/supervisor.sock

[supervisord]
nodaemon=true
logfile={run}/supervisord.log
pidfile={run}/supervisord.pid
childlogdir={run}

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{run}/supervisor.sock

[include]
files = {run}/conf.d/*.conf
"""


class Supervisord:
    """`tlrun export supervisor ARGS` into the conf.d of a private supervisord, which is then started (the
    project's teardown reaps it; `shutdown()` stops it the supervisor way). `ctl`: supervisorctl's argv."""

    def __init__(self, project: Project, *export_args: str) -> None:
        import shutil

        import pytest

        supervisord = shutil.which("supervisord", path=str(Path(PY).parent))
        if supervisord is None:
            pytest.skip("supervisor is not installed (test extra)")
        run = project.base / "sv"
        (run / "conf.d").mkdir(parents=True)
        (run / "supervisord.conf").write_text(SUPERVISORD_CONF.format(run=run))
        exported = project.run("export", "supervisor", *export_args, "-o", str(run / "conf.d"))
        assert exported.returncode == 0, exported.stderr
        self.conf = next((run / "conf.d").iterdir())
        self.ctl = [str(Path(supervisord).with_name("supervisorctl")), "-c", str(run / "supervisord.conf")]
        self.daemon = Launched(
            [supervisord, "-c", str(run / "supervisord.conf")], project.root, project.env(), run / "out"
        )
        project.started.append(self.daemon)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.ctl, *args], capture_output=True, text=True, timeout=60)

    def shutdown(self) -> None:
        self.run("shutdown")
        self.daemon.wait(60)


@contextlib.contextmanager
def throwaway_user(shell: str = "/usr/sbin/nologin") -> Iterator[pwd.struct_passwd]:
    """A throwaway local user, removed afterwards. useradd and userdel lock /etc/passwd and fail at once when
    another holds it ("cannot lock /etc/passwd"): tests running at once take turns on a lock of their own."""
    import shutil

    import pytest

    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("creating a user needs root and useradd")
    name = f"tlrt{uuid.uuid4().hex[:8]}"
    with _users_lock():
        subprocess.run(["useradd", "--no-create-home", "--shell", shell, name], check=True, timeout=30)
    try:
        yield pwd.getpwnam(name)
    finally:
        with _users_lock():
            subprocess.run(["userdel", name], check=False, timeout=30)


@contextlib.contextmanager
def _users_lock() -> Iterator[None]:
    import fcntl
    import tempfile

    fd = os.open(os.path.join(tempfile.gettempdir(), "tlrun-tests-useradd.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class TcpProxy:
    """A broker seen through a port of its own: `outage()` drops every connection and stops listening (new
    connections are refused, as when the broker is down), `back()` listens again on the same port; `pause()`
    keeps every connection and moves no byte until `resume()` (a broker stopped with SIGSTOP: connections
    are accepted by the kernel and nothing answers). Lets a test stop a broker it does not own (the local
    RabbitMQ) for one project only."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._flowing = threading.Event()
        self._flowing.set()
        self.back()

    def pause(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def url(self, url: str) -> str:
        """`url` with its host and port replaced by this proxy's."""
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(url)
        netloc = parts.netloc.rsplit("@", 1)
        netloc[-1] = f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc="@".join(netloc)))

    def back(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def outage(self) -> None:
        self._flowing.set()  # a paused pipe wakes to find its socket closed
        with self._lock:
            listener, self._listener = self._listener, None
            sockets, self._sockets = self._sockets, []
        for sock in [s for s in (listener,) if s is not None] + sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the thread in accept() or recv()
            except OSError:
                pass
            sock.close()

    close = outage

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            self._flowing.wait()
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # an outage began meanwhile
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                self._flowing.wait()  # paused: what arrived is held, and nothing more is read
                sink.sendall(chunk)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
