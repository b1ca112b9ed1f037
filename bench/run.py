"""tlrun against bare Celery, measured side by side in one run.

    scripts/bench.sh [--pairs N]

Each measure alternates tlrun (A) and its baseline (B): A B A B ... Times are taken from outside, polling
every 10 ms; both sides import the same modules from a warm page cache (one untimed warm-up run of each
side first). Writes bench/results.md (the README's Performance table) and prints it.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
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
app = Celery("benchapp")
app.conf.update(
    broker_connection_retry_on_startup=True,
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    result_backend=os.environ.get("CELERY_BROKER_URL"),
)
VALUE = 1

@app.task
def value():
    return VALUE

@app.task
def sleep(seconds):
    time.sleep(seconds)
    return seconds
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


def family(pid: int) -> list[int]:
    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return [pid]


class Bench:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
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
        self.conn = self.probe.connection_for_write(self.url)

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), 0.1).close()
            return True
        except OSError:
            return False

    def spawn(self, argv: list[str], out: Path | None = None, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        fh = open(out, "wb") if out else subprocess.DEVNULL  # noqa: SIM115
        proc = subprocess.Popen(
            argv, cwd=cwd or self.dir, env=self.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
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
            left = [p for p in pids if not tree_gone([p])]
            print(f"bench: {len(left)} process(es) of {proc.args!r:.60} outlived {sig!r} by 15 s: killed", flush=True)
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            wait_until(lambda: tree_gone(pids), 30)
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
    def celery_ready(self) -> float:
        """Bare `celery worker`: start until its first own ping reply (polled from outside)."""
        t0 = time.monotonic()
        proc = self.spawn([PY, "-m", "celery", "-A", "benchapp", "worker", "-n", "bare@bench", "-c", "2"])
        wait_until(lambda: self.answers("bare@bench"))
        elapsed = time.monotonic() - t0
        self.stop(proc)
        return elapsed

    def tlrun_ready(self, command: str) -> float:
        out = self.dir / f"{command}.out"
        t0 = time.monotonic()
        proc = self.spawn([PY, "-m", "tlrun", command, "-A", "benchapp", "-c", "2"], out)
        wait_until(lambda: self.output_has(out, r"worker ready:"))
        elapsed = time.monotonic() - t0
        self.stop(proc, signal.SIGINT)
        return elapsed

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

    def discovery(self, files: int) -> float:
        """In-process: find the app in a project of `files` Python modules (page cache warm after the
        untimed first run), as every command does when no app is configured."""
        from tlrun.project.discover import discover_app

        tree = self.dir / "big_project"
        if not tree.exists():
            per_package = 50
            for i in range(files // per_package):
                package = tree / f"pkg{i}"
                package.mkdir(parents=True)
                (package / "__init__.py").write_text("")
                for j in range(per_package - 1):
                    (package / f"mod{j}.py").write_text("import os\n\n\ndef f(x):\n    return x\n" * 40)
            (tree / "pkg3" / "celery.py").write_text("from celery import Celery\n\napp = Celery('big')\n")
        t0 = time.perf_counter()
        found = discover_app(tree)
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

    def launcher_rss(self) -> float:
        proc, _, _ = self._start_tlrun()
        time.sleep(1.0)  # a second of supervising, not synchronisation: the figure is the steady state
        rss = psutil.Process(proc.pid).memory_info().rss / 1048576
        self.stop(proc, signal.SIGINT)
        return rss


def pairs(n: int, a: Callable[[], float], b: Callable[[], float] | None) -> tuple[list[float], list[float]]:
    a()  # warm-up, untimed
    if b:
        b()
    xs, ys = [], []
    for _ in range(n):
        xs.append(a())
        if b:
            ys.append(b())
    return xs, ys


def crowd(n: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen(["sleep", "600"], start_new_session=True) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.md")
    parser.add_argument("--probes", action="store_true", help="Only the health probes (bench/probes.md).")
    args = parser.parse_args()
    if args.probes:
        return probes(args.pairs, ROOT / "bench" / "probes.md")
    if shutil.which("redis-server") is None:
        sys.exit("bench: redis-server is not on PATH")
    rows: list[tuple[str, str, float, float | None, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="tlrun-bench-") as tmp:
        bench = Bench(Path(tmp))
        try:
            n = args.pairs

            def ratio_row(name: str, base: str, a: Callable[[], float], b: Callable[[], float], target: str) -> None:
                xs, ys = pairs(n, a, b)
                ma, mb = statistics.median(xs), statistics.median(ys)
                rows.append((name, base, ma, mb, f"{ma / mb:.2f}", target))
                summary = f"tlrun {ma:.3f} s, baseline {mb:.3f} s, ratio {ma / mb:.2f}"
                print(f"{name}: {summary} (target {target})", flush=True)

            def abs_row(name: str, a: Callable[[], float], unit: str, target: str) -> None:
                xs, _ = pairs(n, a, None)
                m = statistics.median(xs)
                rows.append((name, "-", m, None, f"{m:.3f} {unit}" if unit == "s" else f"{m:.0f} {unit}", target))
                print(f"{name}: {m:.3f} {unit} (target {target})", flush=True)

            ratio_row(
                "start to verified ready, `tlrun dev`",
                "`celery worker` start to first own pong",
                lambda: bench.tlrun_ready("dev"),
                bench.celery_ready,
                "<= 0.8",
            )
            ratio_row(
                "start to verified ready, `tlrun worker`",
                "`celery worker` start to first own pong",
                lambda: bench.tlrun_ready("worker"),
                bench.celery_ready,
                "<= 1.1",
            )
            ratio_row(
                "stop an idle worker (SIGINT to tlrun until the tree is gone)",
                "SIGTERM to `celery worker` until gone",
                bench.tlrun_stop,
                bench.celery_stop,
                "<= 1.1",
            )
            abs_row("launcher SIGKILLed until the worker tree is gone", bench.tlrun_sigkill, "s", "<= 1 s")
            ratio_row(
                "`tlrun doctor`, healthy project with one worker",
                "`celery inspect ping`",
                lambda: _with_worker(bench, bench.tlrun_doctor),
                lambda: _with_worker(bench, bench.celery_inspect),
                "<= 1.0",
            )
            held = _HELD.pop("worker", None)
            if held is not None:
                bench.stop(held, signal.SIGINT)  # the next measures run their own launcher of this project
            ratio_row(
                "`tlrun --help`", "`celery --help`", lambda: bench.help("tlrun"), lambda: bench.help("celery"), "<= 0.5"
            )
            sleepers = crowd(2000)
            try:
                abs_row(
                    "sweep scan with 2,000 unrelated processes",
                    lambda: bench.sweep_scan(2000) * 1000,
                    "ms",
                    "<= 200 ms",
                )
            finally:
                for s in sleepers:
                    s.kill()
                for s in sleepers:
                    s.wait()
            abs_row(
                "app discovery in a project of 5,000 Python files",
                lambda: bench.discovery(5000) * 1000,
                "ms",
                "<= 200 ms",
            )
            ratio_row(
                "reload: file saved until a task returns the new value, `tlrun dev --reload`",
                "`watchfiles --filter python 'celery worker'`, the same",
                bench.tlrun_reload,
                bench.watchfiles_reload,
                "<= 0.35, median <= 1.0 s",
            )
            ratio_row(
                "Ctrl-C of an idle `tlrun dev` until every process is gone",
                "SIGTERM to `celery worker` until gone",
                bench.tlrun_dev_stop,
                bench.celery_stop,
                "<= 0.3",
            )
            abs_row(
                "reload while a 3 s task runs: save until the new code answers (the task finishes first)",
                bench.reload_during_task,
                "s",
                "the task's rest + swap",
            )
            ratio_row(
                "reload with 3 idle roles: save until every role returns the new value",
                "the same with 1 role",
                lambda: bench.roles_reload(3),
                lambda: bench.roles_reload(1),
                "<= 1.3",
            )
            ratio_row(
                "Ctrl-C of `tlrun dev` with 6 idle roles until every process is gone",
                "the same with 1 role",
                lambda: bench.roles_dev_stop(6),
                lambda: bench.roles_dev_stop(1),
                "<= 1.3",
            )
            abs_row("launcher's own RSS while supervising", bench.launcher_rss, "MB", "<= 50 MB")
        finally:
            bench.close()
    write_table(args.out, rows, n)


_HELD: dict[str, subprocess.Popen[bytes]] = {}


def probes(n: int, out: Path) -> None:
    """What a container's probes cost, each against a running `tlrun worker`: wall and CPU time of
    `tlrun health --liveness` (local evidence), `--readiness` (ping and consumption) and `celery inspect
    ping` (what probes ran before)."""
    rows: list[tuple[str, str, float, float | None, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="tlrun-bench-") as tmp:
        bench = Bench(Path(tmp))
        try:
            _HELD["worker"], _, _ = bench._start_tlrun()
            health = ("tlrun", "health", "-A", "benchapp")
            commands = {
                "`tlrun health --liveness`": (*health, "--liveness"),
                "`tlrun health --readiness`": (*health, "--readiness"),
            }
            for name, argv in commands.items():
                for what, measure in (("wall", bench.time_command), ("CPU", bench.cpu_command)):
                    xs, ys = pairs(
                        n,
                        lambda a=argv, m=measure: m(*a),
                        lambda m=measure: m("celery", "-A", "benchapp", "inspect", "ping"),
                    )  # type: ignore[misc]
                    ma, mb = statistics.median(xs), statistics.median(ys)
                    rows.append((f"{name}, {what} time", "`celery inspect ping`", ma, mb, f"{ma / mb:.2f}", "-"))
                    print(f"{name} {what}: {ma:.3f} s, celery inspect ping {mb:.3f} s", flush=True)
        finally:
            held = _HELD.pop("worker", None)
            if held is not None:
                bench.stop(held, signal.SIGINT)
            bench.close()
    write_table(out, rows, n)


def _with_worker(bench: Bench, measure: Callable[[], float]) -> float:
    """A healthy project: one tlrun worker runs for the whole doctor/inspect comparison."""
    if "worker" not in _HELD:
        _HELD["worker"], _, _ = bench._start_tlrun()
    return measure()


def write_table(path: Path, rows: list[tuple[str, str, float, float | None, str, str]], n: int) -> None:
    cpu = platform.processor() or platform.machine()
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} cores ({cpu}), Linux {platform.release()}, "
        f"Python {platform.python_version()}; medians of {n} alternating pairs (`scripts/bench.sh`).",
        "",
        "| measure | baseline command | tlrun | baseline | ratio or value | target |",
        "|---|---|---|---|---|---|",
    ]
    for name, base, a, b, value, target in rows:
        a_s = f"{a:.3f} s" if b is not None else "-"
        b_s = f"{b:.3f} s" if b is not None else "-"
        lines.append(f"| {name} | {base} | {a_s} | {b_s} | {value} | {target} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
