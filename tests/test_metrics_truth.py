"""The metrics endpoints say what is true now (issue 43): through a crash, the queue-length publisher hands
over at once and no two launchers publish at the same time; a dead worker runs nothing; through a broker
outage the endpoint says the broker is down and publishes no queue length. Real workers, a real Redis stopped
and started again, scraped as Prometheus would."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from helpers import Project, RedisServer, client, free_port, wait_for
from test_consuming import scrape

pytestmark = pytest.mark.timeout(150)
READY = r"tlrun: \d+ workers? ready: (\S+) \(pid (\d+)\)"
CHECK = {"TLRUN_CONSUME_CHECK_EVERY": "1"}

ROLES = """
[tool.tlrun]
app = "{app}"

[tool.tlrun.workers.default]
queues = ["celery"]
concurrency = 2

[tool.tlrun.workers.io]
queues = ["io"]
concurrency = 2
"""

Samples = dict[str, list[tuple[dict[str, str], float]]]


def safe_scrape(port: int) -> Samples:
    try:
        return scrape(port)
    except OSError:
        return {}


def lengths(samples: Samples) -> dict[str, float]:
    return {labels["queue_name"]: value for labels, value in samples.get("celery_queue_length", [])}


def one(samples: Samples, name: str, role: str) -> float | None:
    values = [value for labels, value in samples.get(name, []) if labels.get("worker") == role]
    return values[0] if values else None


@pytest.fixture
def two_launchers(project: Project) -> Iterator[tuple[Project, dict[str, int], dict[str, int]]]:
    """The project's two roles, each its own launcher with an endpoint: role -> port, role -> worker pid."""
    (project.root / "pyproject.toml").write_text(ROLES.format(app=project.app))
    ports, pids = {}, {}
    for role in ("default", "io"):
        ports[role] = free_port()
        args = ["--role", role, "--restart", "--restart-delay", "60", "--metrics-addr", "127.0.0.1"]
        launched = project.launch(*args, "--metrics-port", str(ports[role]), env=project.env(**CHECK), app_arg=False)
        pids[role] = int(launched.wait_output(READY, 40).group(2))
    yield project, ports, pids


def test_a_crashed_publisher_hands_over_at_once_and_never_two_publish(
    two_launchers: tuple[Project, dict[str, int], dict[str, int]],
) -> None:
    project, ports, pids = two_launchers

    def publishers() -> list[str]:
        found = [role for role, port in ports.items() if lengths(safe_scrape(port))]
        assert len(found) <= 1, f"two launchers publish queue lengths at once: {found}"
        return found

    publisher = wait_for(publishers, 15, "one launcher publishing the queue lengths")[0]
    other = "io" if publisher == "default" else "default"
    queue = "celery" if publisher == "default" else "io"
    # The publisher's worker runs tasks (for its active count), then dies under SIGKILL; its restart waits 60 s.
    sleepers = [client(project.broker_url).send_task(f"{project.app}.sleep", (30,), queue=queue) for _ in range(2)]
    wait_for(
        lambda: one(safe_scrape(ports[publisher]), "celery_worker_tasks_active", publisher) == len(sleepers),
        20,
        "the running tasks counted",
    )
    os.kill(pids[publisher], signal.SIGKILL)
    for i in range(5):  # waiting in the dead worker's queue, which nothing drains now
        client(project.broker_url).send_task(f"{project.app}.add", (i, i), queue=queue)
    raw = redis.Redis.from_url(project.broker_url)
    try:

        def truth() -> dict[str, float]:
            return {q: float(raw.llen(q)) for q in ("celery", "io")}

        def handed_over() -> bool:
            if publishers() != [other]:
                return False
            return lengths(safe_scrape(ports[other])) == truth()

        wait_for(handed_over, 15, f"the {other} launcher publishing the true lengths ({truth()})")
        assert truth()[queue] == 5.0
    finally:
        raw.close()
    dead = safe_scrape(ports[publisher])
    assert one(dead, "celery_worker_up", publisher) == 0.0
    assert one(dead, "celery_worker_tasks_active", publisher) == 0.0  # not the 1 or 2 it last replied
    assert not lengths(dead)
    for _ in range(20):  # and it stays so: one publisher per scrape, the dead one never again
        assert publishers() == [other]


def test_a_broker_outage_is_on_the_endpoint_and_queue_lengths_are_absent(
    project: Project, redis_server: RedisServer
) -> None:
    port = free_port()
    args = ["--pool", "solo", "--metrics-port", str(port), "--metrics-addr", "127.0.0.1"]
    launched = project.launch(*args, env=project.env(**CHECK))
    launched.wait_output(READY, 40)

    def up() -> bool:
        samples = safe_scrape(port)
        broker = [v for _labels, v in samples.get("tlrun_broker_up", [])]
        return (
            broker == [1.0] and lengths(samples) == {"celery": 0.0} and one(samples, "celery_worker_up", "default") == 1
        )

    wait_for(up, 15, "tlrun_broker_up 1 and the queue length")
    labels = safe_scrape(port)["tlrun_broker_up"][0][0]
    assert labels == {"app": project.app, "project": project.app}
    redis_server.stop()

    def down() -> bool:
        samples = safe_scrape(port)
        broker = [v for _labels, v in samples.get("tlrun_broker_up", [])]
        return broker == [0.0] and not lengths(samples) and one(samples, "celery_worker_up", "default") == 0

    wait_for(down, 20, "tlrun_broker_up 0, no queue length, the worker not up")
    redis_server.restart()
    wait_for(up, 40, "tlrun_broker_up 1 and the queue length again")
    assert launched.proc.poll() is None, launched.output()


def test_doctors_prometheus_output_lists_only_the_projects_own_nodes(project: Project, tmp_path: Path) -> None:
    launched = project.launch("--pool", "solo")
    node = launched.wait_output(READY, 40).group(1)
    stranger = Project(tmp_path / "other", project.broker_url)  # another app on the same broker
    try:
        other = stranger.hand_worker(f"other{os.getpid()}@elsewhere")
        other.wait_output(r"ready\.", 40)
        result = project.run("doctor", "-A", project.app, "--format", "prometheus")
        up = [line for line in result.stdout.splitlines() if line.startswith("celery_worker_up{")]
        assert up == [f'celery_worker_up{{hostname="{node.split("@", 1)[1]}",worker="default"}} 1.0'], result.stdout
    finally:
        stranger.cleanup()
