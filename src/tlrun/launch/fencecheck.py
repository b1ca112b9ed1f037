"""Opt-in (`TLRUN_FENCE_CHECK=1` in the worker's environment): a worker drops a periodic task that a beat sent
under an older beat lease than the newest it has seen.

tlrun's beat stamps every message with the lease's fencing token (`tlrun_fence`, Redis: one more at each
takeover, see cluster/fence.py). A message the old holder published just before it lost the lease can still
arrive after the new holder's first ones (a partition, a slow network). With this check the worker treats
such a message as revoked (Celery's own path: acknowledged, its state REVOKED, `task_revoked` sent, and
the log says why), so a periodic task never runs for a holder that was already replaced. Tasks without the
header (anything not sent by tlrun's beat) are never touched. For a task that must never run late at all,
Celery's `expires` is the tool: this check only orders beats.
"""

from __future__ import annotations

import logging
from typing import Any

ENV = "TLRUN_FENCE_CHECK"
HEADER = "tlrun_fence"
log = logging.getLogger("tlrun.fence")
_newest = [0]


def stale(token: Any) -> bool:
    """Is `token` older than the newest seen (and remember the newest)?"""
    if not isinstance(token, int) or isinstance(token, bool):
        return False
    if token < _newest[0]:
        return True
    _newest[0] = token
    return False


def install() -> None:
    from celery.worker import request as module

    original = module.Request.revoked

    def revoked(self: Any) -> bool:
        if original(self):
            return True
        token = self._request_dict.get(HEADER)
        if not stale(token):
            return False
        log.warning(
            "tlrun: dropping %s[%s]: sent by a beat under lease %s, older than %s (a beat that was replaced "
            "since): treated as revoked",
            self.name,
            self.id,
            token,
            _newest[0],
        )
        self._announce_revoked("fenced", False, None, True)
        return True

    module.Request.revoked = revoked
