"""Guards that act on the right thing under real faults (issue 38): a broker owned by another local user gets no
password, and a broker that answers nonsense is a clear error, never an internal one."""

from __future__ import annotations

import pwd
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import Project, free_port, throwaway_user, wait_for

pytestmark = pytest.mark.timeout(150)
SYSTEM_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable

# A fake Redis: accepts every connection, writes each byte it receives to stdout (hex, a line per read), and
# answers every read with nonsense, as the audit's 20-line fake did.
FAKE_REDIS = r"""
import socket, sys, threading
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", int(sys.argv[1])))
server.listen(16)
def serve(conn):
    with conn:
        while data := conn.recv(65536):
            sys.stdout.write(data.hex() + "\n")
            sys.stdout.flush()
            conn.sendall(b"%3\r\n+nonsense\r\n:7\r\n")
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


@pytest.fixture
def login_user() -> Iterator[pwd.struct_passwd]:
    with throwaway_user("/bin/sh") as user:
        yield user


class Listening:
    """What the fake received so far (a reader thread on its stdout)."""

    def __init__(self, fake: subprocess.Popen[str]) -> None:
        self.chunks: list[bytes] = []
        self._fake = fake
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._fake.stdout is not None
        for line in self._fake.stdout:
            self.chunks.append(bytes.fromhex(line.strip()))

    def received(self) -> bytes:
        return b"".join(self.chunks)

    def stop(self) -> None:
        self._fake.terminate()
        self._fake.wait(10)
        self._reader.join(10)
        if self._fake.stdout is not None:
            self._fake.stdout.close()


def test_a_broker_run_by_another_login_user_gets_no_password(project: Project, login_user: pwd.struct_passwd) -> None:
    """Another login user's fake Redis on the project's port: every command that talks to the broker refuses
    with exit 5 naming that user, and not one byte reaches the fake; trusted on purpose, the nonsense it
    answers is a clear broker error (exit 5), never an internal error."""
    if not Path("/proc/net/tcp").exists():
        pytest.skip("no /proc/net/tcp")
    from tlrun.launch import owner

    port = free_port()
    fake = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", FAKE_REDIS, str(port)],  # root's venv is not theirs to run
        user=login_user.pw_uid,
        group=login_user.pw_gid,
        cwd="/tmp",
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    listening = Listening(fake)
    try:
        wait_for(lambda: owner.listener_uids(port) == {login_user.pw_uid}, 10, "their fake Redis to listen")
        url = f"redis://:s3cret-pw@127.0.0.1:{port}/0"
        env = project.env(CELERY_BROKER_URL=url, TEST_RESULT_BACKEND=url)
        for command in (["worker"], ["health"], ["doctor"], ["stop"], ["ps", "--cluster"]):
            result = project.run(command[0], *command[1:], "-A", project.app, env=env, timeout=60)
            said = result.stdout + result.stderr
            assert "Traceback" not in said and "internal error" not in said, (command, said)
            if command[0] in ("worker", "doctor"):  # the others talk to the broker only about a running launcher
                assert f"is run by {login_user.pw_name}, another local user" in said, (command, said)
            if command[0] == "worker":
                assert result.returncode == 5, said
            assert "s3cret-pw" not in said, (command, said)
        assert listening.received() == b""  # not one byte, with or without the password
        trusted = project.run(
            "worker", "-A", project.app, env={**env, "TLRUN_TRUST_BROKER_OWNER": login_user.pw_name}, timeout=60
        )
        said = trusted.stdout + trusted.stderr
        assert trusted.returncode == 5, said
        assert "Traceback" not in said and "internal error" not in said and "s3cret-pw" not in said, said
        wait_for(lambda: b"s3cret-pw" in listening.received(), 10, "the password, sent on purpose once trusted")
    finally:
        listening.stop()
