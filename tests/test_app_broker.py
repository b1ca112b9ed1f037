"""Every connection tlrun makes takes the app's own broker settings (issue 43): a global key prefix, custom
priority steps, TLS with a client certificate, Redis Sentinel. Real redis-servers (TLS, a replica, a sentinel)
started by each test, real workers, the real command line: `tlrun worker` is verified, `health`, `doctor` and
`ps` work, the node-name claim and the queue-metrics lease live under the app's prefix, queue lengths count
every message, and wrong settings of the app fail clearly."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from helpers import Project, RedisServer, free_port, reap, wait_for
from test_consuming import scrape

pytestmark = pytest.mark.timeout(150)
READY = r"tlrun: \d+ workers? ready: (\S+) \(pid (\d+)\)"
CHECK = {"TLRUN_CONSUME_CHECK_EVERY": "1"}

APP = """
import json
import os

from celery import Celery

app = Celery("{name}")
app.conf.update(json.loads(os.environ["TEST_BROKER_CONF"]))
app.conf.broker_connection_retry_on_startup = True
app.conf.worker_prefetch_multiplier = 1


@app.task
def add(x, y):
    return x + y


@app.task
def tick():
    print(f"TICK-{{VERSION}}", flush=True)


VERSION = 1
"""


def app_project(base: Path, url: str) -> Project:
    project = Project(base, url, write_app=False)
    (project.root / f"{project.app}.py").write_text(APP.format(name=project.app))
    return project


def env(project: Project, conf: dict[str, Any], **extra: str) -> dict[str, str]:
    return project.env(TEST_BROKER_CONF=json.dumps(conf), **CHECK, **extra)


def sender(url: str, conf: dict[str, Any]) -> Celery:
    """A client configured as the app is (a client with the URL alone would publish to other keys)."""
    app = Celery("test-sender", broker=url, set_as_current=False)
    app.conf.update(conf)
    return app


def cancel_consumer(app: Celery, node: str) -> None:
    replies = app.control.cancel_consumer("celery", destination=[node], reply=True, timeout=5)
    assert replies and node in replies[0], replies


def queue_length(port: int) -> float | None:
    lengths = dict((labels["queue_name"], value) for labels, value in scrape(port).get("celery_queue_length", []))
    return lengths.get("celery")


def check_commands(project: Project, environ: dict[str, str], node: str) -> None:
    """health (readiness over the broker), doctor (census, lease, depths) and ps, as a user runs them."""
    health = project.run("health", "-A", project.app, "--timeout", "3", "--retries", "1", env=environ)
    assert health.returncode == 0, health.stdout + health.stderr
    doctor = project.run("doctor", "-A", project.app, "--json", env=environ)
    report = json.loads(doctor.stdout)
    assert [n["name"] for n in report["nodes"]] == [node], report["nodes"]
    assert not [f for f in report["findings"] if f["severity"] == "error"], report["findings"]
    ps = project.run("ps", "-A", project.app, env=environ)
    assert ps.returncode == 0 and node in ps.stdout, ps.stdout + ps.stderr


@pytest.fixture
def redis_base(tmp_path: Path) -> Path:
    return tmp_path / "projects"


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "pw-redis", password=f"pw-{uuid.uuid4().hex[:12]}")
    try:
        yield server
    finally:
        server.stop()


def keys(url: str, pattern: str) -> list[str]:
    raw = redis.Redis.from_url(url)
    try:
        return sorted(k.decode() for k in raw.keys(pattern))
    finally:
        raw.close()


def broker_record(project: Project) -> Path:
    from tlrun.config import project_id
    from tlrun.launch import brokerconf

    return brokerconf.record_path(project.lock_file().parent, project_id(project.root, project.app))


# -- key prefix and priority steps ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["global_keyprefix", "priority_steps"])
def test_an_apps_transport_options_shape_every_connection(
    case: str, password_redis: RedisServer, redis_base: Path
) -> None:
    url = password_redis.url()
    options: dict[str, Any] = {"unacked_restore_interval": 1}
    if case == "global_keyprefix":
        options["global_keyprefix"] = "shared_app:"
    else:
        options.update(priority_steps=list(range(10)), sep=":", queue_order_strategy="priority")
    conf = {"broker_transport_options": options}
    project = app_project(redis_base, url)
    environ = env(project, conf)
    port = free_port()
    client = sender(url, conf)
    try:
        launched = project.launch(
            "--pool", "solo", "--metrics-port", str(port), "--metrics-addr", "127.0.0.1", env=environ
        )
        node = launched.wait_output(READY, 40).group(1)
        assert client.send_task(f"{project.app}.add", (2, 3)) is not None
        # The settings the commands read when they must not import the app: recorded without the password.
        record = broker_record(project)
        text = record.read_text()
        assert (record.stat().st_mode & 0o777) == 0o600 and json.loads(text)["options"]["broker_transport_options"]
        assert password_redis.password and password_redis.password not in text
        check_commands(project, environ, node)
        # A bad save: the app no longer imports, and health still talks to the broker as the app does (the
        # record), as a probe must while `tlrun dev --reload` keeps the old worker serving.
        source = project.root / f"{project.app}.py"
        good = source.read_text()
        source.write_text(good + "\nraise RuntimeError('half-saved')\n")
        health = project.run("health", "-A", project.app, "--timeout", "3", "--retries", "1", env=environ)
        assert health.returncode == 0, health.stdout + health.stderr
        source.write_text(good)
        # Queue lengths count what waits: the consumer cancelled, 50 messages (every priority for the steps).
        cancel_consumer(client, node)
        for i in range(50):
            client.send_task(f"{project.app}.add", (i, i), priority=i % 10)
        wait_for(lambda: queue_length(port) == 50, 15, f"celery_queue_length 50 (last: {queue_length(port)})")
        found = keys(url, "*tlrun:*")
        prefix = options.get("global_keyprefix", "")
        assert any(k.startswith(f"{prefix}tlrun:node:") for k in found), found  # the node-name claim
        assert any(k.startswith(f"{prefix}tlrun:queue-metrics:") for k in found), found
        assert all(k.startswith(prefix) for k in found), found
        launched.reap()
        assert launched.proc.returncode == 0, launched.output()
    finally:
        client.close()
        project.cleanup()


def test_dev_with_beat_and_reload_under_a_key_prefix(password_redis: RedisServer, redis_base: Path) -> None:
    """tlrun dev: the worker verified, beat's lease and its ticks, a reload's new worker verified, all under
    the app's prefix."""
    url = password_redis.url()
    project = app_project(redis_base, url)
    conf = {
        "broker_transport_options": {"global_keyprefix": "dev_pfx:"},
        "beat_schedule": {"tick": {"task": f"{project.app}.tick", "schedule": 0.5}},
    }
    launched = project.launch("--beat", "--reload", command="dev", fast=False, env=env(project, conf))
    try:
        launched.wait_output(READY, 40)
        launched.wait_output(r"TICK-1", 30)
        assert any(k.startswith("dev_pfx:tlrun:beat-lease:") for k in keys(url, "*")), keys(url, "*")
        source = project.root / f"{project.app}.py"
        source.write_text(source.read_text().replace("VERSION = 1", "VERSION = 2"))
        launched.wait_output(r"reloaded: ", 40)
        launched.wait_output(r"TICK-2", 30)
        assert not [k for k in keys(url, "*tlrun:*") if not k.startswith("dev_pfx:")]
        launched.reap()
        assert launched.proc.returncode == 0, launched.output()
    finally:
        project.cleanup()


