"""A worker that answers pings but does not consume (its consumer cancelled, as after some broker drops):
doctor and health report it, and `tlrun worker --restart` brings back a worker that runs the waiting tasks."""

from __future__ import annotations

import json
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import Project, client, free_port, send_task, wait_for
from tlrun.ops.consuming import NodeState, NotConsuming, judge

pytestmark = pytest.mark.timeout(120)
READY = r"tlrun: \d+ workers? ready: (\S+) \(pid (\d+)\)"
CHECK = {"TLRUN_CONSUME_CHECK_EVERY": "1"}


# -- the rule, without a broker -------------------------------------------------------------------------------
def test_a_cancelled_consumer_with_messages_waiting_is_found_at_once() -> None:
    state = NodeState("api1@h", frozenset(), 0)
    found = judge(state, ["celery"], {"celery": 3}, 100.0, {}, 60.0)
    assert [(f.node, f.queue, f.waiting, f.since) for f in found] == [("api1@h", "celery", 3, 100.0)]
    assert "not in its active_queues" in found[0].message()


def test_a_listed_queue_counts_only_after_the_threshold_and_only_while_idle() -> None:
    seen: dict[tuple[str, str], float] = {}
    idle = NodeState("api1@h", frozenset({"celery"}), 0)
    assert judge(idle, ["celery"], {"celery": 2}, 0.0, seen, 60.0) == []
    assert judge(idle, ["celery"], {"celery": 2}, 59.0, seen, 60.0) == []
    found = judge(idle, ["celery"], {"celery": 2}, 61.0, seen, 60.0)
    assert found and found[0].since == 0.0 and "idle for 61 s" in found[0].reason
    busy = NodeState("api1@h", frozenset({"celery"}), 1)
    assert judge(busy, ["celery"], {"celery": 2}, 62.0, seen, 60.0) == []  # working: the history restarts
    assert judge(idle, ["celery"], {"celery": 2}, 63.0, seen, 60.0) == []
    assert judge(idle, ["celery"], {"celery": 0}, 200.0, seen, 60.0) == []  # nothing waits


def test_no_reply_is_not_a_verdict() -> None:
    assert judge(NodeState("n", None, None), ["celery"], {"celery": 5}, 0.0, {}, 1.0) == []


def test_a_finding_survives_the_lock_record() -> None:
    nc = NotConsuming("api1@h", "celery", 3, 1.0, "why")
    assert NotConsuming.from_dict(json.loads(json.dumps(nc.as_dict()))) == nc
    assert NotConsuming.from_dict({"node": "x"}) is None


# -- real workers -------------------------------------------------------------------------------------------------
def cancel_consumer(project: Project, node: str) -> None:
    replies = client(project.broker_url).control.cancel_consumer("celery", destination=[node], reply=True)
    assert replies and node in replies[0], replies


def test_doctor_and_health_report_a_worker_that_stopped_consuming(any_project: Project) -> None:
    project = any_project
    launched = project.launch("--pool", "solo", env=project.env(**CHECK))
    node = launched.wait_output(READY, 30).group(1)
    cancel_consumer(project, node)
    results = [send_task(project.broker_url, f"{project.app}.add", i, i) for i in range(3)]
    # It still answers pings: the ping alone says "alive".
    health = project.run("health", "-A", project.app, "--timeout", "2", "--retries", "0")
    assert health.returncode == 17, health.stdout + health.stderr
    assert f"{node}: not_consuming ({node} answers pings but does not consume queue celery: 3 message(s)" in (
        health.stdout
    )
    doctor = project.run("doctor", "-A", project.app, "--json")
    report = json.loads(doctor.stdout)
    stuck = [f for f in report["findings"] if f["code"] == "NOT_CONSUMING"]
    assert len(stuck) == 1 and node in stuck[0]["message"] and "queue celery" in stuck[0]["message"], stuck
    assert doctor.returncode == 17
    # Without --restart the launcher says so, and leaves the worker alone.
    launched.wait_output(rf"warning: {node} answers pings but does not consume queue celery", 10)
    assert all(r.state == "PENDING" for r in results)


@pytest.mark.matrix
def test_worker_restart_brings_back_a_worker_that_runs_the_waiting_tasks(project: Project) -> None:
    launched = project.launch("--pool", "solo", "--restart", "--restart-delay", "0.2", env=project.env(**CHECK))
    node = launched.wait_output(READY, 30).group(1)
    cancel_consumer(project, node)
    results = [send_task(project.broker_url, f"{project.app}.add", i, i) for i in range(3)]
    launched.wait_output(rf"worker {node} does not consume celery: restart 1 in", 15)
    assert [r.get(timeout=30) for r in results] == [0, 2, 4]


