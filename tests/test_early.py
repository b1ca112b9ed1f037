"""Workers started early (held, importing their app while the launcher validates, locks and sweeps) never
connect before those passed; a launch that fails leaves no worker and no connection behind. The verdict comes
from each worker's own pong, the census of the other workers follows it."""

from __future__ import annotations

import re
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
import redis

from helpers import Project

pytestmark = pytest.mark.timeout(120)
HOST = socket.gethostname()
READY = r"tlrun: \d+ workers? ready: (\S+) \(pid (\d+)\)"
EARLY = r"early start: worker (\S+) \(pid (\d+)\) imports its app, held until released"
# Each worker that starts (Celery's worker_init: before it connects) and stops notes it, with the time.
EVENTS = """

import time as _time
from celery.signals import worker_init as _init, worker_shutdown as _shutdown


def _note(what):
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "events.txt"), "a") as fh:
        fh.write(f"{{what}} {{os.getpid()}} {{_time.time()}}\\n")


_init.connect(lambda **_kw: _note("init"), weak=False)
_shutdown.connect(lambda **_kw: _note("shutdown"), weak=False)
"""


def _with_events(project: Project) -> Path:
    module = project.root / f"{project.app}.py"
    module.write_text(module.read_text() + EVENTS.replace("{{", "{").replace("}}", "}"))
    return project.root / "events.txt"


def _events(path: Path) -> list[tuple[str, int, float]]:
    if not path.exists():
        return []
    return [(w, int(p), float(t)) for w, p, t in (line.split() for line in path.read_text().splitlines())]


def _connections(client: Any) -> int:
    return int(client.info("stats")["total_connections_received"])


def test_a_validation_failure_leaves_no_worker_and_no_connection(project: Project) -> None:
    events = _with_events(project)
    elsewhere = project.base / "elsewhere-logs"
    elsewhere.mkdir()
    (project.root / "logs").symlink_to(elsewhere)  # refused by the validation, after the early start
    client = redis.Redis.from_url(project.broker_url)
    try:
        before = _connections(client)
        result = project.run("worker", "-A", project.app, "-v")
        assert result.returncode == 12, result.stdout + result.stderr
        assert "is a symlink" in result.stderr
        assert re.search(EARLY, result.stderr), result.stderr  # the worker had been started early ...
        assert _events(events) == []  # ... and never started Celery's worker, let alone connected
        assert _connections(client) == before
    finally:
        client.close()


def test_a_launch_refused_by_the_lock_never_connects_its_early_worker(project: Project) -> None:
    events = _with_events(project)
    first = project.launch()
    first_pid = int(first.wait_output(READY, 30).group(2))
    refused = project.run("worker", "-A", project.app, "-v")
    assert refused.returncode == 6, refused.stdout + refused.stderr
    early = re.search(EARLY, refused.stderr)
    assert early is not None, refused.stderr
    assert [(w, p) for w, p, _t in _events(events)] == [("init", first_pid)]
    first.reap()


def test_the_early_worker_starts_only_after_the_stray_is_swept(project: Project) -> None:
    events = _with_events(project)
    stray = project.hand_worker(f"stray@{HOST}")
    stray.wait_output(r"ready", 30)
    launched = project.launch("-v", "--grace", "10")
    pid = int(launched.wait_output(READY, 30).group(2))
    assert re.search(EARLY.replace(r"(\d+)", str(pid)), launched.output()), "adopted: the very early worker"
    seen = {(w, p): t for w, p, t in _events(events)}
    assert seen[("shutdown", stray.pid)] < seen[("init", pid)]
    launched.reap()


def test_the_census_follows_the_verdict_and_names_the_other_workers(project: Project) -> None:
    other = project.other_project("elsewhere")
    twins = [other.hand_worker(f"twin@{HOST}", cwd=other.root) for _ in range(2)]
    for twin in twins:
        twin.wait_output(r"ready", 30)
    launched = project.launch()
    ready = launched.wait_output(READY, 30)
    line = launched.wait_output(rf"also answering: twin@{re.escape(HOST)} .*DUPLICATE: 2 replies", 30)
    assert ready.start() < line.start()
    launched.wait_output(r"warning: 3 workers answer on this broker, expected 1", 10)
    launched.send(signal.SIGINT)
    assert launched.wait(20) == 0
    for twin in twins:
        twin.reap()


def test_nothing_before_the_early_spawn_imports_what_the_launch_path_does_not_need(project: Project) -> None:
    """What `tlrun dev` and `tlrun worker` import before they spawn their early workers is on the workers'
    critical path: Celery, kombu, redis-py, psutil, the stack step, doctor and the launch core's units wait
    until the workers import in parallel. Seen at the spawn itself, by an audit hook."""
    import json
    import subprocess
    import sys

    probe = (
        "import json, os, sys\n"
        "def hook(event, args):\n"
        "    if event == 'subprocess.Popen' and 'tlrun.launch._child' in list(map(str, args[1] or ())):\n"
        "        sys.stdout.write(json.dumps(sorted(sys.modules)))\n"
        "        sys.stdout.flush()\n"
        "        os._exit(0)\n"
        "    if event == 'socket.connect':  # no early spawn before the broker check: start nothing at all\n"
        "        os._exit(3)\n"
        "sys.addaudithook(hook)\n"
        "sys.argv = ['tlrun', *sys.argv[1:]]\n"
        "from tlrun.cli import main\n"
        "main()\n"
    )
    for command in ("dev", "worker"):
        done = subprocess.run(
            [sys.executable, "-c", probe, command, "-A", project.app],
            cwd=project.root,
            env=project.env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        loaded = set(json.loads(done.stdout))
        assert "tlrun.launch.early" in loaded  # the hook saw the early spawn, not some other Popen
        heavy = {"celery", "kombu", "redis", "psutil", "http.client", "tlrun.dev.stack", "tlrun.ops.doctor"}
        heavy |= {"tlrun.launch.units", "tlrun.launch.launcher", "tlrun.compose"}
        assert not loaded & heavy, sorted(loaded & heavy)
