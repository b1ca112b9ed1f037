"""Units and steps where features meet: roles x beat x reload x stop x debug, with real workers and Redis.

Each case watches the raw ping replies (never two workers of a role consuming, never none while the old code
could serve), sends a task that must run, and leaves nothing running (the project fixture checks)."""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
from collections import Counter
from typing import Any

import pytest

from helpers import Launched, Project, Supervisord, ping_replies, wait_for

pytestmark = pytest.mark.timeout(180)
HOST = socket.gethostname()
READY = r"tlrun: \d+ workers? ready: "

APP = """
import os
import time

from celery import Celery

VALUE = {value}

app = Celery("{name}", include=["{name}_tasks"])
app.conf.update(
    result_backend=os.environ.get("TEST_RESULT_BACKEND"),
    broker_connection_retry_on_startup=True,
    task_routes={{"{name}_tasks.slow": {{"queue": "slow"}}}},
)
app.conf.beat_schedule = {{"{tick}": {{"task": "{name}_tasks.tick", "schedule": 0.5}}}}


@app.task
def value():
    return VALUE
"""

TASKS = """
import time

from {name} import app

TASK_VALUE = {value}


@app.task
def task_value():
    return TASK_VALUE


@app.task
def slow(seconds):
    time.sleep(seconds)
    return seconds


@app.task
def tick():
    return "tick"
"""

ROLES = """
[tool.tlrun]
app = "{app}"
beat = {beat}
{roles}
"""


def write_code(project: Project, value: int, task_value: int | None = None, tick: str = "tick") -> None:
    (project.root / f"{project.app}.py").write_text(APP.format(name=project.app, value=value, tick=tick))
    tasks = TASKS.format(name=project.app, value=value if task_value is None else task_value)
    (project.root / f"{project.app}_tasks.py").write_text(tasks)


def write_roles(project: Project, roles: list[str], beat: bool = False) -> None:
    tables = "".join(
        f'\n[tool.tlrun.workers.{r}]\nqueues = ["{"celery" if r == "default" else r}"]\npool = "solo"\n' for r in roles
    )
    (project.root / "pyproject.toml").write_text(ROLES.format(app=project.app, beat=str(beat).lower(), roles=tables))


def _client(project: Project) -> Any:
    from helpers import client

    return client(project.broker_url)


def run_task(project: Project, name: str, *args: object, queue: str | None = None, timeout: float = 30) -> object:
    """Run a task of the project's task module (the test's client knows no routes: name the queue)."""
    return _client(project).send_task(f"{project.app}_tasks.{name}", args=args, queue=queue).get(timeout=timeout)


