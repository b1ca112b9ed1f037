"""`tlrun doctor --cluster`: every node of the app across hosts, from the broker alone (raw ping replies and
`active_queues` replies), grouped by host, with duplicates, roles, and the host holding the beat lease."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tlrun.config import Role, Settings
from tlrun.errors import BrokerError, DuplicateNodeError
from tlrun.launch import verify
from tlrun.launch.broker import broker_for_command
from tlrun.redact import redact_url


@dataclass(frozen=True)
class ClusterNode:
    name: str
    host: str
    replies: int  # raw ping replies to this name: 2 or more is a duplicate
    role: str | None  # the project role it serves (node name prefix, else the queues it consumes)
    queues: tuple[str, ...]  # from its active_queues reply (the union over duplicates)


@dataclass(frozen=True)
class ClusterView:
    app: str
    broker_url: str  # redacted
    nodes: tuple[ClusterNode, ...]
    beat_lease: str | None  # "hostA pid 4242 since ..."
    beat_lease_host: str | None

    @property
    def hosts(self) -> dict[str, list[ClusterNode]]:
        grouped: dict[str, list[ClusterNode]] = collections.defaultdict(list)
        for node in self.nodes:
            grouped[node.host].append(node)
        return dict(sorted(grouped.items()))

    @property
    def duplicates(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.replies > 1]

    @property
    def exit_code(self) -> int:
        return DuplicateNodeError.exit_code if self.duplicates else 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "broker_url": self.broker_url,
            "beat_lease": self.beat_lease,
            "beat_lease_host": self.beat_lease_host,
            "hosts": {host: [asdict(n) for n in nodes] for host, nodes in self.hosts.items()},
            "duplicates": [n.name for n in self.duplicates],
            "exit_code": self.exit_code,
        }


def role_for(name: str, queues: Sequence[str], roles: Sequence[Role]) -> str | None:
    for role in roles:
        if role.owns_node(name):
            return role.name
    consumed = set(queues)
    for role in roles:
        if role.queue_set and role.queue_set & consumed:
            return role.name
    return None


def build(
    app: str,
    url: str,
    pings: Sequence[str],
    queues: Sequence[tuple[str, list[str]]],
    roles: Sequence[Role],
    holder: Any,
) -> ClusterView:
    """Pure: the view from the raw replies."""
    counts = collections.Counter(pings)
    consumed: dict[str, set[str]] = collections.defaultdict(set)
    for node, names in queues:
        consumed[node].update(names)
    nodes = []
    for name in sorted(set(counts) | set(consumed)):
        host = name.partition("@")[2] or "?"
        nodes.append(
            ClusterNode(
                name,
                host,
                counts.get(name, 0),
                role_for(name, sorted(consumed[name]), roles),
                tuple(sorted(consumed[name])),
            )
        )
    return ClusterView(
        app,
        redact_url(url),
        tuple(nodes),
        holder.describe() if holder is not None else None,
        holder.host if holder is not None else None,
    )


def cluster_view(settings: Settings) -> ClusterView:
    """Ask the broker: a ping census and an active_queues census at once, and the beat lease's holder."""
    from tlrun.cluster.backends import backend_for
    from tlrun.cluster.lease import lease_name

    url, _ = broker_for_command(settings)
    census: verify.Census[list[str]] = verify.Census(url, settings.ping_window).start()
    queues: verify.Census[list[tuple[str, list[str]]]] = verify.Census(
        url, settings.ping_window, lambda broker, window: broker.active_queues(window)
    ).start()
    holder = None
    try:
        backend = backend_for(url, lease_name(settings.app, settings.project_name), settings.beat_lock_ttl)
    except ValueError:
        backend = None
    if backend is not None:
        try:
            holder = backend.current()
        except OSError:
            holder = None
        finally:
            backend.close()
    pings = census.result()  # raises BrokerError: the CLI reports it
    try:
        consumed = queues.result()
    except BrokerError:
        consumed = []
    return build(settings.app, url, pings, consumed, settings.all_roles, holder)