# -- TLS with a client certificate -----------------------------------------------------------------------------
def make_certificates(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
            "-subj", "/CN=tlrun-test-ca")  # fmt: skip
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", "/CN=127.0.0.1")  # fmt: skip
        (folder / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")  # fmt: skip
    return {name: str(folder / name) for name in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")}


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make the test's certificates")
    certs = make_certificates(tmp_path / "certs")
    port = free_port()
    argv = ["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--tls-cert-file", certs["server.crt"], "--tls-key-file", certs["server.key"]]
    argv += ["--tls-ca-cert-file", certs["ca.crt"], "--tls-auth-clients", "yes", "--dir", str(tmp_path)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        client = redis.Redis(
            host="127.0.0.1", port=port, ssl=True, ssl_ca_certs=certs["ca.crt"], ssl_certfile=certs["client.crt"],
            ssl_keyfile=certs["client.key"],
        )  # fmt: skip

        def answers() -> bool:
            assert proc.poll() is None, f"redis-server --tls-port exited with {proc.returncode}"
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_for(answers, 15, "redis-server over TLS")
        client.close()
        yield f"rediss://127.0.0.1:{port}/0", certs
    finally:
        reap(proc)


def test_tls_with_a_client_certificate_from_the_apps_broker_use_ssl(tls_redis: Any, redis_base: Path) -> None:
    url, certs = tls_redis
    use_ssl = {
        "ssl_cert_reqs": 2,  # ssl.CERT_REQUIRED
        "ssl_ca_certs": certs["ca.crt"],
        "ssl_certfile": certs["client.crt"],
        "ssl_keyfile": certs["client.key"],
    }
    conf = {"broker_use_ssl": use_ssl}
    project = app_project(redis_base, url)
    environ = env(project, conf)
    port = free_port()
    try:
        launched = project.launch(
            "--pool", "solo", "--metrics-port", str(port), "--metrics-addr", "127.0.0.1", env=environ
        )
        node = launched.wait_output(READY, 40).group(1)
        check_commands(project, environ, node)
        wait_for(lambda: queue_length(port) == 0, 15, "celery_queue_length over TLS")
        launched.reap()
        assert launched.proc.returncode == 0, launched.output()
        # The app's own settings wrong (no client certificate): a clear broker error, nothing left running.
        wrong = env(project, {"broker_use_ssl": {k: v for k, v in use_ssl.items() if k == "ssl_ca_certs"}})
        failed = project.launch("--pool", "solo", env=wrong)
        status = failed.wait(60)
        output = failed.output()
        assert status == 5, output
        assert re.search(r"broker rediss://127\.0\.0\.1:\d+/0 refused the TLS connection: ", output), output
        assert "check the app's broker_use_ssl" in output
        assert "Traceback" not in output
    finally:
        project.cleanup()


# -- Redis Sentinel ----------------------------------------------------------------------------------------------
@pytest.fixture
def sentinel(tmp_path: Path, redis_server: Any) -> Iterator[str]:
    """A replica of the test's redis-server and a sentinel that names it master `mymaster`."""
    replica_port, sentinel_port = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        argv = ["redis-server", "--port", str(replica_port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--replicaof", "127.0.0.1", str(redis_server.port), "--dir", str(tmp_path)]
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, start_new_session=True))
        conf = tmp_path / "sentinel.conf"
        conf.write_text(
            f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
            f"sentinel monitor mymaster 127.0.0.1 {redis_server.port} 1\n"
        )
        argv = ["redis-server", str(conf), "--sentinel"]
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, start_new_session=True))
        probe = redis.Redis(port=sentinel_port)

        def master_known() -> bool:
            assert all(p.poll() is None for p in procs), [p.returncode for p in procs]
            try:
                return bool(probe.execute_command("SENTINEL", "get-master-addr-by-name", "mymaster"))
            except redis.RedisError:
                return False

        wait_for(master_known, 20, "the sentinel")
        probe.close()
        yield f"sentinel://127.0.0.1:{sentinel_port}/0"
    finally:
        for proc in procs:
            reap(proc)


def test_redis_sentinel_with_master_name_in_the_transport_options(sentinel: str, redis_base: Path) -> None:
    conf = {"broker_transport_options": {"master_name": "mymaster"}}
    project = app_project(redis_base, sentinel)
    environ = env(project, conf)
    port = free_port()
    client = sender(sentinel, conf)
    try:
        launched = project.launch(
            "--pool", "solo", "--metrics-port", str(port), "--metrics-addr", "127.0.0.1", env=environ
        )
        node = launched.wait_output(READY, 40).group(1)
        check_commands(project, environ, node)
        cancel_consumer(client, node)
        for i in range(7):
            client.send_task(f"{project.app}.add", (i, i))
        wait_for(lambda: queue_length(port) == 7, 15, f"celery_queue_length 7 (last: {queue_length(port)})")
        launched.reap()
        assert launched.proc.returncode == 0, launched.output()
    finally:
        client.close()
        project.cleanup()


# -- RabbitMQ: a control exchange of the app's own ----------------------------------------------------------------
def test_a_custom_control_exchange_on_rabbitmq(amqp_vhost: str, tmp_path: Path) -> None:
    conf = {"control_exchange": "shop_control"}
    project = app_project(tmp_path / "amqp-projects", amqp_vhost)
    environ = env(project, conf)
    try:
        launched = project.launch("--pool", "solo", env=environ)
        node = launched.wait_output(READY, 40).group(1)
        check_commands(project, environ, node)
        launched.reap()
        assert launched.proc.returncode == 0, launched.output()
    finally:
        project.cleanup()


# -- the settings themselves, without a broker ------------------------------------------------------------------
def test_options_keep_what_shapes_a_connection_and_the_record_keeps_no_secret(tmp_path: Path) -> None:
    from tlrun.launch import brokerconf

    app = Celery("x", broker="sentinel://:pw1@h1:26379;sentinel://:pw1@h2:26379", set_as_current=False)
    app.conf.update(
        broker_transport_options={"master_name": "m", "sentinel_kwargs": {"password": "pw2"}, "fn": print},
        broker_failover_strategy=lambda it: it,
        control_exchange="ctl",
        result_backend="redis://:pw3@h/1",
    )
    options = brokerconf.options_from_conf(app.conf)
    assert options["broker_transport_options"] == {"master_name": "m", "sentinel_kwargs": {"password": "pw2"}}
    assert options["alternates"] == ["sentinel://:pw1@h2:26379"] and options["control_exchange"] == "ctl"
    assert "broker_failover_strategy" not in options and "result_backend" not in options
    path = tmp_path / "x.broker.json"
    url = "sentinel://:pw1@h1:26379"
    brokerconf.write_record(path, url, options)
    text = path.read_text()
    assert "pw1" not in text and "pw2" not in text and (path.stat().st_mode & 0o777) == 0o600
    # A removed secret cannot be given back from the record: the command imports the app instead.
    assert brokerconf.read_record(path, url) is None
    brokerconf.write_record(path, url, {"control_exchange": "ctl"})
    assert brokerconf.read_record(path, url) == {"control_exchange": "ctl"}
    assert brokerconf.read_record(path, "sentinel://:pw1@other:26379") is None  # another broker's
    brokerconf.register(url, options, "app")
    probe = brokerconf.celery_conf(url, 1.5, 2.5)
    assert probe["broker_url"] == "sentinel://:pw1@h1:26379;sentinel://:pw1@h2:26379"
    assert probe["broker_transport_options"]["master_name"] == "m"
    assert probe["broker_transport_options"]["socket_timeout"] == 2.5 and probe["broker_connection_timeout"] == 1.5
    assert probe["broker_connection_retry"] is False and probe["control_exchange"] == "ctl"