class Replies:
    """Polls the raw ping replies on a thread: the most replies any one node name had at once, per role."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.most: Counter[str] = Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Replies:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            per_role = Counter(re.sub(r"\d+(-\d+)?@.*", "", node) for node in ping_replies(self.url, timeout=0.3))
            for role, n in per_role.items():
                self.most[role] = max(self.most[role], n)
            self.samples += 1

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def dev(project: Project, *args: str) -> Launched:
    return project.launch(*args, command="dev", fast=False, app_arg=False)


# -- beat only where asked ------------------------------------------------------------------------------------
def test_tlrun_worker_never_starts_beat_on_its_own(project: Project) -> None:
    write_code(project, 1)
    write_roles(project, ["default", "slow"], beat=True)
    workers = project.launch("--role", "default", app_arg=False)
    workers.wait_output(READY, 60)
    other = project.launch("--role", "slow", app_arg=False)  # a second service of the same project
    other.wait_output(READY, 60)
    beat = project.launch(command="beat", app_arg=False)  # and beat as a service of its own
    beat.wait_output(r"tlrun: starting beat", 60)
    ps = json.loads(project.run("ps", "--json").stdout)
    assert Counter(row["kind"] for row in ps) == {"worker": 2, "beat": 1}, ps
    assert "starting beat" not in workers.output() + other.output()
    assert run_task(project, "task_value") == 1
    for launched in (beat, other, workers):
        launched.send(signal.SIGTERM)
        assert launched.wait(40) == 0, launched.output()[-4000:]


# -- reload: checked completely before anything stops ---------------------------------------------------------
@pytest.mark.parametrize("broken", ["app module", "task module"])
def test_a_save_that_does_not_import_keeps_the_old_worker_serving(project: Project, broken: str) -> None:
    write_code(project, 1)
    launched = dev(project, "--reload", "-A", project.app)
    launched.wait_output(READY, 60)
    with Replies(project.broker_url) as replies:
        target = project.root / (f"{project.app}_tasks.py" if broken == "task module" else f"{project.app}.py")
        target.write_text(target.read_text() + "\ndef broken(:\n")
        match = launched.wait_output(r"reload failed: (.*)", 60)
        assert f"{target.name}, line" in match.group(1), match.group(1)
        assert "keeps running the previous code" in match.group(1)
        assert run_task(project, "task_value") == 1  # the old worker still serves
        write_code(project, 2)
        launched.wait_output(r"reloaded: ", 60)
        assert run_task(project, "task_value") == 2
    assert replies.most["api"] == 1 and replies.samples > 3
    launched.send(signal.SIGINT)
    assert launched.wait(30) == 0


def test_a_first_start_that_does_not_import_waits_for_a_good_save_and_says_so(project: Project) -> None:
    write_code(project, 1)
    write_roles(project, ["default"])
    tasks = project.root / f"{project.app}_tasks.py"
    tasks.write_text(tasks.read_text() + "\ndef broken(:\n")
    launched = dev(project, "--reload")
    launched.wait_output(r"fix it and save", 60)
    ps = project.run("ps")
    assert "waiting for a good save" in ps.stdout, ps.stdout
    health = project.run("health")
    assert health.returncode == 15 and "waits for a good save" in health.stdout, health.stdout
    doctor = json.loads(project.run("doctor", "--json").stdout)
    missing = next(f for f in doctor["findings"] if f["code"] == "ROLE_MISSING")
    assert "waits for a good save" in missing["message"] and "tlrun worker" not in missing["fix"], missing
    write_code(project, 3)
    launched.wait_output(r"reloaded: ", 60)
    assert run_task(project, "task_value") == 3
    launched.send(signal.SIGINT)
    assert launched.wait(30) == 0


# -- reload: each role on its own; beat too -------------------------------------------------------------------
def test_a_busy_role_does_not_hold_up_the_others_and_beat_reloads(project: Project) -> None:
    write_code(project, 1)
    write_roles(project, ["default", "slow", "other"], beat=True)
    launched = dev(project, "--reload")
    launched.wait_output(r"3 workers ready", 60)
    launched.wait_output(r"beat lease taken|starting beat", 30)
    busy = _client(project).send_task(f"{project.app}_tasks.slow", args=(6,), queue="slow")
    launched.wait_output(r"\[slow\d+\] .*slow\[\S+\] received", 20)
    with Replies(project.broker_url) as replies:
        write_code(project, 2, tick="tock")
        # default and other swap while slow's task runs; slow follows once its task has finished.
        first = launched.wait_output(r"reloaded: .*new worker (\S+) ", 30)
        assert not first.group(1).startswith("slow")
        assert busy.ready() is False
        assert run_task(project, "task_value") == 2
        assert busy.get(timeout=30) == 6  # not killed by the reload
        wait_for(lambda: launched.output().count("reloaded:") == 3, 30, "all three roles reloaded")
    assert max(replies.most.values()) == 1, replies.most
    assert launched.output().count("starting beat") >= 2  # beat restarted with the new code ...
    wait_for(lambda: "Sending due task tock" in launched.output(), 30, "the new schedule to fire")
    assert run_task(project, "task_value", queue="slow") == 2
    launched.send(signal.SIGINT)
    assert launched.wait(40) == 0


# -- stop --role ---------------------------------------------------------------------------------------------
def test_stop_role_stops_that_unit_only(project: Project) -> None:
    write_code(project, 1)
    write_roles(project, ["default", "slow"])
    launched = project.launch(app_arg=False)
    launched.wait_output(r"2 workers ready", 60)
    stop = project.run("stop", "--role", "slow")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert re.search(rf"stopped slow\d+@{re.escape(HOST)} \(worker-slow\) of launcher pid {launched.pid}", stop.stdout)
    assert launched.proc.poll() is None
    nodes = ping_replies(project.broker_url)
    assert [n.split("@")[0].rstrip("0123456789") for n in nodes] == ["default"], nodes
    assert run_task(project, "task_value") == 1
    again = project.launch("--role", "slow", app_arg=False)  # its lock was released
    again.wait_output(READY, 60)
    assert run_task(project, "task_value", queue="slow") == 1
    launched.send(signal.SIGTERM)
    again.send(signal.SIGTERM)
    assert launched.wait(30) == 0 and again.wait(30) == 0


# -- tlrun reload: one role, and tlrun dev's in-place swap --------------------------------------------------------
def _pids(project: Project) -> dict[str, int]:
    rows = json.loads(project.run("ps", "--json").stdout)
    return {r["node"]: r["pid"] for r in rows if r.get("kind") == "worker" and r.get("node")}


def test_reload_role_swaps_that_role_only_beside_the_old_one(project: Project) -> None:
    write_code(project, 1)
    write_roles(project, ["default", "slow"])
    launched = project.launch(app_arg=False)
    launched.wait_output(r"2 workers ready", 60)
    before = _pids(project)
    default = next(n for n in before if n.startswith("default"))
    slow = next(n for n in before if n.startswith("slow"))
    write_code(project, 1, task_value=2)
    with Replies(project.broker_url) as replies:
        done = project.run("reload", "--role", "slow")
        assert done.returncode == 0, done.stdout + done.stderr
        assert re.search(r"role slow of launcher pid \d+ reloaded: slow\d+-2@", done.stdout), done.stdout
        assert "role default" not in done.stdout
        wait_for(lambda: slow not in ping_replies(project.broker_url), 30, "the old slow worker to stop")
    assert replies.most["slow"] <= 2 and replies.most["default"] == 1  # the two generations, never one name twice
    after = _pids(project)
    assert after[default] == before[default]  # the other role was not touched
    assert slow not in after and any(n.startswith("slow") and "-2@" in n for n in after)
    assert run_task(project, "task_value", queue="slow") == 2
    assert run_task(project, "task_value") == 1  # default still runs the code it imported
    launched.send(signal.SIGTERM)
    assert launched.wait(30) == 0


def test_reload_asks_dev_for_an_in_place_swap(project: Project) -> None:
    write_code(project, 1)
    write_roles(project, ["default"])
    launched = dev(project)  # no --reload: `tlrun reload` is the only trigger
    launched.wait_output(READY, 60)
    nodes = ping_replies(project.broker_url)
    write_code(project, 1, task_value=5)
    done = project.run("reload")
    assert done.returncode == 0, done.stdout + done.stderr
    assert ping_replies(project.broker_url) == nodes  # dev keeps its node name
    assert run_task(project, "task_value") == 5
    launched.send(signal.SIGINT)
    assert launched.wait(30) in (0, 130)


# -- debug mode with roles; per-role counts ----------------------------------------------------------------------
def test_debug_worker_counts_for_every_role_it_serves(project: Project) -> None:
    write_code(project, 1)
    write_roles(project, ["default", "slow"])
    launched = dev(project, "--debug")
    launched.wait_output(READY, 60)
    doctor = project.run("doctor", "--json")
    codes = [f["code"] for f in json.loads(doctor.stdout)["findings"]]
    assert "ROLE_MISSING" not in codes, doctor.stdout
    assert run_task(project, "task_value", queue="slow") == 1
    launched.send(signal.SIGINT)
    assert launched.wait(30) == 0


def test_expected_counts_are_per_role(project: Project) -> None:
    write_code(project, 1)
    write_roles(project, ["default", "slow"])
    default = project.launch("--role", "default", "--strict", app_arg=False)
    default.wait_output(r"worker ready: .*\(roles: default 1 of 1\)", 60)
    slow = project.launch("--role", "slow", "--strict", app_arg=False)
    slow.wait_output(r"workers? ready: .*\(roles: slow 1 of 1\)", 60)
    assert "answer on this broker" not in default.output() + slow.output()
    for launched in (default, slow):
        launched.send(signal.SIGTERM)
        assert launched.wait(30) == 0


# -- a requested stop ends 0 when nothing was cut short ---------------------------------------------------------
SLOW_SHUTDOWN = """

