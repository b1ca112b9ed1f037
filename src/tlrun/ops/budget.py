"""One memory budget for one cgroup: the roles of a launcher that share a container share its limit.

Without a role's own `memory_limit`, the memory guard's limit is the cgroup's (memory.py). Every worker tree of
the launcher then draws on the same memory: the guard compares the cgroup's working set (what the kernel
cannot reclaim: usage minus inactive file pages, as the kubelet counts it) with the cgroup's limit minus
headroom, and kills the task tree that grew most, whichever role runs it. Near the limit (within
NEAR_FRACTION of it) it looks every FAST_EVERY seconds with cheap reads (one cgroup file, each process's
resident size), so that a task growing at 1 GB/s is caught before the kernel's OOM killer; it also keeps the
workers' running tasks at hand, so that a kill names its task without waiting for a reply. A kill by the
kernel's OOM killer (the cgroup's `oom_kill` count goes up, a pool child vanished) counts toward the
poison-task rule like the guard's own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

NEAR_FRACTION = 0.8  # of the limit: from here on, the fast look
FAST_EVERY = 0.02  # seconds between two looks near the limit
SLOW_EVERY = 0.25  # seconds between two looks elsewhere (memory.py's SAMPLE_EVERY)
FAST_HOLD = 10.0  # seconds the fast looks go on after the working set was last near the limit
TASKS_EVERY = 0.1  # seconds between two questions about the running tasks, near the limit
UNLIMITED = 1 << 60
LOOKAHEAD = 0.06  # seconds: the fastest grower's rate times this is added to the working set (a look's lag)
GROWN_ALONE = 64 << 20  # grown by more than an idle pool child ever does: running a task, named or not


@dataclass(frozen=True)
class Cgroup:
    """This process's memory cgroup: its directory and version (1: memory controller, 2: unified)."""

    path: Path
    version: int

    def _read(self, name: str) -> str | None:
        try:
            return (self.path / name).read_text()
        except OSError:
            return None

    def _stat(self, key: str) -> int:
        for line in (self._read("memory.stat") or "").splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
        return 0

    def limit(self) -> int | None:
        raw = (self._read("memory.max" if self.version == 2 else "memory.limit_in_bytes") or "").strip()
        return int(raw) if raw.isdigit() and 0 < int(raw) < UNLIMITED else None

    def working_set(self) -> int | None:
        """Usage minus inactive file pages (the kernel reclaims those before it kills anything)."""
        raw = (self._read("memory.current" if self.version == 2 else "memory.usage_in_bytes") or "").strip()
        if not raw.isdigit():
            return None
        inactive = self._stat("inactive_file" if self.version == 2 else "total_inactive_file")
        return max(0, int(raw) - inactive)

    def oom_kills(self) -> int:
        """How many processes of this cgroup the kernel's OOM killer has killed (0 where it does not say)."""
        text = self._read("memory.events" if self.version == 2 else "memory.oom_control") or ""
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill" and value.strip().isdigit():
                return int(value)
        return 0


