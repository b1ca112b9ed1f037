"""The benchmark harness's sides: a private redis-server, the bench app, and each measure's two sides (tlrun
and what it is compared with). Used by bench/run.py, which alternates the sides and writes the table.

Every start is timed from just before the spawn, on the system-wide monotonic clock, to the same end points
on both sides: the worker's own `worker_ready` signal (the bench app stamps it, no broker round trip) and the
first reply to a probe that is already connected and pings every 20 ms (raw replies, any node: the private
broker has no other worker). tlrun's verdict line is timed beside them.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent
POLL = 0.01
SAVE_INTERVAL = 2.0  # untimed seconds between two saves in the reload measures
# Untimed seconds between "ready" and the stop signal in the stop measures, the same on both sides: a worker
# stopped in its first moments stops more slowly, and the two sides notice readiness at different speeds.
IDLE_SETTLE = 1.5
APP = """
import os, time
from celery import Celery
from celery.signals import worker_ready
app = Celery("benchapp")
app.conf.update(
    broker_connection_retry_on_startup=True,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    result_backend=os.environ.get("CELERY_BROKER_URL"),
)
if os.environ.get("BENCH_POLL"):  # the poll interval tlrun dev sets, given to both sides of the dev measures
    app.conf.broker_transport_options = {"polling_interval": float(os.environ["BENCH_POLL"])}
VALUE = 1

@worker_ready.connect
def _stamp(**_kwargs):
    path = os.environ.get("BENCH_STAMP")
    if path:
        with open(path, "a") as fh:
            fh.write(f"{time.monotonic()}\\n")

@app.task
def value():
    return VALUE

@app.task
def sleep(seconds):
    time.sleep(seconds)
    return seconds

@app.task
def noop(i):
    return i

@app.task
def stamp(i):
    # The completion time of task i, by the task itself (the reload gap measure).
    import redis
    redis.Redis.from_url(os.environ["CELERY_BROKER_URL"]).rpush("bench-stamps", time.time())
    return i
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], object], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark step timed out")
        time.sleep(POLL)


def tree_gone(pids: list[int]) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


def kill_left(pids: list[int]) -> list[int]:
    """SIGKILL those of `pids` (recorded by pid, never found by name) still alive; wait until all are gone."""
    left = [p for p in pids if not tree_gone([p])]
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wait_until(lambda: tree_gone(pids), 30)
    return left


def own_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process `pid` alone."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return float(times.user + times.system)


def tree_cpu(pid: int) -> float:
    """CPU seconds of `pid` and every descendant: the live ones' own, plus what each has reaped (the CPU of
    its exited children, counted by the kernel once they are waited for)."""
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


