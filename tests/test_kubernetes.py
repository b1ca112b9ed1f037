"""`tlrun export kubernetes`: the manifests validate strictly (kubernetes-validate for the built-in kinds, the
vendored KEDA and prometheus-operator CRD schemas for the rest), hold no secret, and what they run is run here
as written: a role's pod (its command as PID 1 of a PID namespace with its own host name, the probes' exec
commands inside it, the kubelet's SIGTERM ended within terminationGracePeriodSeconds), and beat's two replicas
(one sends, the other stands by; with no worker running, beat's pod publishes every role's queue length, the
series the ScaledObject's query reads)."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import psutil
import pytest
import yaml

from helpers import Launched, Project, client, free_port, wait_for
from test_consuming import scrape

pytestmark = pytest.mark.timeout(180)
BIN = Path(sys.executable).parent
CRDS = Path(__file__).parent / "data" / "crds"
READY = r"tlrun: \d+ workers? ready: (\S+) \(pid (\d+)\)"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="PID and UTS namespaces of their own need root")

PROJECT = """
[tool.tlrun]
app = "{app}"
beat = true

[tool.tlrun.workers.default]
queues = ["celery"]
concurrency = 2
memory_limit = "300MB"

[tool.tlrun.workers.io_bound]
queues = ["io", "io.slow"]
concurrency = 3
"""


def export(project: Project, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return project.run("export", "kubernetes", "--image", "registry.example.com/proj:1.0", *args, env=env)


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def kinds(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _strict(schema: Any) -> Any:
    """A CRD's schema with unknown fields refused (the API server would prune them silently)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(x) for x in schema]
    return schema


