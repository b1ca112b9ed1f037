"""A node name is claimed on the broker before its worker starts: two launchers that pick the same name at
the same instant (same host name, same pid: clones, containers with a fixed host name) never both keep it,
which the census before the start cannot promise (neither answers yet).

The claim is a lease of the kind the beat's (lease.py), one per node name, on its own key: on Redis
`SET tlrun:node:<name> <holder> NX PX ttl`, on RabbitMQ an exclusive queue of that name on a connection of
the launcher's. Held while the launcher runs the worker (renewed every ttl/3), released when it stops; a
name another launcher holds is renamed (`api4242-1@host`).
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from tlrun.cluster.backends import backend_for
from tlrun.cluster.lease import Backend, Holder
from tlrun.launch.steps import Step

if TYPE_CHECKING:
    from tlrun.launch.launcher import Launcher

log = logging.getLogger(__name__)

KEY_PREFIX = "tlrun:node"
TTL = 30.0


class NodeClaimStep(Step):
    """Claims each worker's node name before it starts, keeps the claims alive, lets them go at the end."""

    name = "node names"

    def __init__(self, ttl: float = TTL, holder: Holder | None = None) -> None:
        self.ttl = ttl
        self.holder = holder or Holder.new(os.getpid())
        self._claims: dict[str, Backend] = {}
        self._next = 0.0

    def claim(self, launcher: Launcher, node: str) -> bool:
        if node in self._claims:
            return True
        try:
            backend = backend_for(launcher.broker_url, node, self.ttl, prefix=KEY_PREFIX)
        except ValueError:
            return True  # a transport without a lease: the census and Celery's own check remain
        try:
            other = backend.acquire(self.holder, self.ttl)
        except OSError as exc:  # the broker is away now: the worker's start will say so
            log.debug("cannot claim node name %s: %s", node, exc)
            backend.close()
            return True
        if other is None or other == self.holder:
            self._claims[node] = backend
            return True
        backend.close()
        return False

    def poll(self, launcher: Launcher) -> bool:
        now = time.monotonic()
        if not self._claims or now < self._next:
            return False
        self._next = now + self.ttl / 3
        ours = {w.node for w in launcher.workers} | {w.next_node for w in launcher.workers if w.next_node}
        for node, backend in list(self._claims.items()):
            try:
                if node in ours:
                    backend.renew(self.holder, self.ttl)
                else:  # renamed away from it
                    self._let_go(node)
            except OSError as exc:
                log.debug("cannot renew the claim of %s: %s", node, exc)
        return False

    def _let_go(self, node: str) -> None:
        backend = self._claims.pop(node)
        backend.release(self.holder)
        backend.close()

    def close(self, launcher: Launcher) -> None:
        for node in list(self._claims):
            self._let_go(node)
