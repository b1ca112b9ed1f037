"""Across hosts: one beat per cluster through a broker lease. Hosts are simulated on this machine with real
processes, each in its own UTS namespace (its own host name) with its own runtime directory, all on one
broker on loopback."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest

from helpers import PY, Launched, Project, RedisServer, wait_for
from tlrun.cluster.backends import AmqpLease, RedisLease
from tlrun.cluster.lease import UNKNOWN, BeatLease, Holder

pytestmark = pytest.mark.timeout(150)
TTL = 3.0
BEAT_APP = """
import os

from celery import Celery

app = Celery("{name}")
app.conf.update(broker_connection_retry_on_startup=True)
app.conf.beat_schedule = {{"tick": {{"task": "{name}.tick", "schedule": 0.5}}}}


@app.task
def tick():
    return True
"""
READY_RE = r"tlrun: \d+ workers? ready: (\S+) \(pid (\d+)\)"
SENDING = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): INFO/MainProcess\] Scheduler: Sending due task", re.M)


# -- the state machine, without a broker or a clock ---------------------------------------------------------
class FakeBackend:
    def __init__(self) -> None:
        self.holder: Holder | None = None
        self.down = False
        self.released: list[Holder] = []

    def acquire(self, holder: Holder, ttl: float) -> Holder | None:
        if self.down:
            raise OSError("connection refused")
        if self.holder is None or self.holder == holder:
            self.holder = holder
            return None
        return self.holder

    def renew(self, holder: Holder, ttl: float) -> bool:
        if self.down:
            raise OSError("connection refused")
        return self.holder == holder

    def release(self, holder: Holder) -> None:
        self.released.append(holder)
        if self.holder == holder:
            self.holder = None

    def current(self) -> Holder | None:
        return self.holder

    def close(self) -> None:
        pass


def test_a_standby_names_the_holder_once_and_takes_over_when_it_is_gone() -> None:
    backend = FakeBackend()
    a = BeatLease(backend, Holder("hostA", 1, "a", 0.0), 30.0, rng=lambda: 0.5)
    b = BeatLease(backend, Holder("hostB", 2, "b", 0.0), 30.0, rng=lambda: 0.5)
    assert a.tick(0.0).action == "start"
    first = b.tick(0.0)
    assert first.action == "standby" and first.message is not None and "beat held by hostA pid 1" in first.message
    assert b.tick(10.0).message is None  # said once
    a.release()
    assert b.tick(20.0).action == "start"


def test_a_holder_cut_off_stops_its_beat_before_the_lease_can_expire() -> None:
    backend = FakeBackend()
    lease = BeatLease(backend, Holder("hostA", 1, "a", 0.0), 30.0)
    assert lease.tick(0.0).action == "start"
    assert lease.tick(10.0).action == "none"  # renewed at 10
    backend.down = True
    now, change = 10.0, lease.tick(20.0)
    now = 20.0
    while change.action != "stop":
        assert now < 10.0 + 30.0 - lease.margin + 1.0
        now += 0.5
        change = lease.tick(now)
    assert now < 10.0 + 30.0  # before the broker would expire the lease renewed at 10
    assert change.message is not None and "stopping beat" in change.message


def test_a_lease_taken_by_another_host_is_given_up() -> None:
    backend = FakeBackend()
    lease = BeatLease(backend, Holder("hostA", 1, "a", 0.0), 30.0)
    lease.tick(0.0)
    backend.holder = Holder("hostB", 2, "b", 0.0)  # ours expired and B took it
    change = lease.tick(10.0)
    assert change.action == "stop" and not lease.held


def test_holder_encoding_round_trips_and_junk_is_unknown() -> None:
    holder = Holder("host.example", 4242, "ab12", 1_800_000_000.0)
    assert Holder.decode(holder.encode()) == holder
    assert Holder.decode(b"nonsense") is None
    assert holder.describe() == "host.example pid 4242 since 2027-01-15T08:00:00+00:00"
    assert UNKNOWN.pid == 0


# -- a real Redis --------------------------------------------------------------------------------------------
def test_redis_lease_is_exclusive_renewable_and_released_only_by_its_holder(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    a = RedisLease(server.url(), "app:proj")
    b = RedisLease(server.url(), "app:proj")
    try:
        ha, hb = Holder("hostA", 1, "a", 0.0), Holder("hostB", 2, "b", 0.0)
        assert a.acquire(ha, 5.0) is None
        assert b.acquire(hb, 5.0) == ha
        assert not b.renew(hb, 5.0) and a.renew(ha, 5.0)
        b.release(hb)  # not its lease: nothing happens
        assert b.current() == ha
        a.release(ha)
        assert b.current() is None and b.acquire(hb, 5.0) is None
    finally:
        a.close()
        b.close()
        server.stop()


def test_amqp_lease_is_an_exclusive_queue_that_names_its_holder(amqp_vhost: str) -> None:
    a = AmqpLease(amqp_vhost, "app:proj", 5.0)
    b = AmqpLease(amqp_vhost, "app:proj", 5.0)
    try:
        ha, hb = Holder("hostA", 1, "a", 1_800_000_000.0), Holder("hostB", 2, "b", 0.0)
        assert b.current() is None
        assert a.acquire(ha, 5.0) is None
        assert b.acquire(hb, 5.0) == ha  # RESOURCE_LOCKED, and the holder's note says who
        assert b.current() == ha  # peeking leaves the note in place
        assert a.renew(ha, 5.0)
        a.release(ha)  # the connection closes: the queue goes with it
        assert wait_for(lambda: b.acquire(hb, 5.0) is None, 10, "B takes the lease")
        assert a.current() == hb
    finally:
        a.close()
        b.close()


# -- simulated hosts -------------------------------------------------------------------------------------------
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a UTS namespace of its own needs root")


def on_host(
    project: Project,
    host: str,
    *args: str,
    env: dict[str, str] | None = None,
    argv: list[str] | None = None,
    cwd: Path | None = None,
    ttl: float = TTL,
) -> Launched:
    """`tlrun beat` (or `argv`) as if on another host: its own host name (UTS namespace) and runtime directory."""
    runtime = project.base / f"run-{host}"
    runtime.mkdir(mode=0o700, exist_ok=True)
    command = argv or [PY, "-m", "tlrun", "beat", "-A", project.app, *args]
    tlrun = " ".join(shlex.quote(a) for a in command)
    argv = ["unshare", "--uts", "sh", "-c", f"hostname {host} && exec {tlrun}"]
    environ = {**(env or project.env()), "XDG_RUNTIME_DIR": str(runtime), "TLRUN_BEAT_LOCK_TTL": f"{ttl:g}"}
    launched = Launched(argv, cwd or project.root, environ, project.base / f"out-{host}-{len(project.started)}.txt")
    project.started.append(launched)
    return launched


def run_as(project: Project, host: str, *args: str, near: Launched | None = None) -> subprocess.CompletedProcess[str]:
    """A one-shot tlrun command as seen from a simulated host (its host name, its runtime directory); with
    `near`, inside that launcher's own UTS namespace, where its processes are this host's."""
    runtime = project.base / f"run-{host}"
    runtime.mkdir(mode=0o700, exist_ok=True)
    tlrun = " ".join(shlex.quote(a) for a in [PY, "-m", "tlrun", *args])
    enter = ["nsenter", "--target", str(near.pid), "--uts"] if near is not None else ["unshare", "--uts"]
    return subprocess.run(
        [*enter, "sh", "-c", f"hostname {host} && exec {tlrun}"],
        cwd=project.root,
        env={**project.env(), "XDG_RUNTIME_DIR": str(runtime)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def sends(project: Project, launched: Launched) -> list[datetime]:
    """The times at which this launcher's beat sent a task (from its log file)."""
    logs = list((project.root / "logs").glob(f"celery_beat_{launched.pid}.log"))
    stamps = SENDING.findall(logs[0].read_text()) if logs else []
    return [datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f") for s in stamps]


@pytest.fixture
def beat_project(project: Project) -> Project:
    (project.root / f"{project.app}.py").write_text(BEAT_APP.format(name=project.app))
    return project


@pytest.fixture(params=["redis", "amqp"])
def any_broker_project(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Project]:
    """A beat project on a private Redis, or on a throwaway vhost of the local RabbitMQ."""
    if request.param == "redis":
        yield request.getfixturevalue("beat_project")
        return
    url = request.getfixturevalue("amqp_vhost")
    proj = Project(tmp_path / "amqp-projects", url)
    (proj.root / f"{proj.app}.py").write_text(BEAT_APP.format(name=proj.app))
    try:
        yield proj
    finally:
        proj.cleanup()


@needs_root
def test_two_hosts_one_beat_then_the_standby_takes_over_after_a_sigkill(any_broker_project: Project) -> None:
    proj = any_broker_project
    a = on_host(proj, "hostA")
    a_beat = int(a.wait_output(r"starting beat \(pid (\d+)\)", 30).group(1))
    a.wait_output(rf"beat lease taken \(hostA pid {a_beat},", 30)  # the beat process holds it, not its launcher
    b = on_host(proj, "hostB")
    b_beat = int(b.wait_output(r"starting beat \(pid (\d+)\)", 30).group(1))  # warm: imported, fenced
    b.wait_output(rf"beat held by hostA pid {a_beat} since \S+; standing by", 30)
    wait_for(lambda: len(sends(proj, a)) >= 4, 20, "hostA's beat sending ticks")
    assert sends(proj, b) == []  # B's beat runs, and its fence lets nothing out
    # What B's host sees: its beat standing by, and who holds the lease.
    ps = run_as(proj, "hostB", "ps", "-A", proj.app, "--json", near=b)
    rows = [r for r in json.loads(ps.stdout) if r["kind"] == "beat"]
    assert [(r["state"], r["pid"]) for r in rows] == [("standby", b_beat)], ps.stdout + ps.stderr
    doctor = json.loads(run_as(proj, "hostB", "doctor", "-A", proj.app, "--json", near=b).stdout)
    assert doctor["beat_lease"].startswith("hostA pid ")
    assert not [f for f in doctor["findings"] if f["code"] in ("BEAT_WITHOUT_LEASE", "MULTIPLE_BEATS")]
    a.send(signal.SIGKILL)
    a.wait(5)
    killed = datetime.now()
    b.wait_output(rf"beat lease taken \(hostB pid {b_beat},", TTL + 10)
    wait_for(lambda: sends(proj, b), 20, "hostB's beat sending ticks")
    taken = (datetime.now() - killed).total_seconds()
    assert taken < TTL + TTL / 3 + 1 + 0.5  # ttl + a renewal interval + 1 s, plus one 0.5 s schedule
    # No tick twice: every send of B's beat comes after the last one of A's.
    assert max(sends(proj, a)) < min(sends(proj, b))
    # The lease's `since` is when B took it, not when B's launcher started.
    lease = json.loads(run_as(proj, "hostB", "doctor", "-A", proj.app, "--json", near=b).stdout)["beat_lease"]
    since = datetime.fromisoformat(lease.rsplit(" since ", 1)[1]).astimezone().replace(tzinfo=None)
    assert since >= killed.replace(microsecond=0), (lease, killed)
    b.send(signal.SIGTERM)
    assert b.wait(30) == 0
    if not proj.broker_url.startswith("redis"):  # nothing of the lease stays in the vhost
        vhost = proj.broker_url.rsplit("/", 1)[1]
        queues = subprocess.run(
            ["rabbitmqctl", "list_queues", "-p", vhost, "-q", "name"], capture_output=True, text=True, timeout=60
        ).stdout
        assert "beat-lease" not in queues, queues


def _ticks_ok(a: list[datetime], b: list[datetime], broker_url: str) -> None:
    """Never two beats sending: all of A's sends before B's first; and no gap longer than the takeover's
    bound. Redis: ttl + a renewal interval + 1 s, plus the 0.5 s schedule. RabbitMQ: the lease of a paused
    (not dead) holder passes when the broker gives up on its connection's heartbeats (heartbeat = ttl; about
    2-3 heartbeats, 8.5 s measured with ttl 3); the holder's fence closed long before (ttl minus the margin
    after its last renewal): slower, never two beats."""
    assert a and b, (a, b)
    assert max(a) < min(b), (a, b)
    gap = (min(b) - max(a)).total_seconds()
    bound = TTL + TTL / 3 + 1 + 0.5 if broker_url.startswith("redis") else 4 * TTL
    assert gap < bound, gap


@needs_root
def test_a_paused_launcher_does_not_matter_its_beat_holds_the_lease(any_broker_project: Project) -> None:
    proj = any_broker_project
    a = on_host(proj, "hostA")
    a.wait_output(r"beat lease taken \(hostA pid", 30)
    b = on_host(proj, "hostB")
    b.wait_output(r"beat held by hostA pid \d+ since \S+; standing by", 30)
    a.send(signal.SIGSTOP)  # a paused VM, a laptop lid, Ctrl-Z in a terminal: the launcher only
    try:
        paused_at = datetime.now()
        _sleep_through(3 * TTL)
    finally:
        a.send(signal.SIGCONT)
    resumed_at = datetime.now()
    # The launcher relays its beat's lines in order: a send after the resume means every send of the paused
    # time is in the log file too (the relay catches up on the pipe's backlog first).
    wait_for(lambda: any(t > resumed_at for t in sends(proj, a)), 15, "A's sends, relayed after the pause")
    assert sends(proj, b) == [], "B's beat sent while A's beat held the lease"
    during = [t for t in sends(proj, a) if t > paused_at]
    assert len(during) >= 2 * TTL, during  # A's beat went on every 0.5 s: its launcher holds nothing


@needs_root
def test_a_paused_beat_resumed_after_the_takeover_sends_nothing(any_broker_project: Project) -> None:
    proj = any_broker_project
    a = on_host(proj, "hostA")
    a_beat = psutil.Process(int(a.wait_output(r"starting beat \(pid (\d+)\)", 30).group(1)))
    a.wait_output(r"beat lease taken \(hostA pid", 30)
    b = on_host(proj, "hostB")
    b.wait_output(r"beat held by hostA pid \d+ since \S+; standing by", 30)
    wait_for(lambda: len(sends(proj, a)) >= 2, 20, "hostA's beat sending ticks")
    a_beat.send_signal(signal.SIGSTOP)  # the beat itself: its lease's thread stops with it
    try:
        b.wait_output(r"beat lease taken \(hostB pid", 3 * TTL + 10)
        wait_for(lambda: len(sends(proj, b)) >= 2, 20, "hostB's beat sending ticks")
    finally:
        a_beat.send_signal(signal.SIGCONT)
    # A's beat wakes up past its lease: it stops without sending, and a standby takes its place.
    a.wait_output(r"beat stopped: it lost the lease; a standby beat waits for it", 20)
    wait_for(lambda: len(sends(proj, b)) >= 6, 20, "hostB's beat going on")
    _ticks_ok(sends(proj, a), sends(proj, b), proj.broker_url)


def _sleep_through(seconds: float) -> None:
    """Let real time pass while a process is paused (what the test measures is that time itself)."""
    import time

    time.sleep(seconds)


SLOW_PUBLISH_APP = (
    BEAT_APP
    + """

import time
from celery.signals import before_task_publish


@before_task_publish.connect
def _slow(**_kwargs):
    # The tick's send is about to LPUSH: the broker holds every write for 0.6 s, so the beat waits in the
    # socket read of the LPUSH's reply, where the stop signal lands (where a real broker's latency puts it).
    import redis

    r = redis.Redis.from_url(os.environ["CELERY_BROKER_URL"])
    r.execute_command("CLIENT", "PAUSE", "600", "WRITE")
    r.close()
    open(os.environ["TEST_PUBLISHING"], "a").close()
"""
)


def test_a_stop_during_a_ticks_send_lets_the_tick_finish_and_beat_exit_cleanly(project: Project) -> None:
    """Celery's own SIGTERM handler saves the schedule inside the handler and closes its shelf under a tick
    that is sending: the tick fails and beat exits 1. tlrun's beat keeps the signal until the tick returns."""
    (project.root / f"{project.app}.py").write_text(SLOW_PUBLISH_APP.format(name=project.app))
    marker = project.base / "publishing"
    launched = project.launch(command="beat", env=project.env(TEST_PUBLISHING=str(marker)))
    wait_for(marker.exists, 30, "a tick's send to begin")
    _sleep_through(0.2)  # into the 0.6 s the broker holds the LPUSH (a window observed, not a synchronisation)
    launched.send(signal.SIGTERM)
    assert launched.wait(30) == 0, launched.output()
    out = launched.output()
    assert "closed shelf" not in out and "I/O operation on closed file" not in out
    assert "beat stopped (status 0)" in out


@needs_root
def test_a_holder_cut_off_from_redis_stops_its_beat_before_the_lease_expires(
    beat_project: Project, redis_server: RedisServer
) -> None:
    proj = beat_project
    a = on_host(proj, "hostA")
    a.wait_output(r"beat lease taken", 30)
    beat = psutil.Process(int(a.wait_output(r"starting beat \(pid (\d+)\)", 10).group(1)))
    redis_server.stop()
    a.wait_output(r"cannot renew the beat lease .* stopping beat before the lease can pass to another host", TTL + 10)
    # Stopped within the lease's ttl after the last renewal (the test cannot know that instant: TTL from now
    # is an upper bound, and the broker could not let anyone take the lease before it).
    wait_for(lambda: not beat.is_running() or beat.status() == psutil.STATUS_ZOMBIE, TTL, "beat stopped")
    redis_server.restart()
    wait_for(lambda: a.output().count("beat: Starting...") == 2, TTL + 20, "beat started again with the lease")

    # Celery beat's SIGTERM handler saves the schedule from inside the handler: landing in a tick's publish
    # (the first one after a start connects to the broker) it closes the shelf under the tick, and beat exits
    # 1 (seen once on a fresh clone). Stop it right after a tick's message reached Redis (nothing consumes
    # it here), in the 0.5 s before the next tick.
    import redis

    client = redis.Redis.from_url(proj.broker_url)
    try:
        sent = wait_for(lambda: client.llen("celery"), 30, "a task sent by the restarted beat")
        wait_for(lambda: client.llen("celery") > sent, 10, "the next tick's message", interval=0.01)
    finally:
        client.close()
    a.send(signal.SIGTERM)
    assert a.wait(30) == 0


def test_doctor_reports_a_beat_running_without_the_lease(beat_project: Project) -> None:
    proj = beat_project
    launched = proj.launch(command="beat", env=proj.env(TLRUN_BEAT_LOCK_TTL=f"{TTL:g}"))
    launched.wait_output(r"beat lease taken", 30)
    launched.wait_output(r"starting beat \(pid (\d+)\)", 10)
    hand = Launched(
        [PY, "-m", "celery", "-A", proj.app, "beat", "-s", str(proj.base / "hand-schedule")],
        proj.root,
        proj.env(),
        proj.base / "hand-beat.txt",
    )
    proj.started.append(hand)
    hand.wait_output("maxinterval", 30)
    result = proj.run("doctor", "-A", proj.app, "--json")
    report = json.loads(result.stdout)
    without = [f for f in report["findings"] if f["code"] == "BEAT_WITHOUT_LEASE"]
    assert [f"beat pid {hand.pid} runs here without" in f["message"] for f in without] == [True], without
    assert result.returncode == 9


@needs_root
def test_doctor_cluster_groups_three_hosts_and_finds_a_duplicate_across_two(beat_project: Project) -> None:
    proj = beat_project
    fast = ["--without-mingle", "--without-gossip"]
    tlrun_worker = proj.tlrun_argv("worker", "--pool", "solo", "--", *fast, fast=False)
    workers = {h: on_host(proj, h, argv=tlrun_worker) for h in ("hostA", "hostB", "hostC")}
    beat = on_host(proj, "hostA")
    # Two hand-started workers with one name on two hosts (from another checkout: no sweep of ours matches).
    other = proj.other_project("elsewhere")
    (other.root / f"{proj.app}.py").write_text(BEAT_APP.format(name=proj.app))
    twin = [PY, "-m", "celery", "-A", proj.app, "worker", "-n", "twin@shared", "-P", "solo", "-l", "info", *fast]
    twins = [on_host(proj, h, argv=twin, cwd=other.root) for h in ("hostB", "hostC")]
    nodes = {h: w.wait_output(READY_RE, 30).group(1) for h, w in workers.items()}
    for t in twins:
        t.wait_output("ready", 30)
    beat.wait_output("beat lease taken", 30)
    result = proj.run("doctor", "-A", proj.app, "--cluster", "--json")
    view = json.loads(result.stdout)
    assert result.returncode == 9, result.stdout + result.stderr
    assert sorted(view["hosts"]) == ["hostA", "hostB", "hostC", "shared"]
    for host, node in nodes.items():
        assert view["hosts"][host] == [
            {"name": node, "host": host, "replies": 1, "role": "default", "queues": ["celery"]}
        ]
    assert view["hosts"]["shared"][0]["replies"] == 2 and view["duplicates"] == ["twin@shared"]
    assert view["beat_lease_host"] == "hostA" and view["beat_lease"].startswith("hostA pid ")
    human = proj.run("doctor", "-A", proj.app, "--cluster")
    assert "hostA  (holds the beat lease)" in human.stdout
    assert "twin@shared" in human.stdout and "DUPLICATE: 2 replies" in human.stdout


# -- node names claimed on the broker -----------------------------------------------------------------------
@pytest.fixture(params=["redis", "amqp"])
def broker_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "amqp":
        yield request.getfixturevalue("amqp_vhost")
        return
    server = RedisServer(tmp_path / "redis")
    try:
        yield server.url()
    finally:
        server.stop()


def test_a_node_name_is_claimed_once_renamed_when_taken_and_released_at_the_end(broker_url: str) -> None:
    """Two launchers that pick the same name at the same instant (same host name and pid: clones, containers
    with a fixed host name): the census cannot see the other (neither answers yet); the broker's claim can."""
    from types import SimpleNamespace

    from tlrun.cluster.names import NodeClaimStep
    from tlrun.config import Role, WorkerOptions
    from tlrun.launch.startup import Startup
    from tlrun.launch.units import WorkerUnit

    first = NodeClaimStep()
    second = NodeClaimStep(holder=Holder("elsewhere", 4242, "other", 0.0))  # the same name on another machine
    launcher: Any = SimpleNamespace(broker_url=broker_url, workers=[])
    unit = WorkerUnit(Role("default", "api", WorkerOptions()), "host")
    name = unit.node  # api<this pid>@host
    assert first.claim(launcher, name) and first.claim(launcher, name)  # ours, and ours again
    assert not second.claim(launcher, name)
    # The launcher's path: a claimed name is renamed before its worker starts, and says so.
    said: list[str] = []
    starter: Any = Startup.__new__(Startup)
    starter.steps, starter.report = [second], lambda event: said.append(event.message)
    starter.broker_url = broker_url
    starter.claim_names([unit])
    assert unit.node == name.replace("@", "-1@") and unit.renamed_from == name
    assert said == [f"node name {name} is claimed by another launcher: starting as {unit.node}"]
    first.close(launcher)  # a stopped launcher lets its names go
    assert wait_for(lambda: second.claim(launcher, name), 10, "the name free again")
    second.close(launcher)
