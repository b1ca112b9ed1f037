"""`tlrun export kubernetes`: the project's worker roles and beat as Kubernetes manifests, with the stop
semantics, probes and node names the docs describe (docs/kubernetes.md), and autoscaling on what the queue
and the workers say (KEDA). Pure rendering from the validated spec; the CLI prints or writes it.

- One Deployment per role: `tlrun worker --role R` as the container's command (tlrun is PID 1: it reaps,
  turns the kubelet's SIGTERM into the warm stop ladder, exits with the worker's status);
  `terminationGracePeriodSeconds` above tlrun's grace; liveness from local evidence (no broker: an outage
  never restarts healthy pods), readiness through the broker; a rolling update that starts a new pod before
  an old one stops (maxSurge 1, maxUnavailable 0); memory from the role's `memory_limit`.
- beat: a Deployment of 2 (the broker lease lets one send; the other stands by warm).
- A PodDisruptionBudget per Deployment (a drain never takes every worker of a role at once).
- `--metrics-port`: the endpoint on every pod, a headless Service and a ServiceMonitor (prometheus-operator).
- `--keda`: a ScaledObject per role on (queued + active) per worker, from Prometheus: the queue length comes
  from the one launcher holding the metrics lease, beat's when no worker runs, so a role scaled to zero is
  woken by its queue.
- No secret in the output: the broker URL comes from a Secret the user creates (`--broker-secret`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tlrun.config import Role
from tlrun.deploy.export import STOP_MARGIN, ServiceSpec
from tlrun.deploy.yamltext import stream
from tlrun.errors import ConfigError

METRICS_PORT = 9808  # celery-exporter's port: dashboards and scrape configs already point there
PROMETHEUS_URL = "http://prometheus-operated.monitoring.svc:9090"  # prometheus-operator's default Service
LAUNCHER_MEMORY = 128 * 1024 * 1024  # tlrun and Celery's main process above the role's memory_limit (PSS)
CPU_PER_PROCESS_M = 100  # millicores requested per pool process: the scheduler's share, not a cap
LIVENESS_WINDOW = 30
JOB_LABEL = "tlrun/job"  # the Service label whose value names the scrape job
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]*$")
_SECRET = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[-._A-Za-z0-9]+$")


@dataclass(frozen=True)
class KubeOptions:
    image: str
    namespace: str | None = None
    workdir: str = "/app"
    broker_secret: str = ""  # name/key of the Secret holding CELERY_BROKER_URL; default <name>-broker/url
    replicas: int = 1
    metrics_port: int | None = None
    keda: bool = False
    min_replicas: int = 0
    max_replicas: int = 10
    prometheus_url: str = PROMETHEUS_URL


def dns_name(text: str) -> str:
    """A name Kubernetes takes (a DNS label): lower case, runs of anything else as one dash."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")


def _check(spec: ServiceSpec, opts: KubeOptions) -> str:
    """Validate what goes into the manifests; the project's base name."""
    if not _IMAGE.match(opts.image) or len(opts.image) > 512:
        raise ConfigError(f"--image {opts.image[:80]!r} is not an image reference", hint="e.g. registry/proj:1.4")
    if opts.namespace is not None and (not _DNS_LABEL.match(opts.namespace) or len(opts.namespace) > 63):
        raise ConfigError(f"--namespace {opts.namespace[:80]!r} is not a Kubernetes namespace name")
    if not opts.workdir.startswith("/") or any(ch in opts.workdir for ch in "\n\r\0"):
        raise ConfigError(f"--workdir {opts.workdir[:80]!r} must be an absolute path in the image")
    if opts.broker_secret and not _SECRET.match(opts.broker_secret):
        raise ConfigError(f"--broker-secret {opts.broker_secret[:80]!r}: expected NAME/KEY of a Secret")
    if not re.match(r"^https?://[^\s\"'\\]+$", opts.prometheus_url):
        raise ConfigError(f"--prometheus-url {opts.prometheus_url[:80]!r} is not an http(s) URL")
    if not 0 <= opts.min_replicas <= opts.max_replicas:
        raise ConfigError(f"--min-replicas {opts.min_replicas} is above --max-replicas {opts.max_replicas}")
    base = dns_name(spec.name)
    longest = max((len(dns_name(r.name)) for r in spec.roles), default=0)
    if not base or len(base) + 1 + max(longest, len("worker")) > 52:
        raise ConfigError(
            f"{base[:80]!r} is too long for a Kubernetes name with its role (52 characters, so that pod names "
            "keep their hash)"
        )
    for role in spec.roles:
        if opts.keda and not role.worker.concurrency:
            raise ConfigError(
                f"role {role.name}: --keda scales on queued + active tasks per worker, which needs the role's "
                "concurrency",
                hint=f"set concurrency in [tool.tlrun.workers.{role.name}]"
                if role.declared
                else "export with TLRUN_CONCURRENCY=N in the environment (the worker's --concurrency)",
            )
    return base


def _labels(base: str, component: str, role: str | None = None) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": base, "app.kubernetes.io/component": component}
    if role is not None:
        labels["tlrun/role"] = role
    return labels