# -- metrics -------------------------------------------------------------------------------------------------------
def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def test_the_metrics_endpoint_speaks_celery_exporters_names(project: Project) -> None:
    port = free_port()
    env = project.env(**CHECK)
    launched = project.launch("--concurrency", "2", "--metrics-port", str(port), "--metrics-addr", "127.0.0.1", env=env)
    node = launched.wait_output(READY, 30).group(1)
    busy = send_task(project.broker_url, f"{project.app}.sleep", 4)
    launched.wait_output(r"Task \S+\.sleep\[\S+\] received", 20)

    def sampled() -> dict[str, list[tuple[dict[str, str], float]]] | None:
        found = scrape(port)
        return found if found.get("celery_worker_tasks_active") else None

    metrics = wait_for(sampled, 10, "a sample with the running task")
    # celery-exporter's `hostname` is the host part (a restart continues the series); `worker` is the role.
    at = {"hostname": node.split("@", 1)[1], "worker": "default"}
    assert metrics["celery_worker_up"] == [(at, 1.0)]
    assert metrics["celery_worker_tasks_active"] == [(at, 1.0)]
    assert metrics["tlrun_worker_restarts_total"] == [(at, 0.0)]
    assert ({**at, "state": "expected"}, 2.0) in metrics["tlrun_pool_processes"]
    assert ({**at, "state": "running"}, 2.0) in metrics["tlrun_pool_processes"]
    assert metrics["tlrun_worker_ready_seconds"][0][1] > 0
    assert metrics["tlrun_worker_rss_bytes"][0][1] > 10_000_000
    assert "tlrun_not_consuming" not in metrics
    # Without beat, one launcher per cluster (this one: the only one) publishes every queue's length, 0 too.
    lengths = wait_for(lambda: scrape(port).get("celery_queue_length"), 10, "the queue lengths")
    assert lengths == [({"queue_name": "celery"}, 0.0)]
    assert busy.get(timeout=20) == 4
    # A second launcher cannot take the port: refused before it stops or sweeps anything.
    other = project.run("worker", "-A", project.app, "--metrics-port", str(port), "--metrics-addr", "127.0.0.1")
    assert other.returncode == 2 and f"cannot serve metrics on 127.0.0.1:{port}" in other.stderr


def test_doctor_prometheus_output_parses_with_celery_exporters_names(project: Project) -> None:
    launched = project.launch()
    node = launched.wait_output(READY, 30).group(1)
    result = project.run("doctor", "-A", project.app, "--format", "prometheus")
    families = {f.name: f for f in text_string_to_metric_families(result.stdout)}
    up = [(s.labels, s.value) for s in families["celery_worker_up"].samples]
    assert up == [({"hostname": node.split("@", 1)[1], "worker": "default"}, 1.0)]
    for name in ("tlrun_not_consuming", "tlrun_beat_lease_held", "tlrun_workers_answering"):
        assert name in families, sorted(families)
    # The same label set for a name, whether doctor or a launcher's endpoint says it; `project` is the
    # project's name (the same on every host), not a hash of this host's directory.
    assert families["tlrun_not_consuming"].samples == []  # a series per (hostname, worker, queue_name) stuck
    answering = families["tlrun_workers_answering"].samples[0].labels
    assert answering == {"app": project.app, "project": project.app}


# celery-exporter's metrics tlrun also publishes: name -> (type, labels), as its source declares them
# (danihodovic/celery-exporter, src/exporter.py), without its optional static labels.
CELERY_EXPORTER = {
    "celery_worker_up": ("gauge", {"hostname"}),
    "celery_worker_tasks_active": ("gauge", {"hostname"}),
    "celery_queue_length": ("gauge", {"queue_name"}),
}


def test_a_dashboard_for_celery_exporter_reads_tlruns_metrics(project: Project) -> None:
    """Every celery-exporter name tlrun publishes has its type and at least its labels (tlrun adds `worker`
    to the worker metrics: two roles on one host are two series), from the endpoint and from doctor."""
    port = free_port()
    launched = project.launch("--metrics-port", str(port), "--metrics-addr", "127.0.0.1", env=project.env(**CHECK))
    launched.wait_output(READY, 30)
    wait_for(lambda: "celery_queue_length" in scrape(port), 10, "the queue lengths")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        endpoint = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    doctor = {
        f.name: f
        for f in text_string_to_metric_families(
            project.run("doctor", "-A", project.app, "--format", "prometheus").stdout
        )
    }
    for source, families in (("endpoint", endpoint), ("doctor", doctor)):
        for name, (kind, labels) in CELERY_EXPORTER.items():
            if name not in families:
                assert source == "doctor" and name != "celery_worker_up", (source, name)
                continue
            family = families[name]
            assert family.type == kind, (source, name, family.type)
            for sample in family.samples:
                assert labels <= set(sample.labels), (source, name, sample.labels)
    shared = set(endpoint) & set(doctor)
    for name in shared:  # one label set per name, whichever says it
        ends = {frozenset(s.labels) for s in endpoint[name].samples}
        docs = {frozenset(s.labels) for s in doctor[name].samples}
        assert not ends or not docs or ends == docs, (name, ends, docs)
