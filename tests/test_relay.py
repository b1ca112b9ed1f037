"""The output pump relays in chunks: no line lost or reordered, every password masked, even one cut in two
by the pipe's reads."""

from __future__ import annotations

import fcntl
import os
import struct
import termios
import time
from pathlib import Path
from typing import Any, cast

from tlrun.launch.logfiles import open_log
from tlrun.launch.pump import MAX_PENDING, OutputPump
from tlrun.redact import Redactor, secrets_of

URL = "redis://:s3cr%23et-pw@127.0.0.1:6379/0"


class _Child:
    """What the pump needs of a Popen: its stdout and pid. The test holds the pipe's write end."""

    def __init__(self) -> None:
        read_end, self.write_end = os.pipe()
        self.stdout = os.fdopen(read_end, "rb", buffering=0)
        self.pid = 0


def _unread(child: _Child) -> int:
    buf = fcntl.ioctl(child.stdout.fileno(), termios.FIONREAD, struct.pack("i", 0))
    return int(struct.unpack("i", buf)[0])


def _drained(child: _Child, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while _unread(child):
        assert time.monotonic() < deadline, "the pump never read the pipe"
        time.sleep(0.005)


def _pump(tmp_path: Path) -> tuple[_Child, OutputPump, list[list[str]]]:
    child = _Child()
    chunks: list[list[str]] = []
    log = open_log(tmp_path, "w")
    pump = OutputPump(cast(Any, child), log, Redactor(secrets_of(URL)), chunks.append)
    return child, pump, chunks


def test_a_password_cut_across_two_reads_is_masked(tmp_path: Path) -> None:
    child, pump, chunks = _pump(tmp_path)
    for secret in ("s3cr%23et-pw", "s3cr#et-pw"):
        half = len(secret) // 2
        os.write(child.write_end, f"connecting with {secret[:half]}".encode())
        _drained(child)  # the first half has been read on its own
        os.write(child.write_end, f"{secret[half:]} done\n".encode())
        _drained(child)
    os.write(child.write_end, b"last line without newline")
    os.close(child.write_end)
    pump.close()
    child.stdout.close()
    lines = [line for chunk in chunks for line in chunk]
    assert lines == ["connecting with *** done"] * 2 + ["last line without newline"]
    text = (tmp_path / "w.log").read_text()
    assert "s3cr" not in text and text.count("***") == 2
    assert list(pump.tail) == lines


def test_many_lines_in_odd_writes_arrive_whole_and_in_order(tmp_path: Path) -> None:
    child, pump, chunks = _pump(tmp_path)
    expected = [f"line {i} password s3cr#et-pw \u00e9t\u00e9" for i in range(20000)]
    data = "".join(line + "\r\n" if i % 7 == 0 else line + "\n" for i, line in enumerate(expected)).encode()
    # Writes of odd sizes cut lines, UTF-8 characters and the password anywhere.
    at, size = 0, 1
    while at < len(data):
        os.write(child.write_end, data[at : at + size])
        at += size
        size = size * 7 % 8191 + 1
    os.close(child.write_end)
    pump.close(timeout=30)
    child.stdout.close()
    got = [line for chunk in chunks for line in chunk]
    want = [line.replace("s3cr#et-pw", "***") for line in expected]
    assert got == want
    assert len(chunks) < len(expected) / 10, "relayed line by line, not in chunks"
    assert (tmp_path / "w.log").read_text().splitlines() == want


def test_a_huge_line_is_relayed_in_pieces_and_still_masked(tmp_path: Path) -> None:
    child, pump, chunks = _pump(tmp_path)
    filler = b"x" * (MAX_PENDING - 5)  # the password straddles the first piece's end
    data = filler + b"s3cr#et-pw" + b"y" * 10 + b"\n"
    while data:  # blocks while the pipe is full: the pump drains it
        data = data[os.write(child.write_end, data) :]
    os.close(child.write_end)
    pump.close(timeout=30)
    child.stdout.close()
    text = "".join(line for chunk in chunks for line in chunk)
    assert "s3cr" not in text and "***" in text
    assert len(text) == len(filler) + 3 + 10


FINISH = """
import os, subprocess, sys
from tlrun.launch import relay
finish = relay.start(sys.argv[1], [])
# A pool child, or a task's subprocess, that still holds the pipe when the worker stops at its launcher's death
holder = subprocess.Popen(["sleep", "300"], start_new_session=True)
with open(sys.argv[2], "w") as fh:
    fh.write(str(holder.pid))
print("the last line before the stop", flush=True)
finish(600)  # at most 600 s: it must return once its lines are written, not wait for the holder's EOF
os._exit(0)
"""


def test_the_relay_finishes_once_its_lines_are_written_though_a_child_still_holds_the_pipe(tmp_path: Path) -> None:
    """A worker whose launcher died (fastexit.py) finishes its relay, then kills its group: the relay must not
    wait for the end of a pipe its pool children still hold (it waited its whole timeout, then lost nothing
    more than now: a SIGKILLed launcher's idle tree took 1 s to go instead of a few milliseconds)."""
    import subprocess
    import sys

    from helpers import wait_for

    log, holder_file = tmp_path / "w.log", tmp_path / "holder.pid"
    proc = subprocess.Popen([sys.executable, "-c", FINISH, str(log), str(holder_file)], stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: proc.poll() is not None, 30, "the relay's finish to return while the holder lives")
        assert proc.returncode == 0
        assert "the last line before the stop\n" in log.read_text()
    finally:
        proc.kill()
        proc.wait(10)
        if holder_file.exists() and holder_file.read_text():
            try:
                os.kill(int(holder_file.read_text()), 9)
            except ProcessLookupError:
                pass
