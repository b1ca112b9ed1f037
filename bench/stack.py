"""The development stack against what users run today: `honcho start` with the same Procfile.

One Procfile, a web server and a Celery worker. tlrun dev reads it (the worker line becomes a role); honcho
runs it as it stands. Timed from the start until the web server answers HTTP and a worker answers a ping;
then what each leaves running when the runner itself is SIGKILLed (an IDE's second Stop, an OOM kill).
"""

from __future__ import annotations

import http.client
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness import APP, Bench, family, free_port, kill_left, wait_until

PY = sys.executable
PROCFILE = (
    "web: {py} -m http.server $PORT --bind 127.0.0.1\n"
    "worker: {py} -m celery -A benchapp worker -c 2 --without-mingle --without-gossip -n stack@bench\n"
)
SETTLE = 3.0  # after the runner's SIGKILL: what still runs then was left behind


def _project(bench: Bench) -> Path:
    where = bench.dir / "stack"
    if not where.exists():
        where.mkdir()
        (where / "benchapp.py").write_text(APP)
        (where / "Procfile").write_text(PROCFILE.format(py=PY))
    return where


def _http(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1.0)
    try:
        conn.request("GET", "/")
        conn.getresponse().read()
        return True
    except OSError:
        return False
    finally:
        conn.close()


def _argv(runner: str) -> list[str]:
    if runner == "tlrun":
        return [PY, "-m", "tlrun", "dev", "--no-broker"]
    return [PY, "-m", "honcho", "start"]


def _up(bench: Bench, runner: str) -> tuple[subprocess.Popen[bytes], float]:
    port = free_port()
    where = _project(bench)
    env = {**bench.env, "PORT": str(port)}
    t0 = time.monotonic()
    proc = bench.spawn(_argv(runner), where / f"{runner}.out", cwd=where, env=env)
    wait_until(lambda: _http(port) and bench.answers_any())
    return proc, time.monotonic() - t0


def up_time(bench: Bench, runner: str) -> float:
    """Seconds until the Procfile's web server answers and its worker pongs; then a clean stop (untimed)."""
    proc, seconds = _up(bench, runner)
    bench.stop(proc, signal.SIGINT)
    wait_until(lambda: not bench.answers_any(), 30)
    return seconds


def left_after_kill(bench: Bench, runner: str) -> float:
    """Processes of the stack still running SETTLE seconds after the runner is SIGKILLed. Those are then
    killed by their recorded pids (never by name)."""
    proc, _ = _up(bench, runner)
    time.sleep(1.0)  # not synchronisation: every child has started its own children by now
    tree = [pid for pid in family(proc.pid) if pid != proc.pid]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    time.sleep(SETTLE)
    left = kill_left(tree)
    wait_until(lambda: not bench.answers_any(), 30)
    return float(len(left))
