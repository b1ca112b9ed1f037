"""How often a warm shutdown under a stream of tasks stalls: bare Celery, tlrun's in-place worker with its fix
to Celery's pool flush, and the same without the fix (TLRUN_CELERY_FIX=0).

    .venv/bin/python bench/warm_shutdown_race.py [--runs N] [--modes plain,fix,nofix]

Each run: a prefork worker (concurrency 2, prefetch 1, acks_late) on a private redis-server takes 50 tasks of
0.2 s; a few milliseconds after a task finishes (when the worker is fetching and handing out the next ones)
it gets SIGTERM. A stop that has not ended 8 s later is a stall (billiard's child waits up to 30 s for its
result to be read; see src/tlrun/launch/_celery_fix.py); the worker's group is then SIGKILLed. Only processes
this script started are signalled.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from helpers import APP_SOURCE, RedisServer, wait_for  # noqa: E402

PY = sys.executable
STALL = 8.0


def one_run(mode: str, base: Path, app: str, url: str, client: redis.Redis, i: int) -> tuple[bool, int]:
    """(stalled, tasks received after the SIGTERM) for one worker."""
    from celery import Celery

    client.flushdb()
    log = base / f"{mode}-{i}.log"
    celery = [PY, "-m", "celery", "-A", app, "worker", "-n", f"{mode}{i}@race", "--loglevel", "info"]
    celery += ["--concurrency", "2", "--without-mingle", "--without-gossip"]
    env = dict(os.environ, CELERY_BROKER_URL=url, TEST_RESULT_BACKEND=url, PYTHONPATH=str(base))
    if mode == "nofix":
        env["TLRUN_CELERY_FIX"] = "0"
    lifeline: int | None = None
    argv, pass_fds = celery, ()
    if mode != "plain":  # tlrun's shim, as the launcher starts it (this script holds the lifeline's write end)
        read_end, lifeline = os.pipe()
        argv = [PY, "-m", "tlrun.launch._child", str(os.getpid()), str(read_end), "30", "--", *celery]
        pass_fds = (read_end,)
    with log.open("wb") as out:
        worker = subprocess.Popen(
            argv, cwd=base, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, pass_fds=pass_fds
        )
    if pass_fds:
        os.close(pass_fds[0])
    try:
        wait_for(lambda: "ready." in log.read_text(errors="replace") or worker.poll() is not None, 30, "the worker")
        sender = Celery(app, broker=url)
        for n in range(50):
            sender.send_task(f"{app}.record", (n, 0.2))
        sender.close()
        wait_for(lambda: client.llen("runs") >= 10, 30, "ten tasks done")
        done = client.llen("runs")
        wait_for(lambda: client.llen("runs") != done, 10, "the next task done", interval=0.01)
        time.sleep(random.uniform(0, 0.004))
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(STALL)
            stalled = False
        except subprocess.TimeoutExpired:
            stalled = True
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        if lifeline is not None:
            os.close(lifeline)
    after = log.read_text(errors="replace").split("Warm shutdown", 1)
    return stalled, (after[1].count("] received") if len(after) == 2 else 0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--modes", default="plain,fix,nofix")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="tlrun-race-"))
    app = "race_" + base.name.replace("-", "_")
    (base / f"{app}.py").write_text(APP_SOURCE.format(name=app))
    server = RedisServer(base / "redis")
    url = server.url()
    client = redis.Redis.from_url(url)
    try:
        for mode in args.modes.split(","):
            stalls = late = 0
            for i in range(args.runs):
                stalled, received = one_run(mode, base, app, url, client, i)
                stalls += stalled
                late += received > 0
            print(f"{mode:6} {stalls:3} of {args.runs} stops stalled; {late} had tasks received after the SIGTERM")
    finally:
        client.close()
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
