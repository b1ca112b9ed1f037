"""The beat lease follows the broker and beat's own progress (issue 37): a lease key that vanishes early (an
eviction, a failover to a replica that lost it, FLUSHDB) stops the old holder before its next send; a beat
stuck in a tick stops renewing, so that a standby takes over, and the stuck one sends nothing when it resumes.
Judged at the broker: every message beat publishes carries its sender and the lease's fencing token, and the
queue's order says whether two beats ever sent at once. Simulated hosts, a real Redis, real beats."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from helpers import Project, RedisServer, wait_for
from test_cluster import BEAT_APP, TTL, needs_root, on_host, sends

pytestmark = pytest.mark.timeout(150)

BLOCKING_APP = (
    BEAT_APP
    + """

from celery.signals import before_task_publish


@before_task_publish.connect
def _block_once(**_kwargs):
    # Blocks one publish for three ttls when the test asks (a hook stuck on a slow service, a debugger).
    import pathlib, time

    ask = pathlib.Path(os.environ.get("BLOCK_FILE", "/nonexistent"))
    try:
        ask.unlink()
    except OSError:
        return
    pathlib.Path(str(ask) + ".started").write_text(str(time.time()))
    time.sleep(float(os.environ["BLOCK_SECONDS"]))
"""
)


@pytest.fixture
def beat_project(project: Project) -> Project:
    (project.root / f"{project.app}.py").write_text(BEAT_APP.format(name=project.app))
    return project


@pytest.fixture(params=["redis", "amqp"])
def any_beat_project(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Project]:
    """A beat project on a private Redis, or on a throwaway vhost of the local RabbitMQ."""
    if request.param == "redis":
        yield request.getfixturevalue("beat_project")
        return
    proj = Project(tmp_path / "amqp-projects", request.getfixturevalue("amqp_vhost"))
    (proj.root / f"{proj.app}.py").write_text(BEAT_APP.format(name=proj.app))
    try:
        yield proj
    finally:
        proj.cleanup()


def senders(url: str) -> list[tuple[str, int | None]]:
    """(sender "host:pid", fencing token) of every message in the queue, in the order they were published
    (RabbitMQ: read and given back unacknowledged)."""
    if url.startswith("redis"):
        raw = redis.Redis.from_url(url)
        try:
            headers = [json.loads(item)["headers"] for item in reversed(raw.lrange("celery", 0, -1))]  # LPUSH
        finally:
            raw.close()
    else:
        from amqp.exceptions import NotFound
        from kombu import Connection, Queue

        headers = []
        with Connection(url) as conn:
            queue = Queue("celery", channel=conn.channel())
            try:
                while (message := queue.get(no_ack=False)) is not None:
                    headers.append(message.headers)
            except NotFound:  # the beat's first send declares the queue: none sent yet (Redis: an empty list)
                return []
    found = []
    for header in headers:
        host, pid = str(header["tlrun_beat"]).split(":")[:2]
        found.append((f"{host}:{pid}", header.get("tlrun_fence")))
    return found


def one_at_a_time(order: list[tuple[str, int | None]]) -> list[str]:
    """Never two beats at once, at the broker: each sender's messages form one run, and each run's fencing
    token is above the one before. Returns the senders in turn."""
    runs: list[tuple[str, int | None]] = []
    for sender, token in order:
        if not runs or runs[-1][0] != sender:
            runs.append((sender, token))
        assert token == runs[-1][1], (sender, token, runs)
    turns = [sender for sender, _token in runs]
    assert len(turns) == len(set(turns)), f"a beat sent again after another one took over: {turns}"
    tokens = [token for _sender, token in runs if token is not None]  # RabbitMQ's lease has no counter
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens), runs
    return turns


def after_the_first(url: str, enough: int) -> bool:
    """Another beat than the first has sent `enough` ticks."""
    order = senders(url)
    return bool(order) and sum(1 for sender, _t in order if sender != order[0][0]) >= enough


@needs_root
def test_a_lease_key_that_vanishes_stops_the_old_holder_before_its_next_send(beat_project: Project) -> None:
    proj = beat_project
    a = on_host(proj, "hostA", ttl=30)
    a.wait_output(r"beat lease taken \(hostA pid", 30)
    b = on_host(proj, "hostB", ttl=30)
    b.wait_output(r"beat held by hostA pid \d+ since \S+; standing by", 30)
    raw = redis.Redis.from_url(proj.broker_url)
    try:
        key = next(k for k in raw.keys("*tlrun:beat-lease:*") if not k.endswith(b":fence"))
        wait_for(lambda: raw.pttl(key) > 29_500, 15, "a renewal of the lease")  # right after one
        raw.delete(key)  # what an eviction, a failover or FLUSHDB does: 30 s of validity left on A's clock
    finally:
        raw.close()
    a.wait_output(r"the beat lease is no longer this beat's on the broker: not sending", 20)
    wait_for(lambda: after_the_first(proj.broker_url, 4), 40, "the next holder's ticks")  # B's, or A's standby
    assert len(one_at_a_time(senders(proj.broker_url))) >= 2


@needs_root
def test_a_beat_stuck_in_a_publish_hook_is_replaced_and_sends_nothing_after(
    any_beat_project: Project, tmp_path: Path
) -> None:
    proj = any_beat_project
    (proj.root / f"{proj.app}.py").write_text(BLOCKING_APP.format(name=proj.app))
    ask = tmp_path / "block-a"
    a = on_host(proj, "hostA", env=proj.env(BLOCK_FILE=str(ask), BLOCK_SECONDS=str(3 * TTL)))
    a.wait_output(r"beat lease taken \(hostA pid", 30)
    b = on_host(proj, "hostB")
    b.wait_output(r"beat held by hostA pid \d+ since \S+; standing by", 30)
    wait_for(lambda: len(senders(proj.broker_url)) >= 2, 20, "hostA's ticks")
    ask.write_text("block")
    started = float(wait_for(lambda: _read(Path(str(ask) + ".started")), 10, "the publish hook blocking"))
    wait_for(lambda: after_the_first(proj.broker_url, 1), 3 * TTL + 10, "another beat's tick")
    taken = time.time() - started
    # ttl + a renewal interval + 1 s of retry, plus a 0.5 s tick and the standby's start when it is A's own
    assert taken < TTL + TTL / 3 + 1 + 0.5 + 1, taken
    a.wait_output(r"beat has been stuck in one tick for [\d.]+ s: its beat lease was not renewed", 3 * TTL + 10)
    wait_for(lambda: after_the_first(proj.broker_url, 4), 20, "the next holder's ticks")
    assert len(one_at_a_time(senders(proj.broker_url))) >= 2


def _read(path: Path) -> str | None:
    try:
        return path.read_text() or None
    except OSError:
        return None


def test_a_standby_takes_its_own_late_set_for_its_lease() -> None:
    """Redis paused: a standby's SET NX timed out on the client but Redis applied it on resume. The key holds
    the standby's own token (with an older `since`): it is its lease, not another host's."""
    from test_cluster import FakeBackend
    from tlrun.cluster.lease import BeatLease, Holder

    backend = FakeBackend()
    me = Holder("hostB", 2, "b-token", 1000.0)
    backend.holder = me  # the late SET, from an earlier try
    lease = BeatLease(backend, me, 30.0)
    change = lease.tick(0.0)  # this try's `since` is now: the stored value differs only there
    assert change.action == "start", change
    assert lease.held and lease.me == me


def test_doctor_warns_of_a_redis_that_can_evict_the_lease(project: Project, redis_server: Any) -> None:
    raw = redis.Redis.from_url(project.broker_url)
    try:
        raw.config_set("maxmemory", "512mb")
        raw.config_set("maxmemory-policy", "volatile-lru")
        report = json.loads(project.run("doctor", "-A", project.app, "--json").stdout)
        found = [f for f in report["findings"] if f["code"] == "REDIS_EVICTION"]
        assert len(found) == 1 and "volatile-lru" in found[0]["message"], report["findings"]
        assert "the beat lease and the node-name claims" in found[0]["message"]
        raw.config_set("maxmemory-policy", "noeviction")
        report = json.loads(project.run("doctor", "-A", project.app, "--json").stdout)
        assert not [f for f in report["findings"] if f["code"] in ("REDIS_EVICTION", "CLOCK_SKEW")]
    finally:
        raw.close()


def test_a_worker_asked_to_drops_a_late_tick_of_a_replaced_beat(project: Project) -> None:
    """TLRUN_FENCE_CHECK=1: a message stamped with an older fencing token than one already seen is treated as
    revoked; messages without the stamp are never touched."""
    from celery.exceptions import TaskRevokedError

    from helpers import client

    launched = project.launch("--pool", "solo", env=project.env(TLRUN_FENCE_CHECK="1"))
    launched.wait_output(r"tlrun: \d+ workers? ready", 40)
    app = client(project.broker_url)
    assert app.send_task(f"{project.app}.add", (1, 1), headers={"tlrun_fence": 5}).get(timeout=20) == 2
    late = app.send_task(f"{project.app}.add", (2, 2), headers={"tlrun_fence": 4})
    with pytest.raises(TaskRevokedError):
        late.get(timeout=20)
    assert app.send_task(f"{project.app}.add", (3, 3)).get(timeout=20) == 6  # no stamp: not ours to judge
    assert app.send_task(f"{project.app}.add", (4, 4), headers={"tlrun_fence": 6}).get(timeout=20) == 8
    launched.wait_output(rf"dropping {project.app}\.add\[{late.id}\]: sent by a beat under lease 4, older than 5", 10)


CHATTY_BEAT_APP = (
    BEAT_APP
    + """

