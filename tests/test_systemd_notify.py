"""systemd's notify protocol, read the way systemd reads it: a datagram socket the test binds as
$NOTIFY_SOCKET, with the sender's credentials (SO_PASSCRED) on every message, against a real worker."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import psutil
import pytest

from helpers import Project, ping_replies, wait_for

pytestmark = pytest.mark.timeout(180)
CREDS = struct.Struct("3i")  # struct ucred: pid, uid, gid


class NotifySocket:
    """Collects (monotonic time, sender pid, {key: value}) for each datagram."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, int, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, ancillary, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(CREDS.size))
            except TimeoutError:
                continue
            pid = -1
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = CREDS.unpack(payload[: CREDS.size])[0]
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), pid, fields))

    def with_key(self, key: str, since: float = 0.0) -> list[tuple[float, int, dict[str, str]]]:
        return [m for m in list(self.messages) if key in m[2] and m[0] >= since]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path):  # type: ignore[no-untyped-def]
    sock = NotifySocket(tmp_path / "notify.sock")
    try:
        yield sock
    finally:
        sock.close()


def test_ready_watchdog_reload_and_stop_reach_systemd_from_the_launcher(project: Project, notify: NotifySocket) -> None:
    env = project.env(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="1000000")  # WatchdogSec=1: every 0.5 s
    launched = project.launch("--concurrency", "1", env=env)
    ready = wait_for(lambda: notify.with_key("READY"), 60, "READY=1")
    # READY only after the verification: the worker answers by then.
    assert ready[0][2]["READY"] == "1" and "1 ready:" in ready[0][2]["STATUS"]
    assert len(ping_replies(project.broker_url)) == 1
    wait_for(lambda: len(notify.with_key("WATCHDOG")) >= 3, 10, "watchdog pings while the worker answers")

    # A wedged worker stops the watchdog; it resumes once the worker answers again.
    rows = json.loads(project.run("ps", "--json", env=env).stdout)
    worker = psutil.Process(next(r["pid"] for r in rows if r.get("kind") == "worker"))
    assert worker.ppid() == launched.pid
    assert "NOTIFY_SOCKET" not in worker.environ()  # only the launcher talks to systemd
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        time.sleep(2.5)  # a window of several watchdog periods, observed (not a synchronisation)
        late = notify.with_key("WATCHDOG", since=stopped + 1.0)
        assert not late, f"{len(late)} WATCHDOG=1 sent while the worker was stopped"
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    resumed = time.monotonic()
    wait_for(lambda: notify.with_key("WATCHDOG", since=resumed), 10, "the watchdog to resume")

    # A reload: RELOADING=1 with MONOTONIC_USEC, then READY=1.
    before = time.monotonic()
    launched.send(signal.SIGHUP)
    reloading = wait_for(lambda: notify.with_key("RELOADING", since=before), 60, "RELOADING=1")
    assert int(reloading[0][2]["MONOTONIC_USEC"]) > 0
    again = wait_for(lambda: notify.with_key("READY", since=reloading[0][0]), 60, "READY=1 after the reload")
    assert again[0][0] >= reloading[0][0]
    launched.wait_output(r"reloaded: asked by SIGHUP", 30)

    before = time.monotonic()
    launched.send(signal.SIGTERM)
    assert launched.wait(60) == 0
    assert notify.with_key("STOPPING", since=before)
    senders = {pid for _t, pid, _f in notify.messages}
    assert senders == {launched.pid}, f"datagrams from {senders}, the launcher is {launched.pid}"


def test_no_watchdog_for_another_pid_and_nothing_without_the_socket(project: Project, notify: NotifySocket) -> None:
    env = project.env(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="400000", WATCHDOG_PID="1")
    launched = project.launch("--concurrency", "1", env=env)
    wait_for(lambda: notify.with_key("READY"), 60, "READY=1")
    launched.wait_output(r"workers? ready", 10)
    ready_at = notify.with_key("READY")[0][0]
    launched.send(signal.SIGTERM)
    assert launched.wait(60) == 0
    assert not notify.with_key("WATCHDOG", since=ready_at), "the watchdog is another pid's (WATCHDOG_PID)"