from celery.signals import worker_shutdown


@worker_shutdown.connect
def _slow_shutdown(**_kwargs):
    time.sleep(3.5)  # an idle worker whose warm shutdown is merely slow (a loaded machine)
"""


def test_an_idle_worker_whose_stop_is_slow_is_not_cold_stopped(project: Project) -> None:
    write_code(project, 1)
    app = project.root / f"{project.app}.py"
    app.write_text(app.read_text() + SLOW_SHUTDOWN)
    # Solo pool: its own stop takes well under a second, so the 3.5 s hook decides when it ends (4-5 s):
    # after the requeue request (3 s before the 6 s grace ends), before the SIGKILL.
    launched = project.launch("--grace", "6", "--pool", "solo")
    launched.wait_output(READY, 60)
    launched.send(signal.SIGTERM)
    assert launched.wait(30) == 0, launched.output()[-2000:]
    out = launched.output()
    assert "still stopping 3 s before the deadline" in out
    assert "no task running near the deadline: the warm shutdown goes on" in out
    assert "Cold shutdown" not in out


SLOW_POOL_EXIT = """

from celery.signals import worker_process_shutdown


@worker_process_shutdown.connect
def _slow_child_exit(**_kwargs):
    time.sleep(10)  # a pool process slow to go (a loaded machine, a hook of the project's): it holds no task