from celery.signals import before_task_publish


@before_task_publish.connect
def _chatty(**_kwargs):
    print("beat says " + "x" * 8192, flush=True)  # 8 KB a tick: a full pipe after 8 ticks
"""
)


def _gaps(stamps: list[datetime]) -> list[float]:
    return [(b - a).total_seconds() for a, b in itertools.pairwise(stamps)]


@needs_root
def test_a_stopped_launcher_never_holds_up_its_chatty_beat(any_beat_project: Project) -> None:
    """SIGSTOP of the holder's launcher for three ttls, its beat logging 8 KB a tick: the ticks go on at
    their pace (before, beat blocked on the full pipe after 8 ticks while its lease thread kept renewing)."""
    proj = any_beat_project
    (proj.root / f"{proj.app}.py").write_text(CHATTY_BEAT_APP.format(name=proj.app))
    a = on_host(proj, "hostA")
    a.wait_output(r"beat lease taken \(hostA pid", 30)
    b = on_host(proj, "hostB")
    b.wait_output(r"beat held by hostA pid \d+ since \S+; standing by", 30)
    a.send(signal.SIGSTOP)
    try:
        paused_at = datetime.now()
        wait_for(lambda: (datetime.now() - paused_at).total_seconds() > 3 * TTL, 3 * TTL + 5, "three ttls")
        during = [t for t in sends(proj, a) if t > paused_at]
    finally:
        a.send(signal.SIGCONT)
    assert len(during) >= 4 * TTL, during  # a tick every 0.5 s all along
    assert max(_gaps(during)) < 2.0, _gaps(during)
    assert sends(proj, b) == []


@needs_root
def test_beat_resumes_within_a_ttl_of_a_paused_redis(beat_project: Project, redis_server: RedisServer) -> None:
    """Redis paused (SIGSTOP) for 10 s under a holder and a standby: within about a ttl of its return some beat
    sends again, and never two at once."""
    proj = beat_project
    a = on_host(proj, "hostA")
    a.wait_output(r"beat lease taken \(hostA pid", 30)
    b = on_host(proj, "hostB")
    b.wait_output(r"beat held by hostA pid \d+ since \S+; standing by", 30)
    wait_for(lambda: len(senders(proj.broker_url)) >= 2, 20, "ticks")
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        paused_at = datetime.now()
        wait_for(lambda: (datetime.now() - paused_at).total_seconds() > 10, 15, "10 s of pause")
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    back = datetime.now()

    def sent_since() -> bool:
        return any(t > back for t in [*sends(proj, a), *sends(proj, b)])

    wait_for(sent_since, 3 * TTL + 10, "a tick after Redis came back")
    first = min(t for t in [*sends(proj, a), *sends(proj, b)] if t > back)
    assert (first - back).total_seconds() < TTL + TTL / 3 + 3, (first, back)
    wait_for(lambda: len(senders(proj.broker_url)) >= 8, 20, "more ticks")
    one_at_a_time(senders(proj.broker_url))


@needs_root
def test_beat_resumes_within_a_ttl_of_a_paused_rabbitmq(amqp_vhost: str, tmp_path: Path) -> None:
    """RabbitMQ paused for 10 s under a holder and a standby (both reach it through a proxy that moves no
    byte meanwhile, as a SIGSTOPped broker): within about a ttl of its return some beat sends again, and
    never two at once."""
    from urllib.parse import urlsplit

    from helpers import TcpProxy

    proj = Project(tmp_path / "amqp-projects", amqp_vhost)
    (proj.root / f"{proj.app}.py").write_text(BEAT_APP.format(name=proj.app))
    proxy = TcpProxy(("127.0.0.1", urlsplit(amqp_vhost).port or 5672))
    try:
        env = proj.env(CELERY_BROKER_URL=proxy.url(amqp_vhost))
        a = on_host(proj, "hostA", env=env)
        a.wait_output(r"beat lease taken \(hostA pid", 30)
        b = on_host(proj, "hostB", env=env)
        b.wait_output(r"beat held by hostA pid \d+ since \S+; standing by", 30)
        wait_for(lambda: len(senders(proj.broker_url)) >= 2, 20, "ticks")
        proxy.pause()
        try:
            paused_at = datetime.now()
            wait_for(lambda: (datetime.now() - paused_at).total_seconds() > 10, 15, "10 s of pause")
        finally:
            proxy.resume()
        back = datetime.now()

        def sent_since() -> bool:
            return any(t > back for t in [*sends(proj, a), *sends(proj, b)])

        wait_for(sent_since, 3 * TTL + 30, "a tick after RabbitMQ came back")
        first = min(t for t in [*sends(proj, a), *sends(proj, b)] if t > back)
        wait_for(lambda: len(senders(proj.broker_url)) >= 8, 30, "more ticks")
        one_at_a_time(senders(proj.broker_url))
        assert (first - back).total_seconds() < TTL + TTL / 3 + 3, (first, back)
    finally:
        proj.cleanup()
        proxy.close()


@needs_root
def test_a_holder_whose_lease_connection_the_broker_closes_sends_nothing_more(amqp_vhost: str, tmp_path: Path) -> None:
    """RabbitMQ's counterpart of a vanished key: the broker closes the holder's lease connection (its exclusive
    queue goes with it). The holder learns it within a tick and sends nothing more; the next holder takes over."""
    proj = Project(tmp_path / "amqp-projects", amqp_vhost)
    (proj.root / f"{proj.app}.py").write_text(BEAT_APP.format(name=proj.app))
    vhost = amqp_vhost.rsplit("/", 1)[1]
    try:
        a = on_host(proj, "hostA", ttl=30)
        a.wait_output(r"beat lease taken \(hostA pid", 30)
        b = on_host(proj, "hostB", ttl=30)
        b.wait_output(r"beat held by hostA pid \d+ since \S+; standing by", 30)
        wait_for(lambda: len(senders(proj.broker_url)) >= 2, 20, "hostA's ticks")

        def lease_connections() -> list[str]:
            listed = subprocess.run(
                ["rabbitmqctl", "list_connections", "-q", "--no-table-headers", "pid", "vhost", "timeout"],
                capture_output=True, text=True, timeout=60,
            ).stdout  # fmt: skip
            rows = [line.split("\t") for line in listed.splitlines() if line.strip()]
            return [row[0] for row in rows if len(row) == 3 and row[1] == vhost and row[2].strip() == "30"]

        held = wait_for(lease_connections, 20, "the holder's lease connection (heartbeat 30)")
        assert len(held) == 1, held
        subprocess.run(["rabbitmqctl", "close_connection", held[0], "test"], capture_output=True, timeout=60)
        a.wait_output(r"the beat lease is no longer this beat's on the broker: not sending", 20)
        wait_for(lambda: after_the_first(proj.broker_url, 4), 40, "the next holder's ticks")
        assert len(one_at_a_time(senders(proj.broker_url))) >= 2
    finally:
        proj.cleanup()


def test_doctor_says_what_an_eviction_policy_can_evict_and_a_clock_off_by_more_than_the_margin() -> None:
    from tlrun.ops.findings import redis_findings

    assert redis_findings(None, 0.2, 30.0) == []  # no memory limit, a clock within the margin
    assert redis_findings("noeviction", -0.4, 30.0) == []
    every = redis_findings("allkeys-lru", None, 30.0)
    assert [f.code for f in every] == ["REDIS_EVICTION"] and "queued tasks" in every[0].message
    skew = redis_findings(None, -7.5, 30.0)  # the margin of a 30 s lease is 5 s
    assert [f.code for f in skew] == ["CLOCK_SKEW"] and "-7.5 s off" in skew[0].message
