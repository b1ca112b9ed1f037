"""Task metrics on the launcher's endpoint under a real task load: celery-exporter's names, types and label names
(tests/data/celery_exporter.json: its source's definitions), every task counted once, through a SIGKILLed
worker and its restart, and the Grafana dashboards' queries (from celery-exporter's repository) that tlrun's
metrics can answer find series."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import Project, client, free_port, wait_for

pytestmark = pytest.mark.timeout(150)
READY = r"tlrun: \d+ workers? ready: (\S+) \(pid (\d+)\)"
EXPORTER = json.loads((Path(__file__).parent / "data" / "celery_exporter.json").read_text())
# What a launcher cannot know: producers' sends (events of other processes), and the broker's consumer counts.
NOT_EXPORTED = {
    "celery_task_sent",
    "celery_active_consumer_count",
    "celery_active_worker_count",
    "celery_active_process_count",
}

TASKS = """

@app.task
def boom():
    raise ValueError("boom")


@app.task(bind=True, max_retries=3)
def flaky(self):
    if self.request.retries < 1:
        raise self.retry(countdown=0)
    return "ok"
"""


def families(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(found: dict[str, Any], sample: str, **labels: str) -> float:
    """The sum of the samples named `sample` whose labels include `labels`."""
    family = found.get(re.sub(r"(_total|_bucket|_sum|_count)$", "", sample))
    if family is None:
        return 0.0
    return sum(s.value for s in family.samples if s.name == sample and labels.items() <= s.labels.items())


@pytest.fixture
def stamped() -> Any:
    """This test's client stamps its messages' publish time, as an app module calling it would."""
    from celery import signals

    from tlrun.launch import taskstats

    taskstats.stamp_publish_time()
    yield
    signals.before_task_publish.disconnect(dispatch_uid="tlrun-stamp-publish-time")


@pytest.mark.matrix  # taskstats wraps Celery's Request and per-task request class
def test_task_metrics_count_every_task_once_through_a_crash_in_celery_exporters_names(
    project: Project, stamped: None
) -> None:
    app_file = project.root / f"{project.app}.py"
    app_file.write_text(app_file.read_text() + TASKS)
    port = free_port()
    env = project.env(TLRUN_CONSUME_CHECK_EVERY="1")
    args = ["--concurrency", "2", "--restart", "--restart-delay", "0.5", "--metrics-port", str(port)]
    launched = project.launch(*args, "--metrics-addr", "127.0.0.1", env=env)
    pid = int(launched.wait_output(READY, 40).group(2))
    c = client(project.broker_url)
    add, boom, flaky = (f"{project.app}.{n}" for n in ("add", "boom", "flaky"))
    results = [c.send_task(add, (i, i)) for i in range(20)]
    failures = [c.send_task(boom) for _ in range(3)]
    assert [r.get(timeout=30) for r in results] == [2 * i for i in range(20)]
    assert c.send_task(flaky).get(timeout=30) == "ok"
    for r in failures:
        with pytest.raises(Exception, match="boom"):
            r.get(timeout=30)

    def counted(want: float) -> dict[str, Any] | None:
        found = families(port)
        return found if value(found, "celery_task_succeeded_total", name=add) == want else None

    found = wait_for(lambda: counted(20), 20, "20 successes counted")
    assert value(found, "celery_task_received_total", name=add) == 20
    assert value(found, "celery_task_started_total", name=add) == 20
    assert value(found, "celery_task_runtime_count", name=add) == 20
    assert value(found, "celery_task_queue_wait_time_count", name=add) == 20  # each stamped message once
    assert value(found, "celery_task_failed_total", name=add) == 0  # present, at 0: ratios have both sides
    assert value(found, "celery_task_failed_total", name=boom, exception="ValueError") == 3
    assert value(found, "celery_task_succeeded_total", name=boom) == 0
    assert value(found, "celery_task_retried_total", name=flaky) == 1
    assert value(found, "celery_task_succeeded_total", name=flaky) == 1
    assert value(found, "celery_task_received_total", name=flaky) == 2  # the retry is a new message
    assert value(found, "celery_task_received_total", queue_name="celery") == 25
    inf = [s for s in found["celery_task_runtime"].samples if s.name.endswith("_bucket") and s.labels["le"] == "+Inf"]
    assert sum(s.value for s in inf if s.labels["name"] == add) == 20
    busy = c.send_task(f"{project.app}.sleep", (3,))  # one of two pool processes busy: utilisation 0.5
    utilisation = wait_for(
        lambda: [s.value for s in families(port)["tlrun_worker_utilisation"].samples if s.value > 0], 20, "utilisation"
    )
    assert utilisation == [0.5], utilisation
    assert busy.get(timeout=20) == 3

    # celery-exporter's names, types and label names, for every metric tlrun exports.
    wanted = [m for m in EXPORTER["metrics"] if m["name"] not in NOT_EXPORTED]

    def complete() -> dict[str, Any] | None:
        now = families(port)
        return now if all(now.get(m["name"]) is not None and now[m["name"]].samples for m in wanted) else None

    latest = wait_for(complete, 20, "every exported metric with samples")
    for metric in wanted:
        family = latest[metric["name"]]
        assert family.type == metric["type"], (metric["name"], family.type)
        labels = {k for s in family.samples for k in s.labels if k != "le"}
        assert set(metric["labels"]) <= labels, (metric["name"], labels)

    # The worker dies by SIGKILL; its launcher restarts it. Counts go on from where they were, never back.
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 10, "dead")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # the first scrapes after its death, all at once
        bursts = list(pool.map(lambda _i: value(families(port), "celery_task_succeeded_total", name=add), range(8)))
    assert set(bursts) == {20}, bursts  # its counts folded once, whichever scrape did it
    launched.wait_output(r"restart", 30)
    wait_for(lambda: re.findall(READY, launched.output()).__len__() >= 2, 40, "the restarted worker ready")
    more = [c.send_task(add, (i, 1)) for i in range(5)]
    assert [r.get(timeout=30) for r in more] == [i + 1 for i in range(5)]
    after = wait_for(lambda: counted(25), 20, "25 successes counted across the crash")
    assert value(after, "celery_task_received_total", name=add) == 25
    assert value(after, "celery_task_failed_total", name=boom, exception="ValueError") == 3
    assert value(after, "celery_task_runtime_count", name=add) == 25
    for _ in range(5):  # and they stay: the dead worker's file was folded once, not again
        assert counted(25) is not None
    dashboards_find_series(wait_for(complete, 20, "every exported metric with samples, after the restart"))
    assert list(project.runtime.rglob("*.tasks.*.json"))  # the live worker's counts
    launched.send(signal.SIGTERM)
    assert launched.wait(40) == 0, launched.output()[-3000:]
    assert not list(project.runtime.rglob("*.tasks.*.json"))  # nothing left behind by the launcher


# -- the dashboards' queries -------------------------------------------------------------------------------------
SELECTOR = re.compile(r"(celery_[a-z_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
SCRAPE_LABELS = {"cluster", "namespace", "job"}  # added by Prometheus from the target, not by an exporter


def _matches(labels: dict[str, str], matchers: list[tuple[str, str, str]]) -> bool:
    for name, op, pattern in matchers:
        have = labels.get(name, "")
        pattern = re.sub(r"\$\w+", ".*", pattern)  # a dashboard variable: any value
        if op == "=" and have != pattern:
            return False
        if op == "!=" and have == pattern:
            return False
        if op == "=~" and not re.fullmatch(pattern, have):
            return False
        if op == "!~" and re.fullmatch(pattern, have):
            return False
    return True


def dashboards_find_series(found: dict[str, Any]) -> None:
    """Every selector of every dashboard query on a metric tlrun exports matches at least one sample."""
    samples = [s for family in found.values() for s in family.samples]
    exported = {m["name"] for m in EXPORTER["metrics"]} - NOT_EXPORTED
    checked = 0
    for query in EXPORTER["dashboard_queries"]:
        for metric, inside in SELECTOR.findall(query):
            if re.sub(r"(_total|_bucket|_sum|_count)$", "", metric) not in exported:
                continue
            matchers = [m for m in MATCHER.findall(inside) if m[0] not in SCRAPE_LABELS]
            assert any(s.name == metric and _matches(s.labels, matchers) for s in samples), (metric, inside, query)
            checked += 1
    assert checked >= 50, checked  # the dashboards' queries on task outcomes, runtimes, workers and queues