class Burners:
    """A busy machine: one CPU burner per core, each a process of its own (killed by pid on exit)."""

    def __enter__(self) -> Burners:
        self.procs = [
            subprocess.Popen([PY, "-c", "while True: pass"], start_new_session=True) for _ in range(os.cpu_count() or 1)
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait(10)


def family(pid: int) -> list[int]:
    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return [pid]


class Bench:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        # tlrun as installed: pip byte-compiles a package (Celery's side has its .pyc files), while this
        # editable checkout, under PYTHONDONTWRITEBYTECODE, would compile every tlrun module on every start.
        subprocess.run([PY, "-m", "compileall", "-q", str(ROOT / "src" / "tlrun")], check=True)
        (workdir / "benchapp.py").write_text(APP)
        self.runtime = workdir / "run"
        self.runtime.mkdir(mode=0o700)
        self.port = free_port()
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=workdir,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        wait_until(lambda: self._listening())
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "TLRUN_", "TL_CELERY"))}
        self.env.update(
            CELERY_BROKER_URL=self.url, XDG_RUNTIME_DIR=str(self.runtime), NO_COLOR="1", PYTHONUNBUFFERED="1"
        )
        self.started: list[subprocess.Popen[bytes]] = []
        self._results: Any = None
        from celery import Celery  # the harness's own probe: one connection, reused

        self.probe = Celery("bench-probe", broker=self.url, set_as_current=False)
        # Replies are read by BRPOP: kombu's 1 s default would hear every worker only at about 1 s.
        self.probe.conf.broker_transport_options = {"polling_interval": 0.01}
        self.conn = self.probe.connection_for_write(self.url)

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), 0.1).close()
            return True
        except OSError:
            return False

    def spawn(
        self, argv: list[str], out: Path | None = None, cwd: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        fh = open(out, "wb") if out else subprocess.DEVNULL  # noqa: SIM115
        proc = subprocess.Popen(
            argv, cwd=cwd or self.dir, env=env or self.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.started.append(proc)
        return proc

    def answers(self, node: str) -> bool:
        return bool(self.probe.control.ping(destination=[node], timeout=0.05, connection=self.conn))

    def output_has(self, path: Path, pattern: str) -> re.Match[str] | None:
        try:
            return re.search(pattern, path.read_text(errors="replace"))
        except FileNotFoundError:
            return None

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        """End a measured process after its measure (untimed). What is still alive 15 s after `sig` is
        killed, and said: the harness must not hang on one slow teardown."""
        pids = family(proc.pid)
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            wait_until(lambda: tree_gone(pids), 15)
        except TimeoutError:
            left = kill_left(pids)
            print(f"bench: {len(left)} process(es) of {proc.args!r:.60} outlived {sig!r} by 15 s: killed", flush=True)
        proc.wait(30)

    def close(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(10)
        self.conn.release()
        if self._results is not None:
            self._results.close()
        self.redis.terminate()
        self.redis.wait(10)

    # -- the two sides of each measure ------------------------------------------------------------------
    def _first_pong(self) -> tuple[threading.Event, list[float]]:
        """A probe, connected before the spawn, pinging every 20 ms: the time of the first reply of any node."""
        stop, stamp = threading.Event(), []

        def run() -> None:
            while not stop.is_set():
                try:
                    replies = self.probe.control.ping(timeout=0.02, limit=1, connection=self.conn)
                except Exception:  # the broker's hiccup: try again
                    replies = []
                if replies:
                    stamp.append(time.monotonic())
                    return

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self._probe_thread = thread  # joined before the connection is used again
        return stop, stamp

    def start(self, argv: list[str], verdict: bool, extra_env: dict[str, str] | None = None) -> dict[str, float]:
        """Start `argv` and time it to the worker's `worker_ready` (stamped by the app), to the first pong and,
        for tlrun, to its verdict line; then stop it (untimed). Seconds from just before the spawn."""
        stamp = self.dir / f"ready-{time.monotonic_ns()}.stamp"
        out = self.dir / f"start-{time.monotonic_ns()}.out"
        env = {**self.env, "BENCH_STAMP": str(stamp), **(extra_env or {})}
        stop, pong = self._first_pong()
        t0 = time.monotonic()
        proc = self.spawn(argv, out, env=env)
        times: dict[str, float] = {}

        def check() -> bool:
            now = time.monotonic()
            if "ready signal" not in times and stamp.exists() and stamp.read_text().strip():
                times["ready signal"] = float(stamp.read_text().split()[0]) - t0
            if "pong" not in times and pong:
                times["pong"] = pong[0] - t0
                # CPU seconds by then (within one 10 ms poll): the whole tree, and the spawned process alone
                # (tlrun's launcher; bare Celery's main process)
                times["tree cpu"] = tree_cpu(proc.pid)
                times["own cpu"] = own_cpu(proc.pid)
            if verdict and "verdict" not in times and self.output_has(out, r"workers? ready:"):
                times["verdict"] = now - t0  # seen within one 10 ms poll of its write
                times["launcher cpu"] = own_cpu(proc.pid)
            return len(times) == (6 if verdict else 4)

        try:
            wait_until(check, 60)
        finally:
            stop.set()
            self._probe_thread.join(5)
            self.stop(proc, signal.SIGINT if verdict else signal.SIGTERM)
        return times

    # -- throughput: 2,000 tiny tasks at INFO, results through the Redis backend ---------------------------
    def throughput(self, argv: list[str], tasks: int, launcher: bool, paused: bool = False) -> dict[str, float]:
        """Seconds from the first send until every result is back; for a launcher also its own CPU per line
        it relayed (its CPU time over the run divided by the lines that reached its console). `paused`: the
        launcher is stopped with SIGSTOP (Ctrl-Z) for the whole run, and its console is not read."""
        from celery.result import ResultSet

        out = self.dir / f"throughput-{time.monotonic_ns()}.out"
        proc = self.spawn(argv, out)
        try:
            wait_until(lambda: self.answers_any(), 60)
            client = self._client()
            client.send_task("benchapp.noop", args=(-1,)).get(timeout=30)  # the pool's first task, untimed
            lines_before = _lines(out)
            cpu_before = _cpu(proc.pid)
            if paused:
                os.kill(proc.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            results = ResultSet([client.send_task("benchapp.noop", args=(i,)) for i in range(tasks)])
            results.get(timeout=300)
            elapsed = time.monotonic() - t0
            times = {"run": elapsed}
            if paused:
                os.kill(proc.pid, signal.SIGCONT)
            elif launcher:
                # Lines written during the run reach the console within the pump's next read: wait for them.
                wait_until(lambda: _lines(out) - lines_before >= 2 * tasks, 30)
                relayed = _lines(out) - lines_before
                times["cpu per line"] = (_cpu(proc.pid) - cpu_before) / relayed * 1e6
            return times
        finally:
            if paused:
                os.kill(proc.pid, signal.SIGCONT)
            self.stop(proc, signal.SIGINT if launcher else signal.SIGTERM)

    def answers_any(self) -> bool:
        return bool(self.probe.control.ping(timeout=0.05, limit=1, connection=self.conn))

    def _start_tlrun(self, *extra: str) -> tuple[subprocess.Popen[bytes], int, Path]:
        out = self.dir / "held.out"
        proc = self.spawn([PY, "-m", "tlrun", "worker", "-A", "benchapp", "-c", "2", *extra], out)
        wait_until(lambda: self.output_has(out, r"worker ready:"))
        match = self.output_has(out, r"\(pid (\d+)\)")
        assert match is not None
        return proc, int(match.group(1)), out

    @staticmethod
    def _time_until_gone(proc: subprocess.Popen[bytes], sig: int, pids: list[int]) -> float:
        """Send `sig` to `proc`; seconds until every pid in `pids` is gone."""
        t0 = time.monotonic()
        proc.send_signal(sig)
        wait_until(lambda: tree_gone(pids))
        elapsed = time.monotonic() - t0
        proc.wait(10)
        return elapsed

    def tlrun_stop(self) -> float:
        proc, worker, _ = self._start_tlrun()
        time.sleep(IDLE_SETTLE)
        return self._time_until_gone(proc, signal.SIGINT, family(proc.pid) + family(worker))

    def celery_stop(self) -> float:
        proc = self.spawn([PY, "-m", "celery", "-A", "benchapp", "worker", "-n", "bare@bench", "-c", "2"])
        wait_until(lambda: self.answers("bare@bench"))
        time.sleep(IDLE_SETTLE)
        return self._time_until_gone(proc, signal.SIGTERM, family(proc.pid))

    def tlrun_sigkill(self) -> float:
        proc, worker, _ = self._start_tlrun()
        time.sleep(IDLE_SETTLE)
        return self._time_until_gone(proc, signal.SIGKILL, family(worker))

    def time_command(self, *args: str) -> float:
        """Seconds for `python -m <args>` to run to completion in the bench project."""
        t0 = time.monotonic()
        subprocess.run(
            [PY, "-m", *args],
            cwd=self.dir,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
        return time.monotonic() - t0

    def cpu_command(self, *args: str) -> float:
        """CPU seconds (user + system) that `python -m <args>` spends, run to completion."""
        import resource

        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.time_command(*args)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    def tlrun_doctor(self) -> float:
        return self.time_command("tlrun", "doctor", "-A", "benchapp")

    def celery_inspect(self) -> float:
        return self.time_command("celery", "-A", "benchapp", "inspect", "ping")

    def help(self, tool: str) -> float:
        return self.time_command(tool, "--help")

    def sweep_scan(self, crowd: int) -> float:
        """In-process: one sweep scan (find_strays) with `crowd` unrelated processes running, of every kind a
        launch sweeps (workers, beats, and marked leftovers: the environment of every process of the user)."""
        from tlrun.config import project_id
        from tlrun.launch import procs, sweep

        t0 = time.perf_counter()
        kinds = ("worker", "beat", procs.LEFTOVER)
        sweep.find_strays(project_id(self.dir, "benchapp"), "benchapp", self.dir, kinds)
        return time.perf_counter() - t0

    def big_tree(self, files: int) -> Path:
        """A project of `files` Python modules in packages of 50, one of which creates the app."""
        tree = self.dir / f"big_project_{files}"
        if not tree.exists():
            per_package = 50
            for i in range(files // per_package):
                package = tree / f"pkg{i}"
                package.mkdir(parents=True)
                (package / "__init__.py").write_text("")
                for j in range(per_package - 1):
                    (package / f"mod{j}.py").write_text("import os\n\n\ndef f(x):\n    return x\n" * 40)
            (tree / "pkg3" / "celery.py").write_text("from celery import Celery\n\napp = Celery('big')\n")
            # Written a minute ago, as a real project's files are: the discovery cache does not trust a file
            # changed within the last 2 s (its mtime may not have ticked yet).
            old = time.time() - 60
            for path in [tree, *tree.rglob("*")]:
                os.utime(path, (old, old))
        return tree

    def discovery(self, files: int, cached: bool) -> float:
        """In-process: find the app in a project of `files` modules, as every command without a pinned app
        does: the first command reads every module (page cache warm after the untimed first run); a second
        one finds the answer in the cache (discocache.py) and checks what it rests on."""
        from tlrun.project.discover import discover_app, discover_cached

        tree = self.big_tree(files)
        t0 = time.perf_counter()
        found = discover_cached(tree, None, self.runtime) if cached else discover_app(tree)
        elapsed = time.perf_counter() - t0
        assert found.app == "pkg3.celery", found
        return elapsed

    def _client(self) -> Any:
        from celery import Celery

        if self._results is None:
            self._results = Celery("bench-client", broker=self.url, backend=self.url, set_as_current=False)
        return self._results

    def _value(self, timeout: float = 10.0) -> int:
        return int(self._client().send_task("benchapp.value").get(timeout=timeout))

    def _until_value(self, wanted: int) -> None:
        """Send the `value` task until one returns `wanted`: the new code is serving. A task sent while a worker
        restarts may wait longer than one attempt's timeout (watchfiles' restart): that attempt just failed."""
        from celery.exceptions import TimeoutError as ResultTimeout

        def serving() -> bool:
            try:
                return self._value() == wanted
            except ResultTimeout:
                return False

        wait_until(serving, 60)

    def _save(self, n: int) -> None:
        (self.dir / "benchapp.py").write_text(APP.replace("VALUE = 1", f"VALUE = {n}"))

    def _reloads(self, argv: list[str], out: Path, sig: int, saves: int = 3) -> float:
        """Median seconds from a save until a task returns the new value, over `saves` saves."""
        proc = self.spawn(argv, out)
        self._save(1)
        self._until_value(1)
        times = []
        for n in range(2, 2 + saves):
            # A developer saves seconds apart, not the instant the last reload finished: both sides get that.
            time.sleep(SAVE_INTERVAL)
            t0 = time.monotonic()
            self._save(n)
            self._until_value(n)
            times.append(time.monotonic() - t0)
        self.stop(proc, sig)
        self._save(1)
        return statistics.median(times)

    def tlrun_reload(self) -> float:
        argv = [PY, "-m", "tlrun", "dev", "-A", "benchapp", "-c", "2", "--reload"]
        return self._reloads(argv, self.dir / "reload.out", signal.SIGINT)

    def watchfiles_reload(self) -> float:
        """What users run today: watchfiles restarts `celery worker` on a change (SIGINT, then a new one)."""
        worker = f"{PY} -m celery -A benchapp worker -n peer@bench -c 2"
        argv = [PY, "-m", "watchfiles", "--filter", "python", worker, str(self.dir)]
        # SIGTERM: a job started in the background (CI, a script) inherits an ignored SIGINT, and watchfiles
        # installs no handler for it.
        return self._reloads(argv, self.dir / "watchfiles.out", signal.SIGTERM)

    # -- a Django project of realistic weight (tests/djangosite.py) ------------------------------------------
    def _django(self) -> tuple[Path, Any]:
        sys.path.insert(0, str(ROOT / "tests"))
        import djangosite

        root = self.dir / "djsite"
        if not root.exists():
            djangosite.write_site(root, self.url)
        djangosite.save_task(root, 1)
        return root, djangosite

    def _django_value(self, wanted: int) -> None:
        from celery.exceptions import TimeoutError as ResultTimeout

        def serving() -> bool:
            try:
                return int(self._client().send_task("catalog.tasks.value").get(timeout=10)) == wanted
            except ResultTimeout:
                return False

        wait_until(serving, 60)

    def _django_reloads(self, argv: list[str], sig: int, saves: int = 3) -> float:
        root, site = self._django()
        proc = self.spawn(argv, root / "reload.out", cwd=root)
        self._django_value(1)
        times = []
        for n in range(2, 2 + saves):
            time.sleep(SAVE_INTERVAL)  # untimed, as in the other reload measures
            t0 = time.monotonic()
            site.save_task(root, n)
            self._django_value(n)
            times.append(time.monotonic() - t0)
        self.stop(proc, sig)
        return statistics.median(times)

    def django_reload(self) -> float:
        """Save of a task module until a task returns the new value, `tlrun dev --reload` on the Django site."""
        return self._django_reloads([PY, "-m", "tlrun", "dev", "--reload"], signal.SIGINT)

    def django_cold_start(self) -> float:
        """The same `tlrun dev --reload`, from its start until a task returns the value."""
        root, _site = self._django()
        t0 = time.monotonic()
        proc = self.spawn([PY, "-m", "tlrun", "dev", "--reload"], root / "cold.out", cwd=root)
        self._django_value(1)
        took = time.monotonic() - t0
        self.stop(proc, signal.SIGINT)
        return took

    def django_watchfiles_reload(self) -> float:
        worker = f"{PY} -m celery -A site_pkg.celery worker -n peer@bench -c 2"
        argv = [PY, "-m", "watchfiles", "--filter", "python", worker, str(self.dir / "djsite")]
        return self._django_reloads(argv, signal.SIGTERM)

    def tlrun_dev_stop(self) -> float:
        """Ctrl-C of an idle `tlrun dev` until the launcher and the worker tree are gone."""
        out = self.dir / "devstop.out"
        proc = self.spawn([PY, "-m", "tlrun", "dev", "-A", "benchapp", "-c", "2"], out)
        wait_until(lambda: self.output_has(out, r"worker ready:"))
        match = self.output_has(out, r"\(pid (\d+)\)")
        assert match is not None
        time.sleep(IDLE_SETTLE)
        return self._time_until_gone(proc, signal.SIGINT, family(proc.pid) + family(int(match.group(1))))

    def reload_during_task(self) -> float:
        """A 3 s task runs at the save: seconds from the save until the new code answers; the task must
        finish with its result first."""
        out = self.dir / "busy.out"
        proc = self.spawn([PY, "-m", "tlrun", "dev", "-A", "benchapp", "-c", "2", "--reload"], out)
        self._save(1)
        self._until_value(1)
        busy = self._client().send_task("benchapp.sleep", args=(3,))
        wait_until(lambda: self.output_has(out, r"sleep\["))
        t0 = time.monotonic()
        self._save(2)
        assert busy.get(timeout=30) == 3, "the running task was not allowed to finish"
        self._until_value(2)
        elapsed = time.monotonic() - t0
        self.stop(proc, signal.SIGINT)
        self._save(1)
        return elapsed

    # -- several roles under one launcher: each unit on its own ----------------------------------------------
    def _roles_project(self, n: int) -> Path:
        """A project of `n` roles (queues q0 ... q<n-1>) in a directory of its own."""
        root = self.dir / f"roles{n}"
        root.mkdir(exist_ok=True)
        (root / "benchapp.py").write_text(APP)
        tables = "".join(f'\n[tool.tlrun.workers.r{i}]\nqueues = ["q{i}"]\nconcurrency = 1\n' for i in range(n))
        (root / "pyproject.toml").write_text(f'[tool.tlrun]\napp = "benchapp"\n{tables}')
        return root

    def _every_role_returns(self, n: int, wanted: int) -> None:
        def all_new() -> bool:
            return all(
                int(self._client().send_task("benchapp.value", queue=f"q{i}").get(timeout=10)) == wanted
                for i in range(n)
            )

        wait_until(all_new, 60)

    def roles_reload(self, n: int, saves: int = 3) -> float:
        """Median seconds from a save until every one of `n` idle roles returns the new value."""
        root = self._roles_project(n)
        proc = self.spawn([PY, "-m", "tlrun", "dev", "--reload"], root / "reload.out", cwd=root)
        self._every_role_returns(n, 1)
        times = []
        for value in range(2, 2 + saves):
            time.sleep(SAVE_INTERVAL)  # untimed, as in the other reload measures
            t0 = time.monotonic()
            (root / "benchapp.py").write_text(APP.replace("VALUE = 1", f"VALUE = {value}"))
            self._every_role_returns(n, value)
            times.append(time.monotonic() - t0)
        self.stop(proc, signal.SIGINT)
        (root / "benchapp.py").write_text(APP)
        return statistics.median(times)

    def roles_dev_stop(self, n: int) -> float:
        """Ctrl-C of an idle `tlrun dev` running `n` roles until the launcher and every worker tree are gone."""
        root = self._roles_project(n)
        out = root / "stop.out"
        proc = self.spawn([PY, "-m", "tlrun", "dev"], out, cwd=root)
        wait_until(lambda: self.output_has(out, r"workers? ready:"))
        line = self.output_has(out, r"workers? ready: .*")
        assert line is not None
        workers = [int(pid) for pid in re.findall(r"\(pid (\d+)\)", line.group(0))]
        time.sleep(IDLE_SETTLE)
        pids = family(proc.pid) + [p for w in workers for p in family(w)]
        return self._time_until_gone(proc, signal.SIGINT, pids)

    # -- production: new code without downtime, the memory guard's cost ---------------------------------------
    def _longest_gap(self, swap: Callable[[subprocess.Popen[bytes], Path], subprocess.Popen[bytes]]) -> float:
        """Stream `stamp` tasks at 50 a second into `tlrun worker -c 2` with a 3 s task running, apply `swap`
        (new code), and return the longest gap between two completions around it."""
        import redis

        r = redis.Redis.from_url(self.url)
        r.delete("bench-stamps")
        out = self.dir / f"gap-{time.monotonic_ns()}.out"
        argv = [PY, "-m", "tlrun", "worker", "-A", "benchapp", "-c", "2"]
        proc = self.spawn(argv, out)
        wait_until(lambda: self.output_has(out, r"workers? ready:"))
        client = self._client()
        client.send_task("benchapp.sleep", args=(3,))
        stop = threading.Event()

        def stream() -> None:
            i = 0
            while not stop.is_set():
                client.send_task("benchapp.stamp", args=(i,))
                i += 1
                time.sleep(0.02)

        thread = threading.Thread(target=stream, daemon=True)
        thread.start()
        time.sleep(1.0)  # a second of steady stream before the swap (the figure is the gap around it)
        proc = swap(proc, out)
        time.sleep(5.0)  # and after it, past the 3 s task's end
        stop.set()
        thread.join(5)
        wait_until(lambda: r.llen("bench-stamps") > 0)
        stamps = sorted(float(x) for x in r.lrange("bench-stamps", 0, -1))
        r.close()
        self.stop(proc, signal.SIGINT)
        return max(b - a for a, b in itertools.pairwise(stamps))

    def reload_gap(self) -> float:
        """`tlrun reload`: the next worker beside the old one."""

        def swap(proc: subprocess.Popen[bytes], out: Path) -> subprocess.Popen[bytes]:
            subprocess.run([PY, "-m", "tlrun", "reload", "-A", "benchapp"], cwd=self.dir, env=self.env, check=True,
                           capture_output=True, timeout=60)  # fmt: skip
            return proc

        return self._longest_gap(swap)

    def restart_gap(self) -> float:
        """What a deploy does today (`systemctl restart`): stop the worker (warm: the running task finishes),
        then start a new one."""

        def swap(proc: subprocess.Popen[bytes], out: Path) -> subprocess.Popen[bytes]:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
            again = self.dir / f"gap-again-{time.monotonic_ns()}.out"
            new = self.spawn([PY, "-m", "tlrun", "worker", "-A", "benchapp", "-c", "2"], again)
            wait_until(lambda: self.output_has(again, r"workers? ready:"))
            return new

        return self._longest_gap(swap)

    def guard_sample_ms(self) -> float:
        """What one memory-guard sample of a `-c 2` prefork worker's tree costs (PSS of main and children)."""
        sys.path.insert(0, str(ROOT / "src"))
        from tlrun.ops.memory import sample

        out = self.dir / f"guard-{time.monotonic_ns()}.out"
        proc = self.spawn([PY, "-m", "celery", "-A", "benchapp", "worker", "-c", "2", "-n", "guard@bench"], out)
        wait_until(lambda: self.answers("guard@bench"))
        costs = []
        for _ in range(200):
            got = sample(proc.pid)
            assert got is not None and len(got.children) == 2
            costs.append(got.seconds)
        self.stop(proc)
        return statistics.median(costs) * 1000

    def launcher_rss(self) -> float:
        proc, _, _ = self._start_tlrun()
        time.sleep(1.0)  # a second of supervising, not synchronisation: the figure is the steady state
        rss = psutil.Process(proc.pid).memory_info().rss / 1048576
        self.stop(proc, signal.SIGINT)
        return rss


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as fh:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 16), b""))
    except FileNotFoundError:
        return 0


def _cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)