def _meta(name: str, opts: KubeOptions, labels: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if opts.namespace:
        meta["namespace"] = opts.namespace
    meta["labels"] = {**labels, "app.kubernetes.io/managed-by": "tlrun"}
    return meta


def _secret(base: str, opts: KubeOptions) -> tuple[str, str]:
    name, _, key = (opts.broker_secret or f"{base}-broker/url").partition("/")
    return name, key


def _resources(role: Role) -> dict[str, Any]:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if role.worker.concurrency and (role.worker.pool or "prefork") in ("prefork", "processes"):
        requests["cpu"] = f"{CPU_PER_PROCESS_M * role.worker.concurrency}m"
    if role.memory_limit:
        # tlrun's memory guard acts at memory_limit (the tree's PSS); the kernel's OOM killer only above it.
        mebibytes = -(-(role.memory_limit + LAUNCHER_MEMORY) // (1024 * 1024))
        requests["memory"] = limits["memory"] = f"{mebibytes}Mi"
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _container(opts: KubeOptions, base: str, name: str, argv: list[str]) -> dict[str, Any]:
    secret, key = _secret(base, opts)
    container: dict[str, Any] = {"name": name, "image": opts.image, "workingDir": opts.workdir, "command": argv}
    container["env"] = [
        {"name": "CELERY_BROKER_URL", "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if opts.metrics_port:
        container["ports"] = [{"name": "metrics", "containerPort": opts.metrics_port}]
    container["securityContext"] = {"allowPrivilegeEscalation": False}
    return container


def _metrics_args(opts: KubeOptions) -> list[str]:
    return ["--metrics-port", str(opts.metrics_port), "--metrics-addr", "0.0.0.0"] if opts.metrics_port else []


def _deployment(
    spec: ServiceSpec,
    opts: KubeOptions,
    name: str,
    labels: dict[str, str],
    container: dict[str, Any],
    replicas: int | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if replicas is not None:
        body["replicas"] = replicas
    body["selector"] = {"matchLabels": labels}
    body["strategy"] = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    body["template"] = {
        "metadata": {"labels": labels},
        "spec": {"terminationGracePeriodSeconds": spec.stop_timeout, "containers": [container]},
    }
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(name, opts, labels), "spec": body}


def role_argv(spec: ServiceSpec, role: Role, *tail: str) -> list[str]:
    """`tlrun <command> -A APP [--role R]`: the implicit role has no --role."""
    return ["tlrun", *tail[:1], "-A", spec.app, *(["--role", role.name] if role.declared else []), *tail[1:]]


def _worker(spec: ServiceSpec, opts: KubeOptions, base: str, role: Role) -> list[dict[str, Any]]:
    rname = dns_name(role.name) if role.declared else "worker"
    name = f"{base}-{rname}"
    labels = _labels(base, "worker", rname)
    # A declared role's options are in the project file the image holds; the implicit role's may come from the
    # exporting shell's environment (TLRUN_CONCURRENCY, .env), which the pod does not have: written out.
    own = ["--concurrency", str(role.worker.concurrency)] if role.worker.concurrency and not role.declared else []
    argv = role_argv(spec, role, "worker", *own, "--grace", f"{spec.grace:g}", "--restart", *_metrics_args(opts))
    container = _container(opts, base, "worker", argv)
    container["readinessProbe"] = {
        "exec": {"command": role_argv(spec, role, "health", "--readiness", "--timeout", "2", "--retries", "1")},
        "initialDelaySeconds": 5,
        "periodSeconds": 15,
        "timeoutSeconds": 10,
    }
    container["livenessProbe"] = {
        "exec": {"command": role_argv(spec, role, "health", "--liveness", "--window", str(LIVENESS_WINDOW))},
        "initialDelaySeconds": 30,
        "periodSeconds": 30,
        "timeoutSeconds": 10,
        "failureThreshold": 3,
    }
    resources = _resources(role)
    if resources:
        container["resources"] = resources
    replicas = None if opts.keda else opts.replicas  # KEDA's HPA owns the count: an apply must not reset it
    out = [_deployment(spec, opts, name, labels, container, replicas), _pdb(opts, name, labels, "maxUnavailable")]
    if opts.keda:
        out.append(_scaled_object(opts, base, role, name, labels))
    return out


def _beat(spec: ServiceSpec, opts: KubeOptions, base: str) -> list[dict[str, Any]]:
    name = f"{base}-beat"
    labels = _labels(base, "beat")
    argv = ["tlrun", "beat", "-A", spec.app, "--grace", f"{spec.grace:g}", *_metrics_args(opts)]
    container = _container(opts, base, "beat", argv)
    return [_deployment(spec, opts, name, labels, container, 2), _pdb(opts, name, labels, "minAvailable")]


def _pdb(opts: KubeOptions, name: str, labels: dict[str, str], rule: str) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(name, opts, labels),
        "spec": {rule: 1, "selector": {"matchLabels": labels}},
    }


def _metrics(opts: KubeOptions, base: str) -> list[dict[str, Any]]:
    labels = {"app.kubernetes.io/name": base, "app.kubernetes.io/component": "metrics"}
    # The scrape job is named `celery` (the ServiceMonitor's jobLabel): celery-exporter's dashboards and alerts
    # select job=~"celery|celery-exporter" and job=~".*celery.*".
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(f"{base}-metrics", opts, {**labels, JOB_LABEL: "celery"}),
        "spec": {
            "clusterIP": "None",  # headless: Prometheus scrapes every pod, the Service only names them
            "selector": {"app.kubernetes.io/name": base},
            "ports": [{"name": "metrics", "port": opts.metrics_port, "targetPort": "metrics"}],
        },
    }
    monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _meta(f"{base}-metrics", opts, labels),
        "spec": {
            "jobLabel": JOB_LABEL,
            "selector": {"matchLabels": labels},
            "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}],
        },
    }
    return [service, monitor]


def promql_regex(names: list[str]) -> str:
    """An RE2 alternation matching exactly these names, inside a PromQL double-quoted string."""
    escaped = [re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\1", n) for n in sorted(names)]
    return "|".join(escaped).replace("\\", "\\\\").replace('"', '\\"')


def scale_query(opts: KubeOptions, base: str, role: Role) -> str:
    """(queued + active) of the role, summed over the cluster: KEDA divides it by the threshold (concurrency)."""
    from tlrun.ops.consuming import wanted_queues

    where = f'service="{base}-metrics"' + (f',namespace="{opts.namespace}"' if opts.namespace else "")
    queues = promql_regex(wanted_queues(role.queue_set))
    worker = role.name.replace("\\", "\\\\").replace('"', '\\"')
    return (
        f'(sum(celery_queue_length{{{where},queue_name=~"{queues}"}}) or vector(0)) + '
        f'(sum(celery_worker_tasks_active{{{where},worker="{worker}"}}) or vector(0))'
    )


def _scaled_object(opts: KubeOptions, base: str, role: Role, target: str, labels: dict[str, str]) -> dict[str, Any]:
    assert role.worker.concurrency
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _meta(target, opts, labels),
        "spec": {
            "scaleTargetRef": {"name": target},
            "minReplicaCount": opts.min_replicas,
            "maxReplicaCount": opts.max_replicas,
            "pollingInterval": 15,
            # Scale down slowly: a pod that stops gets the warm stop ladder, but a new one costs a cold start.
            "cooldownPeriod": 300,
            "triggers": [
                {
                    "type": "prometheus",
                    "metadata": {
                        "serverAddress": opts.prometheus_url,
                        "query": scale_query(opts, base, role),
                        "threshold": str(role.worker.concurrency),
                        "activationThreshold": "0",
                        "ignoreNullValues": "false",
                    },
                }
            ],
        },
    }


def notes(spec: ServiceSpec, opts: KubeOptions) -> list[str]:
    """What the manifests leave out or assume, for the user (stderr)."""
    said = []
    if spec.processes:
        names = ", ".join(p.name for p in spec.processes)
        said.append(f"the stack's processes ({names}) are not exported: run them as Deployments of their own")
    for role in spec.roles:
        if not role.worker.concurrency:
            said.append(
                f"role {role.name} sets no concurrency: in a pod Celery starts one process per core of the node "
                "(os.cpu_count ignores CPU limits); set it"
            )
        if not role.memory_limit:
            said.append(f"role {role.name} has no memory_limit: its pods get no memory request or limit")
    if opts.keda and opts.min_replicas == 0 and not spec.beat:
        said.append(
            "no beat: with every worker of a role scaled to zero nobody publishes its queue length; "
            "use --min-replicas 1 or run beat (it publishes the queue lengths)"
        )
    secret, key = _secret(dns_name(spec.name), opts)
    namespace = f" -n {opts.namespace}" if opts.namespace else ""
    said.append(
        f"the pods read CELERY_BROKER_URL from Secret {secret} (key {key}): kubectl create secret generic "
        f"{secret}{namespace} --from-literal={key}=redis://..."
    )
    return said


def manifests(spec: ServiceSpec, opts: KubeOptions) -> list[dict[str, Any]]:
    base = _check(spec, opts)
    if opts.keda and opts.metrics_port is None:
        raise ConfigError("--keda needs the metrics endpoint", hint="add --metrics-port 9808")
    out: list[dict[str, Any]] = []
    for role in spec.roles:
        out += _worker(spec, opts, base, role)
    if spec.beat:
        out += _beat(spec, opts, base)
    if opts.metrics_port:
        out += _metrics(opts, base)
    return out


HEADER = (
    "# Generated by `tlrun export kubernetes`. tlrun is each container's PID 1: SIGTERM starts its warm stop\n"
    "# ladder, which ends before terminationGracePeriodSeconds (grace + {margin} s). See docs/kubernetes.md.\n"
)


def render(spec: ServiceSpec, opts: KubeOptions) -> dict[str, str]:
    """File name -> text: one YAML stream (`-o DIR` writes it with a kustomization.yaml naming it)."""
    text = stream(manifests(spec, opts), HEADER.format(margin=STOP_MARGIN))
    name = f"{dns_name(spec.name)}.yaml"
    return {name: text, "kustomization.yaml": f"resources:\n  - {name}\n"}
