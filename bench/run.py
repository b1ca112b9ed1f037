"""tlrun against bare Celery and what users run today, measured side by side in one run.

    scripts/bench.sh [--pairs N] [--only NAME,...] [--no-page]

Each figure alternates tlrun (A) and its baseline (B): A B A B ..., after one untimed warm-up of each side;
min, median and max of each side and the ratio of the medians. The baselines get the same Celery flags tlrun
passes (`dev`: without mingle and gossip, the same 0.1 s poll interval). Writes bench/results.md and, for a
full run, the table of docs/performance.md (between its bench markers): the table is never edited by hand.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import PY, ROOT, Bench, Burners

Stats = tuple[float, float, float]  # min, median, max
Row = tuple[str, str, Stats | None, Stats | None, str, str]  # measure, compared with, A, B, value, target
PAGE = ROOT / "docs" / "performance.md"
MARKERS = {
    "bench": ("<!-- bench:begin (scripts/bench.sh writes this table) -->", "<!-- bench:end -->"),
    "probes": ("<!-- probes:begin (scripts/bench.sh --probes writes this table) -->", "<!-- probes:end -->"),
}
DEV_FLAGS = ["--without-mingle", "--without-gossip"]
TASKS = 2000
CROWDS = (0, 2000, 5000)


def stats(xs: list[float]) -> Stats:
    return (min(xs), statistics.median(xs), max(xs))


def alternate(
    n: int, a: Callable[[], dict[str, float]], b: Callable[[], dict[str, float]] | None
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """n alternating runs of each side after one untimed warm-up of each; every figure a run returns."""
    a()
    if b:
        b()
    xs: dict[str, list[float]] = {}
    ys: dict[str, list[float]] = {}
    for _ in range(n):
        for key, value in a().items():
            xs.setdefault(key, []).append(value)
        if b:
            for key, value in b().items():
                ys.setdefault(key, []).append(value)
    return xs, ys


class Table:
    def __init__(self, n: int) -> None:
        self.n = n
        self.rows: list[Row] = []

    def ratio(self, name: str, base: str, xs: list[float], ys: list[float], target: str, unit: str = "s") -> None:
        a, b = stats(xs), stats(ys)
        self.rows.append((name, base, a, b, f"{a[1] / b[1]:.2f}", target))
        print(
            f"{name}: tlrun {_fmt(a, unit)}, baseline {_fmt(b, unit)}, ratio {a[1] / b[1]:.2f} ({target})", flush=True
        )

    def value(self, name: str, xs: list[float], unit: str, target: str) -> None:
        a = stats(xs)
        self.rows.append((name, "-", a, None, _one(a[1], unit), target))
        print(f"{name}: {_fmt(a, unit)} ({target})", flush=True)

    def pair(self, name: str, base: str, a: Callable[[], float], b: Callable[[], float], target: str) -> None:
        xs, ys = alternate(self.n, lambda: {"t": a()}, lambda: {"t": b()})
        self.ratio(name, base, xs["t"], ys["t"], target)

    def single(self, name: str, a: Callable[[], float], unit: str, target: str) -> None:
        xs, _ = alternate(self.n, lambda: {"t": a()}, None)
        self.value(name, xs["t"], unit, target)


def _one(x: float, unit: str) -> str:
    return f"{x:.3f} s" if unit == "s" else f"{x:.1f} {unit}" if x < 100 else f"{x:.0f} {unit}"


def _fmt(s: Stats, unit: str) -> str:
    return f"{_one(s[1], unit)} ({_one(s[0], unit)}-{_one(s[2], unit)})"


def start_figures(bench: Bench, table: Table, command: str, busy: bool = False) -> None:
    """`tlrun dev`/`worker` and a bare worker with the same flags, to the same end points, with the CPU each
    used by then. `busy`: with a CPU burner on each core throughout (a laptop running an IDE and a browser)."""
    if busy:
        with Burners():
            return _start_figures(bench, table, command, " on a busy machine (a CPU burner per core)")
    return _start_figures(bench, table, command, "")


def _start_figures(bench: Bench, table: Table, command: str, where: str) -> None:
    tlrun = [PY, "-m", "tlrun", command, "-A", "benchapp", "-c", "2"]
    bare = [PY, "-m", "celery", "-A", "benchapp", "worker", "-n", "bare@bench", "--loglevel", "INFO", "-c", "2"]
    env = {}
    if command == "dev":
        bare += DEV_FLAGS
        env = {"BENCH_POLL": "0.1"}  # tlrun dev's poll interval on Redis, set by the app for both sides
    xs, ys = alternate(table.n, lambda: bench.start(tlrun, True, env), lambda: bench.start(bare, False, env))
    what = f"`celery worker{' ' + ' '.join(DEV_FLAGS) if command == 'dev' else ''}`"
    tl = f"`tlrun {command}`{where}"
    if not where:
        table.ratio(f"{tl} start to the worker's `worker_ready`", what, xs["ready signal"], ys["ready signal"], "-")
    table.ratio(
        f"{tl} start to its first own pong", f"{what}, the same", xs["pong"], ys["pong"], "<= 1.2" if where else "-"
    )
    table.ratio(
        f"{tl}: CPU of the whole tree (launcher, worker, pool) by its first pong",
        f"{what}: its tree's CPU, the same",
        xs["tree cpu"],
        ys["tree cpu"],
        "<= 1.15",
    )
    table.value(f"{tl}: the launcher's own CPU by its verdict line", xs["launcher cpu"], "s", "<= 0.10 s")
    if not where:
        table.ratio(f"{tl} start to its verdict line", f"{what} to its first pong", xs["verdict"], ys["pong"], "<= 1.3")


def throughput_figures(bench: Bench, table: Table) -> None:
    tlrun = [PY, "-m", "tlrun", "worker", "-A", "benchapp", "-c", "2"]
    bare = [PY, "-m", "celery", "-A", "benchapp", "worker", "-n", "bare@bench", "--loglevel", "INFO", "-c", "2"]
    xs, ys = alternate(
        table.n, lambda: bench.throughput(tlrun, TASKS, True), lambda: bench.throughput(bare, TASKS, False)
    )
    table.ratio(
        f"{TASKS:,} tiny tasks at INFO, results through Redis, `tlrun worker` (console and log file)",
        "`celery worker` writing to a file",
        xs["run"],
        ys["run"],
        "<= 1.02",
    )
    table.value("the launcher's own CPU per relayed line", xs["cpu per line"], "us", "<= 20 us")
    xs, ys = alternate(
        table.n,
        lambda: bench.throughput(tlrun, TASKS, True, paused=True),
        lambda: bench.throughput(bare, TASKS, False),
    )
    table.ratio(
        f"the same {TASKS:,} tasks with `tlrun worker` stopped by Ctrl-Z (SIGSTOP) throughout",
        "`celery worker` writing to a file",
        xs["run"],
        ys["run"],
        "<= 1.2",
    )


def crowd(n: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen(["sleep", "600"], start_new_session=True) for _ in range(n)]


def uncrowd(sleepers: list[subprocess.Popen[bytes]]) -> None:
    for s in sleepers:
        s.kill()
    for s in sleepers:
        s.wait()


def scan_figures(bench: Bench, table: Table) -> None:
    """doctor against `celery inspect ping` (a healthy project, one worker), and the sweep's scan, with 0,
    2,000 and 5,000 unrelated processes."""
    held, _, _ = bench._start_tlrun()
    try:
        for n in CROWDS:
            sleepers = crowd(n)
            try:
                table.pair(
                    f"`tlrun doctor` with {n:,} unrelated processes",
                    "`celery inspect ping`",
                    bench.tlrun_doctor,
                    bench.celery_inspect,
                    "<= 1.0" if n == 5000 else "-",
                )
                table.single(
                    f"sweep scan with {n:,} unrelated processes",
                    lambda n=n: bench.sweep_scan(n) * 1000,  # type: ignore[misc]
                    "ms",
                    "<= 50 ms" if n == 2000 else "-",
                )
            finally:
                uncrowd(sleepers)
    finally:
        bench.stop(held, signal.SIGINT)


FIGURES: dict[str, Callable[[Bench, Table], None]] = {}


def figure(name: str) -> Callable[[Callable[[Bench, Table], None]], Callable[[Bench, Table], None]]:
    def register(fn: Callable[[Bench, Table], None]) -> Callable[[Bench, Table], None]:
        FIGURES[name] = fn
        return fn

    return register


figure("start-dev")(lambda bench, table: start_figures(bench, table, "dev"))
figure("start-worker")(lambda bench, table: start_figures(bench, table, "worker"))


@figure("start-busy")
def _start_busy(bench: Bench, table: Table) -> None:
    start_figures(bench, table, "dev", busy=True)
    start_figures(bench, table, "worker", busy=True)


figure("throughput")(throughput_figures)


@figure("stop")
def _stop(bench: Bench, table: Table) -> None:
    table.pair(
        "stop an idle `tlrun worker` (SIGINT until the tree is gone)",
        "SIGTERM to `celery worker` until gone",
        bench.tlrun_stop,
        bench.celery_stop,
        "<= 1.1",
    )
    table.single("launcher SIGKILLed, its idle worker's tree gone", bench.tlrun_sigkill, "s", "<= 0.5 s")


figure("scan")(scan_figures)


@figure("discovery")
def _discovery(bench: Bench, table: Table) -> None:
    bench.big_tree(20000)
    table.single(
        "app discovery, 20,000 Python files, first command", lambda: bench.discovery(20000, False) * 1000, "ms", "-"
    )
    table.single(
        "app discovery, 20,000 Python files, next command (cache)",
        lambda: bench.discovery(20000, True) * 1000,
        "ms",
        "<= 20 ms",
    )


@figure("help")
def _help(bench: Bench, table: Table) -> None:
    table.pair("`tlrun --help`", "`celery --help`", lambda: bench.help("tlrun"), lambda: bench.help("celery"), "<= 0.5")


@figure("dev")
def _dev(bench: Bench, table: Table) -> None:
    table.pair(
        "reload: file saved until a task returns the new value, `tlrun dev --reload`",
        "`watchfiles --filter python 'celery worker'`, the same",
        bench.tlrun_reload,
        bench.watchfiles_reload,
        "<= 0.35, median <= 1.0 s",
    )
    table.pair(
        "Ctrl-C of an idle `tlrun dev` until every process is gone",
        "SIGTERM to `celery worker` until gone",
        bench.tlrun_dev_stop,
        bench.celery_stop,
        "<= 0.3",
    )
    table.single(
        "reload while a 3 s task runs: save until the new code answers (the task finishes first)",
        bench.reload_during_task,
        "s",
        "the task's rest + swap",
    )


@figure("django")
def _django(bench: Bench, table: Table) -> None:
    table.pair(
        "reload on a Django project (DRF, django-celery-beat, 4 apps): save of a task module until a task "
        "returns the new value, `tlrun dev --reload`",
        "a cold start of the same `tlrun dev --reload` until a task answers",
        bench.django_reload,
        bench.django_cold_start,
        "<= 0.3, median <= 0.6 s",
    )
    table.pair(
        "the same reload on the Django project",
        "`watchfiles --filter python 'celery worker'`, the same",
        bench.django_reload,
        bench.django_watchfiles_reload,
        "<= 0.35",
    )


@figure("roles")
def _roles(bench: Bench, table: Table) -> None:
    table.pair(
        "reload with 3 idle roles: save until every role returns the new value",
        "the same with 1 role",
        lambda: bench.roles_reload(3),
        lambda: bench.roles_reload(1),
        "<= 1.3",
    )
    table.pair(
        "Ctrl-C of `tlrun dev` with 6 idle roles until every process is gone",
        "the same with 1 role",
        lambda: bench.roles_dev_stop(6),
        lambda: bench.roles_dev_stop(1),
        "<= 1.3",
    )
    table.single("launcher's own RSS while supervising", bench.launcher_rss, "MB", "<= 50 MB")


@figure("production")
def _production(bench: Bench, table: Table) -> None:
    table.pair(
        "longest gap between two completions around new code, 50 tasks/s, a 3 s task running: `tlrun reload`",
        "stop, then start (`systemctl restart`)",
        bench.reload_gap,
        bench.restart_gap,
        "< 1 s",
    )
    table.single(
        "memory guard: one sample of a `-c 2` prefork tree (PSS of 3 processes), every 0.25 s",
        bench.guard_sample_ms,
        "ms",
        "<= 2 % of a core (5 ms)",
    )


@figure("stack")
def _stack(bench: Bench, table: Table) -> None:
    import stack

    table.pair(
        "a Procfile's web server answers and its worker pongs: `tlrun dev`",
        "`honcho start`, the same Procfile",
        lambda: stack.up_time(bench, "tlrun"),
        lambda: stack.up_time(bench, "honcho"),
        "<= 1.3",
    )
    table.single(
        "processes left running 3 s after the runner's SIGKILL: `tlrun dev` (web, worker and its pool)",
        lambda: stack.left_after_kill(bench, "tlrun"),
        "procs",
        "0",
    )
    table.single(
        "the same for `honcho start`",
        lambda: stack.left_after_kill(bench, "honcho"),
        "procs",
        "(what users have today)",
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--only", default="", help=f"comma-separated figures: {', '.join(FIGURES)}")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.md")
    parser.add_argument("--no-page", action="store_true", help="do not rewrite the table in docs/performance.md")
    parser.add_argument("--probes", action="store_true", help="Only the health probes (bench/probes.md).")
    parser.add_argument(
        "--busy", action="store_true", help="Only the start figures, idle and with a CPU burner on each core."
    )
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("bench: redis-server is not on PATH")
    if args.probes:
        from probes import probes

        return probes(args.pairs, ROOT / "bench" / "probes.md")
    chosen = [name for name in args.only.split(",") if name] or (
        ["start-dev", "start-worker", "start-busy"] if args.busy else list(FIGURES)
    )
    unknown = [name for name in chosen if name not in FIGURES]
    if unknown:
        sys.exit(f"bench: unknown figure(s) {', '.join(unknown)}; known: {', '.join(FIGURES)}")
    table = Table(args.pairs)
    with tempfile.TemporaryDirectory(prefix="tlrun-bench-") as tmp:
        bench = Bench(Path(tmp))
        try:
            for name in chosen:
                FIGURES[name](bench, table)
        finally:
            bench.close()
    text = render(table)
    out = args.out if chosen == list(FIGURES) else args.out.with_name("results-partial.md")
    out.write_text(text)
    print("\n" + text)
    if chosen == list(FIGURES) and not args.no_page:
        update_page(text)


def render(table: Table) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} cores ({cpu}), Linux {platform.release()}, "
        f"Python {platform.python_version()}; {table.n} alternating pairs after one warm-up of each side; "
        "median (min-max) of each side, ratio of the medians (`scripts/bench.sh`).",
        "",
        "| measure | compared with | tlrun | baseline | ratio or value | target |",
        "|---|---|---|---|---|---|",
    ]
    for name, base, a, b, value, target in table.rows:
        unit = re.search(r"(ms|us|MB|procs|s)$", value)
        u = unit.group(1) if unit and b is None else "s"
        a_s = _fmt(a, u) if a is not None and b is not None else "-"
        b_s = _fmt(b, "s") if b is not None else "-"
        if b is None and a is not None:
            value = f"{value} ({_one(a[0], u)}-{_one(a[2], u)})"
        lines.append(f"| {name} | {base} | {a_s} | {b_s} | {value} | {target} |")
    return "\n".join(lines) + "\n"


def update_page(text: str, block: str = "bench") -> None:
    """Replace the table of docs/performance.md between the block's markers with `text`."""
    begin, end = MARKERS[block]
    page = PAGE.read_text()
    if begin not in page or end not in page:
        print(f"bench: {PAGE.name} has no {begin!r} ... {end!r} markers: table not written there", flush=True)
        return
    head, rest = page.split(begin, 1)
    _, tail = rest.split(end, 1)
    PAGE.write_text(f"{head}{begin}\n{text}{end}{tail}")


if __name__ == "__main__":
    main()