def find(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> Cgroup | None:
    """This process's memory cgroup, when it has a limit."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    found = []
    for line in lines:
        hierarchy, controllers, path = [*line.split(":", 2), "", ""][:3]
        if hierarchy == "0" and controllers == "":
            found += [Cgroup(root / path.lstrip("/"), 2), Cgroup(root / "unified" / path.lstrip("/"), 2)]
        elif "memory" in controllers.split(","):
            found.append(Cgroup(root / "memory" / path.lstrip("/"), 1))
    return next((cg for cg in found if cg.limit() is not None), None)


def tree_rss(main_pid: int) -> dict[int, tuple[int, list[psutil.Process]]]:
    """Each direct child of the worker (a pool child) -> (resident size of it and what it started, those
    processes): the cheap look, one small /proc read per process."""
    out: dict[int, tuple[int, list[psutil.Process]]] = {}
    try:
        children = psutil.Process(main_pid).children()
    except psutil.Error:
        return out
    for child in children:
        try:
            started = child.children(recursive=True)
            total = 0
            for proc in [child, *started]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    continue
        except psutil.Error:
            continue
        out[child.pid] = (total, started)
    return out


class TaskBook:
    """pid -> (task name, id) of what each shared worker runs, kept fresh by a thread while near the limit."""

    def __init__(self, ask: Callable[[], dict[int, tuple[str, str]] | None]) -> None:
        self._ask = ask
        self._lock = threading.Lock()
        self._book: dict[int, tuple[str, str]] = {}
        self._known = False
        self._wanted = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    def want(self, on: bool) -> None:
        if on:
            self._wanted.set()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tlrun-memory-tasks", daemon=True)
                self._thread.start()
        else:
            self._wanted.clear()

    def _run(self) -> None:
        import time

        while not self._closed:
            self._wanted.wait(1.0)
            if self._closed or not self._wanted.is_set():
                continue
            got = self._ask()
            if got is not None:
                with self._lock:
                    self._book, self._known = dict(got), True
            time.sleep(TASKS_EVERY)

    def get(self) -> tuple[dict[int, tuple[str, str]], bool]:
        """The book, and whether any answer filled it yet."""
        with self._lock:
            return dict(self._book), self._known

    def close(self) -> None:
        self._closed = True
        self._wanted.set()


@dataclass(frozen=True)
class Kill:
    node: str
    pid: int
    total: int  # the tree's PSS when it passed the limit (a shared budget: the cgroup's working set)
    limit: int
    task: str | None  # name and id from the worker's own reply, None when it ran none (or did not answer)
    task_id: str | None
    revoked: bool  # the second kill of this task id: revoked first
    killed: bool
    by: str = "guard"  # "kernel": the OOM killer took it (counted toward the poison-task rule all the same)


class SharedBudget:
    """The guard's look at the cgroup the shared workers draw on; `look()` runs on the guard's thread."""

    def __init__(
        self,
        cgroup: Cgroup,
        limit: int,
        running: Callable[[list[str]], dict[int, tuple[str, str]] | None],
        kill: Callable[[int, int, list[psutil.Process]], bool],
        revoke: Callable[[str], bool],
        killed_ids: dict[str, int],
        pause: Callable[[int, int], bool] = lambda _main, _pid: False,
        running_now: Callable[[list[str]], dict[int, tuple[str, str]] | None] | None = None,
    ) -> None:
        self.cgroup, self.limit = cgroup, limit
        self._kill, self._revoke, self.killed_ids, self._pause = kill, revoke, killed_ids, pause
        self._running_now = running_now  # a fresh answer, asked while the child to kill is frozen
        self._prev: dict[int, tuple[int, float]] = {}  # pool child -> (resident size, when) at the last look
        self._nodes: list[str] = []
        self.book = TaskBook(lambda: running(list(self._nodes)))
        self.near = False
        self._first: dict[int, int] = {}  # pool child -> its resident size when first seen
        self._last: dict[int, str] = {}  # pool child -> its node, at the last look
        self._oom = cgroup.oom_kills()
        self._used, self._hold = (0, 0.0), 0.0  # the working set at the last look, and when; fast looks until
        self._dying: set[int] = set()  # pool children this budget SIGKILLed that are still in the table

    def look(self, targets: list[tuple[str, int]], now: float) -> list[Kill]:
        """(node, main pid) of each shared worker: the kills this look made or saw."""
        self._nodes = [node for node, _ in targets]
        used = self.cgroup.working_set()
        if used is None:
            return []
        # Near: within NEAR_FRACTION of the limit, or about to be at the pace the working set grows (at 1 GB/s a
        # slow look's interval is 250 MB), and for FAST_HOLD seconds after (a killed task comes back at once).
        pace = (used - self._used[0]) / max(now - self._used[1], 1e-3) if self._used[1] else 0.0
        self._used = (used, now)
        if used + max(pace, 0.0) * SLOW_EVERY * 2 >= NEAR_FRACTION * self.limit:
            self._hold = now + FAST_HOLD
        self.near = now < self._hold
        self.book.want(self.near)
        trees = {
            pid: (node, main, size, started)
            for node, main in targets
            for pid, (size, started) in tree_rss(main).items()
        }
        for pid, (_node, _main, size, _s) in trees.items():
            self._first.setdefault(pid, size)
        kills = self._kernel_kills(trees)
        # A tree SIGKILLed at an earlier look may not have given its pages back yet: it is not judged again,
        # and what it holds is not counted (a pause after each kill would let a 1 GB/s task through).
        dying = {pid: trees.pop(pid)[2] for pid in list(trees) if pid in self._dying}
        self._dying &= set(dying)
        rates = {
            pid: (tree[2] - self._prev[pid][0]) / max(now - self._prev[pid][1], 1e-3)
            for pid, tree in trees.items()
            if pid in self._prev
        }
        self._prev = {pid: (tree[2], now) for pid, tree in trees.items()}
        # Where the fastest grower will be by the next look but one: the kernel does not wait for our lag.
        ahead = max([0.0, *rates.values()]) * LOOKAHEAD
        if used - sum(dying.values()) + ahead > self.limit and trees:
            kill = self._act(trees, used, rates if used <= self.limit else None)
            if kill is not None:
                kills.append(kill)
                self._dying.add(kill.pid)
        self._last = {pid: node for pid, (node, *_rest) in trees.items()}
        return kills

    def _kernel_kills(self, trees: dict[int, tuple[str, int, int, list[psutil.Process]]]) -> list[Kill]:
        oom = self.cgroup.oom_kills()
        if oom <= self._oom:
            return []
        self._oom = oom
        book, _known = self.book.get()
        found = []
        for pid, node in self._last.items():
            if pid in trees or pid not in book or pid in self._dying:
                continue  # still there, ran no task we knew of, or the guard's own kill
            task, task_id = book[pid]
            self.killed_ids[task_id] = self.killed_ids.get(task_id, 0) + 1
            revoked = self.killed_ids[task_id] >= 2 and self._revoke(task_id)
            found.append(
                Kill(node, pid, self.cgroup.working_set() or 0, self.limit, task, task_id, revoked, True, "kernel")
            )
        return found

    def _act(
        self,
        trees: dict[int, tuple[str, int, int, list[psutil.Process]]],
        used: int,
        rates: dict[int, float] | None,
    ) -> Kill | None:
        """Kill the tree that grew most since first seen (`rates`: before the limit, the fastest grower), among
        the children the workers say run a task, or that grew by more than an idle child ever does (a task
        just started, not in the last answer yet)."""
        book, known = self.book.get()

        def growth(pid: int) -> float:
            return trees[pid][2] - self._first.get(pid, 0)

        candidates = [pid for pid in trees if not known or pid in book or growth(pid) >= GROWN_ALONE]
        if not candidates:
            return None  # no task to blame
        grown = max(candidates, key=(lambda pid: rates.get(pid, 0.0)) if rates is not None else growth)
        node, main, _size, started = trees[grown]
        # Frozen at once: it grows no more while the workers are asked what it runs. The book is up to a
        # question old, and a child that finished a small task took the runaway one since (a task redelivered
        # after its last kill): blaming the book's task would count, and at its second kill revoke, an innocent
        # one. The book answers only when the workers do not.
        frozen = self._pause(main, grown)
        fresh = self._running_now(list(self._nodes)) if frozen and self._running_now is not None else None
        if fresh is not None:
            task, task_id = fresh.get(grown, (None, None))
        else:
            task, task_id = book.get(grown, (None, None)) if known else (None, None)
        revoked = False
        if task_id is not None and self.killed_ids.get(task_id, 0) >= 1:
            if not frozen:
                self._pause(main, grown)  # the revoke must reach the workers before the kill
            revoked = self._revoke(task_id)
        killed = self._kill(main, grown, started)
        if task_id is not None and killed:
            self.killed_ids[task_id] = self.killed_ids.get(task_id, 0) + 1
        self._first.pop(grown, None)
        return Kill(node, grown, used, self.limit, task, task_id, revoked, killed)

    def close(self) -> None:
        self.book.close()
