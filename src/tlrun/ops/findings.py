"""doctor's findings, each a severity, a sentence and a fix: the app's configuration, the project's roles
against what answers, the local state (locks, launchers, the guard), and the beat lease."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from tlrun.cluster.lease import Holder
from tlrun.config import ENV_GUARD, Settings
from tlrun.errors import TlrunError
from tlrun.launch import guard, launchers
from tlrun.launch.procs import Identity
from tlrun.launch.units import WAITING
from tlrun.ops import inventory
from tlrun.ops.inventory import STANDBY
from tlrun.project.appconfig import Dialect

RECOMMENDED = "see docs/celery-settings.md"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Finding:
    code: str  # stable identifier, e.g. DUPLICATE_NODE
    severity: str  # "error" | "warning" | "info"
    message: str
    fix: str | None = None
    task: dict[str, Any] | None = None  # HUNG_TASK: node, task, id, pid, runtime, limit (omitted elsewhere)


@dataclass(frozen=True)
class NodeView:
    name: str
    replies: int
    host: str
    this_host: bool
    local_pids: tuple[int, ...]


VISIBILITY_DEFAULT_S = 3600  # kombu's Redis transport, when the app sets none


def config_findings(conf: Any, broker_url: str, running_as_root: bool, dialect: Dialect | None = None) -> list[Finding]:
    """Settings that lose or repeat tasks. `conf` is a Celery app's conf (or any mapping-like object). Each fix
    is written where and how this app is configured (`dialect`: app.conf, a config module, Django settings)."""
    found = []
    say = (dialect or Dialect("conf")).assign

    def get(key: str, default: Any = None) -> Any:
        try:
            return conf.get(key, default)
        except Exception:
            return default

    if not get("task_acks_late"):
        found.append(
            Finding(
                "ACKS_EARLY",
                "warning",
                "task_acks_late is off: a task running when its worker dies is lost",
                f"{say('task_acks_late', 'True')}, with {say('task_reject_on_worker_lost', 'True')} "
                f"(tasks must be idempotent; {RECOMMENDED})",
            )
        )
    prefetch = get("worker_prefetch_multiplier", 4)
    if isinstance(prefetch, int) and prefetch > 1:
        found.append(
            Finding(
                "PREFETCH",
                "warning",
                f"worker_prefetch_multiplier is {prefetch}: with long tasks, messages wait behind a busy "
                "worker and come back late when it dies",
                f"{say('worker_prefetch_multiplier', '1')} ({RECOMMENDED})",
            )
        )
    accept = get("accept_content") or ["json"]
    if "pickle" in accept or "application/x-python-serialize" in accept:
        found.append(
            Finding(
                "PICKLE",
                "warning",
                "accept_content allows pickle: a message on the broker can run arbitrary code",
                say("accept_content", '["json"]'),
            )
        )
    time_limit = get("task_time_limit")
    if not time_limit:
        found.append(
            Finding(
                "NO_TIME_LIMIT",
                "info",
                "no task_time_limit: a stuck task holds its worker slot forever",
                f"{say('task_time_limit', '<seconds, above your longest task>')} ({RECOMMENDED}, time limits)",
            )
        )
    parts = urlsplit(broker_url)
    if parts.scheme in ("redis", "rediss"):
        options = get("broker_transport_options") or {}
        visibility = options.get("visibility_timeout") if isinstance(options, dict) else None
        shown = f"{visibility} s" if visibility is not None else f"{VISIBILITY_DEFAULT_S} s, its default"
        visibility = VISIBILITY_DEFAULT_S if visibility is None else visibility
        wanted = f'{{"visibility_timeout": {int(time_limit * 2) if time_limit else "<above task_time_limit>"}}}'
        fix = f"{say('broker_transport_options', wanted)} ({RECOMMENDED}, time limits)"
        if time_limit and isinstance(visibility, (int, float)) and visibility < time_limit:
            found.append(
                Finding(
                    "VISIBILITY_SHORT",
                    "warning",
                    f"Redis visibility_timeout ({shown}) is shorter than task_time_limit ({time_limit} s): a task "
                    "that runs longer is delivered a second time while it still runs",
                    fix,
                )
            )
        elif not time_limit:
            found.append(
                Finding(
                    "VISIBILITY_DEFAULT",
                    "info",
                    f"Redis visibility_timeout is {shown} and tasks have no time limit: a task that runs longer "
                    "is delivered a second time while it still runs",
                    fix,
                )
            )
        if not parts.password and parts.hostname not in LOOPBACK:
            found.append(
                Finding(
                    "REDIS_NO_PASSWORD",
                    "warning",
                    f"the Redis broker on {parts.hostname} has no password",
                    "set requirepass and put the password in CELERY_BROKER_URL",
                )
            )
    if running_as_root:
        # C_FORCE_ROOT is Celery's own "yes, I mean it": then this is a note, not a warning.
        forced = bool(os.environ.get("C_FORCE_ROOT"))
        found.append(
            Finding(
                "RUNNING_AS_ROOT",
                "info" if forced else "warning",
                "workers run as root: a task can do anything to this machine"
                + (" (C_FORCE_ROOT is set)" if forced else ""),
                "run workers as an unprivileged user",
            )
        )
    return found


def role_findings(settings: Settings, nodes: list[NodeView], queues: list[tuple[str, list[str]]]) -> list[Finding]:
    """The configured roles against what answers: a missing role, a role with the wrong count, and workers
    that consume queues no role declares."""
    found = []
    live = guard.live_records(settings.project_id, [r.lock_kind for r in settings.all_roles])
    held = {kind: (record, holder) for kind, record, holder in live}
    for role in settings.all_roles:
        record, holder = held.get(role.lock_kind, ({}, None))
        # A debug-mode worker serves every role it consumes under its own name: its records say which.
        serving = str(record.get("node") or "") if record.get("in_process") else ""
        count = sum(n.replies for n in nodes if role.owns_node(n.name) or n.name == serving)
        if count == 0:
            waits = f": tasks on {', '.join(sorted(role.queue_set or []))} wait"
            if holder is None:
                advice = f"tlrun worker --role {role.name} (or tlrun dev)"
                why = "no worker of role"
            elif record.get("state") == WAITING:
                # Never advise a start the running launcher would refuse (it holds the role's lock).
                advice = f"fix the import error its log shows and save (or `tlrun stop --role {role.name}`)"
                why = f"launcher pid {holder.pid} waits for a good save: no worker of role"
            else:
                advice = f"wait for it, or `tlrun stop --role {role.name}` and start it again"
                state = record.get("state", "starting")
                why = f"launcher pid {holder.pid} holds role {role.name} ({state}), but no worker of role"
            found.append(Finding("ROLE_MISSING", "error", f"{why} {role.name} answers{waits}", advice))
        elif count != role.expected:
            found.append(
                Finding(
                    "ROLE_COUNT",
                    "warning",
                    f"{count} workers of role {role.name} answer, expected {role.expected}",
                    f"set expected = {count} under [tool.tlrun.workers.{role.name}], or stop the extra ones",
                )
            )
    declared: set[str] = set()
    for role in settings.all_roles:
        declared |= role.queue_set or set()
    for node, consumed in queues:
        extra = sorted(set(consumed) - declared)
        if extra:
            found.append(
                Finding(
                    "UNDECLARED_QUEUES",
                    "warning",
                    f"{node} consumes {', '.join(extra)}, which no role of the project file declares",
                    "declare the queue under a role in [tool.tlrun.workers], or stop that worker",
                )
            )
    return found


def state_findings(settings: Settings, running: list[launchers.Launcher] | None = None) -> list[Finding]:
    """What the environment, the locks and the live launchers say. `running`: the launchers of the project,
    when the caller found them already (doctor, from its one read of the process table)."""
    found = []
    raw = os.environ.get(ENV_GUARD)
    if raw:
        launcher = Identity.decode(raw)
        alive = launcher is not None and launcher.is_alive()
        found.append(
            Finding(
                "GUARD_IN_ENVIRONMENT",
                "warning",
                f"{ENV_GUARD} is set in this shell ({'its launcher is alive' if alive else 'stale'}): "
                "it leaked from a worker's environment",
                f"unset {ENV_GUARD}",
            )
        )
    for kind in [r.lock_kind for r in settings.all_roles] + ["beat"]:
        # Read, never lock: a probe holding the lock, even briefly, would make a launch starting then fail.
        try:
            record = guard.read_record(guard.lock_path(settings.project_id, kind))
        except TlrunError:  # an unsafe lock directory: the launch path reports it
            return found
        holder = guard.holder_identity(record)
        if record and holder is not None and not holder.is_alive():
            found.append(
                Finding(
                    "STALE_LOCK",
                    "info",
                    f"the {kind} lock names pid {record.get('pid')}, which died without releasing it; "
                    "the kernel already did (harmless: the next launch takes it)",
                    None,
                )
            )
    if running is None:
        running = launchers.find_launchers(settings.project_root)
    for role in settings.all_roles:
        mine = guard.competing_launchers(running, settings.app, [role.name], False, settings.beat)
        if len(mine) > 1:
            found.append(
                Finding(
                    "TWO_LAUNCHERS",
                    "error",
                    f"{len(mine)} tlrun launchers run the {role.name} role of this project on this host "
                    f"(pids {', '.join(str(m.identity.pid) for m in mine)}): each starts its own worker",
                    "tlrun stop, then start one launcher",
                )
            )
    return found


def lease_findings(holder: Holder | None, local: list[inventory.LocalProcess], hostname: str) -> list[Finding]:
    """The lease's holder (info), and every beat of this project running here without it (error: a beat
    started by hand, or by a launcher from before the lease; with the holder's beat, ticks run twice)."""
    found = []
    if holder is not None:
        found.append(Finding("BEAT_LEASE", "info", f"the beat lease is held by {holder.describe()}", None))
    for proc in local:
        if not proc.project or proc.kind != "beat" or proc.state == STANDBY:
            continue
        # The beat process holds the lease itself (a launcher did, before): either pid is the holder's.
        ours = holder is not None and holder.host == hostname and holder.pid in (proc.pid, proc.launcher_pid)
        if not ours:
            by = f"held by {holder.describe()}" if holder is not None else "held by nobody"
            found.append(
                Finding(
                    "BEAT_WITHOUT_LEASE",
                    "error",
                    f"beat pid {proc.pid} runs here without the cluster's beat lease ({by}): with the lease "
                    "holder's beat, every periodic task runs twice",
                    "stop it and run beat with tlrun beat (one per cluster)",
                )
            )
    return found