def crd_errors(doc: dict[str, Any]) -> list[str]:
    """What the vendored CRD schema of doc's kind says against it, strictly."""
    files = {
        "ScaledObject": "keda.sh_scaledobjects.yaml",
        "ServiceMonitor": "monitoring.coreos.com_servicemonitors.yaml",
    }
    crd = yaml.safe_load((CRDS / files[doc["kind"]]).read_text())
    group, _, version = doc["apiVersion"].partition("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == doc["kind"]
    served = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    assert served, f"{doc['apiVersion']} is not a served version of {doc['kind']}"
    schema = _strict(served[0]["schema"]["openAPIV3Schema"])
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def validate(docs: list[dict[str, Any]], tmp: Path) -> list[str]:
    """Every problem found: kubernetes-validate --strict on the built-in kinds, the CRD schemas on the others."""
    builtin = [d for d in docs if d["kind"] not in ("ScaledObject", "ServiceMonitor")]
    path = tmp / f"builtin-{len(list(tmp.glob('builtin-*')))}.yaml"
    path.write_text(yaml.safe_dump_all(builtin))
    run = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", "--quiet", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    problems = [] if run.returncode == 0 and "WARN" not in run.stdout + run.stderr else [run.stdout + run.stderr]
    for doc in docs:
        if doc["kind"] in ("ScaledObject", "ServiceMonitor"):
            problems += crd_errors(doc)
    return problems


@pytest.fixture
def roles_project(project: Project) -> Project:
    (project.root / "pyproject.toml").write_text(PROJECT.format(app=project.app))
    (project.root / "Procfile").write_text("web: python -m http.server $PORT\n")
    return project


def test_the_manifests_validate_strictly_hold_no_secret_and_stop_within_the_pods_grace(
    roles_project: Project, tmp_path: Path
) -> None:
    project = roles_project
    secret_url = project.broker_url.replace("redis://", "redis://:s3cret-pw@")
    env = project.env(CELERY_BROKER_URL=secret_url)
    args = ["--namespace", "jobs", "--keda", "--grace", "40", "--project-dir", str(project.root)]
    done = project.run("export", "kubernetes", "--image", "registry.example.com/proj:1.0", *args, env=env)
    assert done.returncode == 0, done.stderr
    assert "s3cret-pw" not in done.stdout + done.stderr
    assert "processes (web) are not exported" in done.stderr and "Secret tlrun-" in done.stderr
    docs = documents(done.stdout)
    assert validate(docs, tmp_path) == []
    # The negative controls: the same checks refuse a field they do not know, in each kind of document.
    for kind in ("Deployment", "ScaledObject", "ServiceMonitor", "PodDisruptionBudget"):
        spoiled = copy.deepcopy(docs)
        kinds(spoiled, kind)[0]["spec"]["notAField"] = 1
        assert validate(spoiled, tmp_path), f"an unknown field in a {kind} passed"
    deployments = {d["metadata"]["name"]: d for d in kinds(docs, "Deployment")}
    assert sorted(deployments) == [
        "tlrun-" + re.sub(r"[^a-z0-9]+", "-", project.app.lower()) + s for s in ("-beat", "-default", "-io-bound")
    ]
    for name, d in deployments.items():
        pod = d["spec"]["template"]["spec"]
        command = pod["containers"][0]["command"]
        assert command[command.index("--grace") + 1] == "40" and pod["terminationGracePeriodSeconds"] > 40
        assert d["metadata"]["namespace"] == "jobs"
        assert d["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        if name.endswith("-beat"):
            assert d["spec"]["replicas"] == 2 and command[:2] == ["tlrun", "beat"]
        else:
            assert "replicas" not in d["spec"]  # KEDA's HPA owns the count
            assert command[:2] == ["tlrun", "worker"] and "--restart" in command
    io = deployments[next(n for n in deployments if n.endswith("-io-bound"))]["spec"]["template"]["spec"]
    assert io["containers"][0]["command"][4:6] == ["--role", "io_bound"]
    default = deployments[next(n for n in deployments if n.endswith("-default"))]["spec"]["template"]["spec"]
    memory = default["containers"][0]["resources"]["limits"]["memory"]
    assert int(memory.removesuffix("Mi")) * 2**20 > 300 * 10**6  # above the guard's limit: tlrun acts first
    scaled = {s["spec"]["scaleTargetRef"]["name"]: s["spec"] for s in kinds(docs, "ScaledObject")}
    assert set(scaled) == {n for n in deployments if not n.endswith("-beat")}
    trigger = next(s for n, s in scaled.items() if n.endswith("-io-bound"))["triggers"][0]["metadata"]
    assert trigger["threshold"] == "3" and 'queue_name=~"io|io\\\\.slow"' in trigger["query"]
    assert 'worker="io_bound"' in trigger["query"] and 'namespace="jobs"' in trigger["query"]
    assert len(kinds(docs, "PodDisruptionBudget")) == 3 and len(kinds(docs, "Service")) == 1
    # -o DIR: the same stream, with a kustomization naming it.
    out = tmp_path / "k8s"
    written = project.run(
        "export", "kubernetes", "--image", "registry.example.com/proj:1.0", *args, "-o", str(out), env=env
    )
    assert written.returncode == 0, written.stderr
    (stream,) = yaml.safe_load((out / "kustomization.yaml").read_text())["resources"]
    assert (out / stream).read_text() == done.stdout


def test_export_kubernetes_refuses_what_it_cannot_render(roles_project: Project) -> None:
    project = roles_project
    no_image = project.run("export", "kubernetes")
    assert no_image.returncode == 2 and "--image" in no_image.stderr and "Traceback" not in no_image.stderr
    other_kind = project.run("export", "systemd", "--keda")
    assert other_kind.returncode == 2 and "export kubernetes" in other_kind.stderr
    for bad in (
        ["--namespace", "Jobs_1"],
        ["--image", "a b"],
        ["--broker-secret", "nokey"],
        ["--workdir", "app"],
        ["--prometheus-url", 'http://x"y'],
        ["--min-replicas", "5", "--max-replicas", "2"],
    ):
        done = export(project, *bad)
        assert done.returncode == 3 and bad[0] in done.stderr and "Traceback" not in done.stderr, done.stderr
    (project.root / "pyproject.toml").write_text(PROJECT.format(app=project.app).replace("concurrency = 3\n", ""))
    done = export(project, "--keda")
    assert done.returncode == 3 and "role io_bound" in done.stderr, done.stderr
    assert "set concurrency in [tool.tlrun.workers.io_bound]" in done.stderr, done.stderr
    (project.root / "pyproject.toml").write_text(f'[tool.tlrun]\napp = "{project.app}"\n')  # the implicit role
    done = export(project, "--keda")
    assert done.returncode == 3 and "TLRUN_CONCURRENCY=N" in done.stderr, done.stderr
    assert export(project, "--keda", env=project.env(TLRUN_CONCURRENCY="4")).returncode == 0


# -- what the manifests run, run as written ---------------------------------------------------------------------
class Pod:
    """A container of an exported Deployment: its command as PID 1 of a PID namespace with its own /proc and
    host name (the pod's), its env with the Secret's value, its own HOME (a container's filesystem), no
    XDG_RUNTIME_DIR (a container has none). Commands run inside as the kubelet's exec probes run them."""

    def __init__(self, project: Project, name: str, container: dict[str, Any], extra: dict[str, str]) -> None:
        home = project.base / f"home-{name}"
        home.mkdir(exist_ok=True)
        env = {"PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin", "HOME": str(home), **extra}
        for var in container["env"]:
            if "valueFrom" in var:  # secretKeyRef: the broker URL the user put in the Secret
                env[var["name"]] = project.broker_url
            else:
                env[var["name"]] = var["value"]
        self.env = env
        self.project = project
        command = " ".join(shlex.quote(a) for a in container["command"])
        argv = ["unshare", "--pid", "--fork", "--mount-proc", "--uts", "sh", "-c", f"hostname {name} && exec {command}"]
        self.launched = Launched(argv, project.root, env, project.base / f"pod-{name}.txt")
        project.started.append(self.launched)
        self.tlrun = wait_for(lambda: next(iter(psutil.Process(self.launched.pid).children()), None), 10, "PID 1")

    def exec(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        enter = ["nsenter", "--target", str(self.tlrun.pid), "--pid", "--mount", "--uts", f"--wd={self.project.root}"]
        return subprocess.run(
            [*enter, *argv], env=self.env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
        )


def _deployment(docs: list[dict[str, Any]], suffix: str) -> dict[str, Any]:
    return next(d for d in kinds(docs, "Deployment") if d["metadata"]["name"].endswith(suffix))


@needs_root
def test_a_role_pod_runs_as_written_answers_its_probes_and_ends_within_its_grace(roles_project: Project) -> None:
    project = roles_project
    done = export(project, "--grace", "6")
    assert done.returncode == 0, done.stderr
    deployment = _deployment(documents(done.stdout), "-io-bound")
    pod_spec = deployment["spec"]["template"]["spec"]
    container = pod_spec["containers"][0]
    assert container["workingDir"] == "/app"  # the image's; here the project's checkout
    pod = Pod(project, "io-bound-7d9f-x2x", container, {"TEST_RESULT_BACKEND": project.broker_url})
    node = pod.launched.wait_output(READY, 60).group(1)
    assert re.match(r"^io_bound\d{9}@io-bound-7d9f-x2x$", node) or node.endswith("@io-bound-7d9f-x2x"), node
    for probe in ("readinessProbe", "livenessProbe"):
        answer = pod.exec(container[probe]["exec"]["command"])
        assert answer.returncode == 0, f"{probe}: {answer.stdout}{answer.stderr}"
    result = client(project.broker_url).send_task(f"{project.app}.add", (2, 3), queue="io.slow")
    assert result.get(timeout=30) == 5
    pod.tlrun.send_signal(signal.SIGTERM)  # the kubelet stops the pod
    assert pod.launched.wait(pod_spec["terminationGracePeriodSeconds"]) == 0, pod.launched.output()
    after = pod.launched.output()
    assert "Traceback" not in after


@needs_root
def test_beats_two_replicas_one_sends_and_it_publishes_every_queue_with_no_worker_running(
    roles_project: Project,
) -> None:
    project = roles_project
    done = export(project, "--keda")
    assert done.returncode == 0, done.stderr
    docs = documents(done.stdout)
    container = _deployment(docs, "-beat")["spec"]["template"]["spec"]["containers"][0]
    port = container["ports"][0]["containerPort"]
    # Two pods have a network each; here they share one, so each listens on a free port of its own.
    ports = [free_port(), free_port()]
    pods = []
    for i, name in enumerate(("beat-5c7-a", "beat-5c7-b")):
        own = copy.deepcopy(container)
        own["command"] = [str(ports[i]) if word == str(port) else word for word in own["command"]]
        assert own["command"] != container["command"]
        pods.append(Pod(project, name, own, {"TLRUN_CONSUME_CHECK_EVERY": "1"}))
    # Started together: either takes the lease, the other stands by.
    holder = wait_for(
        lambda: next(
            (p for p in pods if re.search(r"beat lease taken \(beat-5c7-[ab] pid", p.launched.output())), None
        ),
        60,
        "one beat holding the lease",
    )
    standby = pods[1 - pods.index(holder)]
    host = "beat-5c7-a" if holder is pods[0] else "beat-5c7-b"
    standby.launched.wait_output(rf"beat held by {host} pid \d+ since \S+; standing by", 60)
    for i in range(4):
        client(project.broker_url).send_task(f"{project.app}.add", (i, i), queue="io.slow")
    client(project.broker_url).send_task(f"{project.app}.add", (1, 1), queue="celery")

    def published() -> list[dict[str, float]]:
        found = []
        for p in ports:
            try:
                samples = scrape(p)
            except OSError:
                continue
            lengths = {labels["queue_name"]: value for labels, value in samples.get("celery_queue_length", [])}
            if lengths:
                found.append(lengths)
        assert len(found) <= 1, f"two pods publish queue lengths: {found}"
        return found

    want = {"celery": 1.0, "io": 0.0, "io.slow": 4.0}
    wait_for(lambda: published() == [want], 30, f"one pod publishing {want}")
    # The queues the ScaledObjects' queries name are the ones published.
    for scaled in kinds(docs, "ScaledObject"):
        query = scaled["spec"]["triggers"][0]["metadata"]["query"]
        pattern = json.loads('"' + re.search(r'queue_name=~"((?:[^"\\]|\\.)*)"', query).group(1) + '"')  # type: ignore[union-attr]
        assert any(re.fullmatch(pattern, q) for q in want), query
    for pod in pods:
        pod.tlrun.send_signal(signal.SIGTERM)
    for pod in pods:
        assert pod.launched.wait(60) == 0, pod.launched.output()
