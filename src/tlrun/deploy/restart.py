"""When to restart a crashed worker: exponential backoff with jitter, and a rule for giving up.

Pure logic: the clock and the random source are passed in, so the policy is tested without waiting.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RestartSettings:
    first_delay: float = 1.0  # seconds before the first restart
    max_delay: float = 60.0  # the backoff never waits longer
    give_up_crashes: int = 5  # give up after this many crashes ...
    give_up_window: float = 300.0  # ... within this many seconds
    max_restarts: int = 0  # 0: no limit on restarts in total
    jitter: float = 0.25  # each delay is stretched by up to this fraction, at random


@dataclass
class RestartPolicy:
    settings: RestartSettings
    clock: Callable[[], float] = time.monotonic
    rand: Callable[[], float] = random.random
    restarts: int = 0
    _crashes: deque[float] = field(default_factory=deque)

    def on_crash(self) -> float | None:
        """Record a crash; the delay before the next start, or None when it is time to give up."""
        s = self.settings
        now = self.clock()
        self._crashes.append(now)
        while self._crashes and now - self._crashes[0] > s.give_up_window:
            self._crashes.popleft()
        if len(self._crashes) >= s.give_up_crashes:
            return None
        if s.max_restarts and self.restarts >= s.max_restarts:
            return None
        # Crashes in a row (within the window) double the delay: 1, 2, 4 ... up to max_delay.
        base = min(s.max_delay, s.first_delay * 2.0 ** (len(self._crashes) - 1))
        self.restarts += 1
        return float(base * (1 + s.jitter * self.rand()))

    def why_given_up(self) -> str:
        s = self.settings
        if s.max_restarts and self.restarts >= s.max_restarts:
            return f"{self.restarts} restarts, the --max-restarts limit"
        return f"{len(self._crashes)} crashes within {s.give_up_window:g} s"