def redis_findings(policy: str | None, skew: float | None, ttl: float) -> list[Finding]:
    """A Redis that may evict what tlrun's guarantees rest on, or whose clock is off ours."""
    found = []
    if policy is not None and policy != "noeviction":
        what = (
            "queued tasks as well as the beat lease and the node-name claims"
            if policy.startswith("allkeys")
            else "the keys with a ttl: the beat lease and the node-name claims (a lease evicted early stops its "
            "holder at its next send, and a standby takes over)"
        )
        found.append(
            Finding(
                "REDIS_EVICTION",
                "warning",
                f"the broker's Redis has a memory limit with maxmemory-policy {policy}: it can evict {what}",
                "CONFIG SET maxmemory-policy noeviction (Celery's own advice for a Redis broker)",
            )
        )
    margin = max(1.0, ttl / 6)
    if skew is not None and abs(skew) > margin:
        found.append(
            Finding(
                "CLOCK_SKEW",
                "warning",
                f"the Redis server's clock is {skew:+.1f} s off this host's (more than the beat lease's margin, "
                f"{margin:g} s): expiry times and the lease's `since` disagree between hosts",
                "synchronise the clocks (NTP, chrony)",
            )
        )
    return found


def memory_finding(pid: int, record: dict[str, Any]) -> Finding:
    """MEMORY_GUARD: the limit, the tree and each pool child as the worker's launcher last sampled them (info),
    a warning once the guard had to kill a pool child."""

    def mib(n: Any) -> str:
        return f"{int(n) / 1048576:.0f} MiB"

    children = ", ".join(f"pid {c} {mib(size)}" for c, size in (record.get("children") or {}).items())
    message = (
        f"worker pid {pid}: tree {mib(record.get('tree', 0))} of its {mib(record.get('limit', 0))} limit (PSS)"
        + (f"; pool children: {children}" if children else "")
    )
    kills = record.get("kills") or {}
    if kills:
        said = ", ".join(f"{task} x{n}" for task, n in kills.items())
        return Finding("MEMORY_GUARD", "warning", f"{message}; killed pool children running: {said}", None)
    return Finding("MEMORY_GUARD", "info", message, None)