"""


def test_an_idle_prefork_worker_slow_to_stop_ends_0_before_the_deadline(project: Project) -> None:
    """Idle prefork children that keep a warm shutdown waiting past the requeue request are stopped then
    (they hold no task), so the worker ends with status 0 instead of being SIGKILLed at the deadline."""
    write_code(project, 1)
    app = project.root / f"{project.app}.py"
    app.write_text(app.read_text() + SLOW_POOL_EXIT)
    launched = project.launch("--grace", "6", "--pool", "prefork", "--concurrency", "2")
    launched.wait_output(READY, 60)
    launched.send(signal.SIGTERM)
    assert launched.wait(30) == 0, launched.output()[-2000:]
    out = launched.output()
    assert "no task running near the deadline: the warm shutdown goes on (2 idle pool process(es) stopped" in out
    assert re.search(r"stopped \(status 0\)", out), out[-2000:]


# -- the exported services of a project with roles and beat run together under supervisord ---------------------
def test_exported_roles_and_beat_all_run_under_supervisord(project: Project) -> None:
    import subprocess

    write_code(project, 1)
    write_roles(project, ["default", "slow"], beat=True)
    sv = Supervisord(project, "--grace", "20")
    ctl = sv.ctl

    def status() -> dict[str, str]:
        out = subprocess.run([*ctl, "status"], capture_output=True, text=True, timeout=30).stdout
        return {line.split()[0]: line.split()[1] for line in out.splitlines() if line.strip()}

    def uptime_over(seconds: int) -> bool:
        out = subprocess.run([*ctl, "status"], capture_output=True, text=True, timeout=30).stdout
        ups = re.findall(r"RUNNING .*uptime (\d+):(\d+):(\d+)", out)
        return len(ups) == 3 and all(int(h) * 3600 + int(m) * 60 + int(s) >= seconds for h, m, s in ups)

    try:
        wait_for(lambda: len(status()) == 3, 30, "three programs")
        wait_for(lambda: uptime_over(20), 60, "every program RUNNING for 20 s")  # losers would have exited 6
        assert set(status().values()) == {"RUNNING"}, status()
        group = f"tlrun-{project.app}"
        assert all(name.startswith(f"{group}:") for name in status()), status()  # the project's group
        busy = _client(project).send_task(f"{project.app}_tasks.slow", args=(3,), queue="slow")
        wait_for(lambda: "slow[" in "".join(p.read_text() for p in project.root.glob("logs/*.log")), 20, "the task")
        stop = subprocess.run([*ctl, "stop", f"{group}:*"], capture_output=True, text=True, timeout=60)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert busy.get(timeout=10) == 3  # finished during the warm stop, not killed
    finally:
        sv.shutdown()


# -- the combination matrix: roles {1, 3} x beat {off, on}, one launcher through every kind of save and stop ------
def _answers(project: Project, value: int, queues: list[str]) -> None:
    for queue in queues:
        assert run_task(project, "task_value", queue=queue) == value, queue


@pytest.mark.parametrize("beat", [False, True], ids=["no-beat", "beat"])
@pytest.mark.parametrize("roles", [["default"], ["default", "slow", "other"]], ids=["1-role", "3-roles"])
def test_matrix_of_saves_and_stops(project: Project, roles: list[str], beat: bool) -> None:
    queues = ["celery" if r == "default" else r for r in roles]
    write_code(project, 1)
    write_roles(project, roles, beat=beat)
    launched = dev(project, "--reload")
    launched.wait_output(READY, 60)
    if beat:
        launched.wait_output(r"tlrun: starting beat", 30)
    reloads = 0

    def reloaded_all() -> None:
        nonlocal reloads
        reloads += len(roles)
        wait_for(lambda: launched.output().count("reloaded:") >= reloads, 60, f"{reloads} role reloads")

    with Replies(project.broker_url) as replies:
        write_code(project, 2)  # a good save
        reloaded_all()
        _answers(project, 2, queues)
        app = project.root / f"{project.app}.py"
        app.write_text(app.read_text() + "\ndef broken(:\n")  # the app module breaks
        wait_for(lambda: launched.output().count("reload failed:") == 1, 60, "the first failed reload")
        _answers(project, 2, queues)
        write_code(project, 2, task_value=2)
        tasks = project.root / f"{project.app}_tasks.py"
        tasks.write_text(tasks.read_text() + "\ndef broken(:\n")  # a task module (include=) breaks
        wait_for(lambda: launched.output().count("reload failed:") == 2, 60, "the second failed reload")
        assert f"{tasks.name}, line" in launched.output().split("reload failed:")[-1]
        _answers(project, 2, queues)
        busy_queue = queues[-1]  # a save while one role runs a task: it finishes, then that role swaps
        busy = _client(project).send_task(f"{project.app}_tasks.slow", args=(3,), queue=busy_queue)
        launched.wait_output(rf"slow\[{busy.id}\] received", 20)
        write_code(project, 3)
        reloaded_all()
        assert busy.get(timeout=30) == 3
        _answers(project, 3, queues)
        if len(roles) > 1:
            stop = project.run("stop", "--role", roles[1])
            assert stop.returncode == 0 and "which runs on" in stop.stdout, stop.stdout + stop.stderr
            _answers(project, 3, [q for q in queues if q != queues[1]])
    assert max(replies.most.values()) == 1 and replies.samples > 10, replies.most
    if beat:
        assert launched.output().count("tlrun: starting beat") >= 3  # beat followed every good save
    launched.send(signal.SIGINT)
    assert launched.wait(40) == 0
    assert ping_replies(project.broker_url) == []


def test_django_autodiscovered_task_module_that_breaks_keeps_the_old_workers(project: Project) -> None:
    pytest.importorskip("django")
    from test_project import _django_project

    proj, pkg, shop = _django_project(project.base / "dj", project.broker_url)
    (proj.root / "pyproject.toml").write_text(
        f'[tool.tlrun]\napp = "{pkg}.celery"\nbeat = true\n'
        '[tool.tlrun.workers.default]\nqueues = ["celery"]\npool = "solo"\n'
        '[tool.tlrun.workers.reports]\nqueues = ["reports"]\npool = "solo"\n'
    )
    try:
        launched = proj.launch("--reload", command="dev", fast=False, app_arg=False)
        launched.wait_output(r"2 workers ready", 60)
        where = f"{shop}.tasks.where"
        assert _client(proj).send_task(where).get(timeout=20).startswith("default")
        tasks = proj.root / shop / "tasks.py"
        good = tasks.read_text()
        tasks.write_text(good + "\ndef broken(:\n")  # found only by autodiscover_tasks() at worker start
        match = launched.wait_output(r"reload failed: (.*)", 60)
        assert f"{shop}/tasks.py, line" in match.group(1) and "2 workers keep running" in match.group(1)
        assert _client(proj).send_task(where).get(timeout=20).startswith("default")
        tasks.write_text(good.replace("return self.request.hostname", "return 'new:' + self.request.hostname", 1))
        wait_for(lambda: launched.output().count("reloaded:") >= 2, 60, "both roles reloaded")
        assert _client(proj).send_task(where).get(timeout=20).startswith("new:default")
        launched.send(signal.SIGINT)
        assert launched.wait(40) == 0
    finally:
        proj.cleanup()
