"""Watch the project's Python files (watchfiles) on a background thread; the main thread swaps workers
(tlrun/deploy/swap.py, the reload path dev shares with production).

Only the main thread spawns (the parent-death signal is tied to the thread that forks), so the watcher
just collects changes and the supervisor loop picks them up.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

IGNORED_DIRS = (
    "venv",
    "env",
    ".venv",
    ".env",
    "build",
    "dist",
    ".ruff_cache",
    ".eggs",
    ".nox",
    "site-packages",
    "logs",
)


class Watcher:
    def __init__(self, root: Path, ignore_paths: Sequence[Path] = (), debounce_ms: int = 1600, step_ms: int = 50):
        self.root = root
        self._ignore = [str(p) for p in ignore_paths]
        self._debounce = debounce_ms
        self._step = step_ms
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._changed: set[str] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tlrun-reload", daemon=True)
        self.on_change: Callable[[], None] = lambda: None  # wakes the supervisor's loop (supervise.py)

    def start(self) -> Watcher:
        self._thread.start()
        self._ready.wait(5)
        return self

    def _run(self) -> None:
        from watchfiles import PythonFilter, watch

        class ProjectFilter(PythonFilter):
            ignore_dirs = (*PythonFilter.ignore_dirs, *IGNORED_DIRS)

        self._ready.set()
        # A burst of saves arrives as one set: watchfiles waits `step` ms for quiet, `debounce` ms at most.
        for changes in watch(
            self.root,
            watch_filter=ProjectFilter(ignore_paths=self._ignore),
            debounce=self._debounce,
            step=self._step,
            stop_event=self._stop,
            raise_interrupt=False,
        ):
            with self._lock:
                self._changed.update(os.path.relpath(path, self.root) for _, path in changes)
            self.on_change()

    def pending(self) -> bool:
        with self._lock:
            return bool(self._changed)

    def take(self) -> list[str]:
        with self._lock:
            changed, self._changed = sorted(self._changed), set()
        return changed

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2)
