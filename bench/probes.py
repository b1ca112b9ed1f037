"""What a container's health probes cost (`scripts/bench.sh --probes`, writes bench/probes.md): wall and CPU
time of `tlrun health --liveness` (local evidence), `--readiness` (ping and consumption) and `celery inspect
ping` (what probes ran before), each against a running `tlrun worker`; and the liveness probe's CPU against
the interpreter's own start (`python -c pass`), the floor of any probe written in Python."""

from __future__ import annotations

import signal
import tempfile
from pathlib import Path

from harness import Bench
from run import Table, alternate, render, update_page


def _interpreter_cpu(bench: Bench) -> float:
    import resource
    import subprocess

    from harness import PY

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([PY, "-c", "pass"], cwd=bench.dir, env=bench.env, timeout=60, check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def probes(n: int, out: Path) -> None:
    table = Table(n)
    with tempfile.TemporaryDirectory(prefix="tlrun-bench-") as tmp:
        bench = Bench(Path(tmp))
        held = None
        try:
            held, _, _ = bench._start_tlrun()
            health = ("tlrun", "health", "-A", "benchapp")
            inspect = ("celery", "-A", "benchapp", "inspect", "ping")
            for name, argv in (
                ("`tlrun health --liveness`", (*health, "--liveness")),
                ("`tlrun health --readiness`", (*health, "--readiness")),
            ):
                for what, measure in (("wall", bench.time_command), ("CPU", bench.cpu_command)):
                    xs, ys = alternate(
                        n,
                        lambda a=argv, m=measure: {"t": m(*a)},  # type: ignore[misc]
                        lambda m=measure: {"t": m(*inspect)},  # type: ignore[misc]
                    )
                    table.ratio(f"{name}, {what} time", "`celery inspect ping`", xs["t"], ys["t"], "-")
            xs, ys = alternate(
                n,
                lambda: {"t": bench.cpu_command("tlrun", "health", "-A", "benchapp", "--liveness")},
                lambda: {"t": _interpreter_cpu(bench)},
            )
            table.ratio("`tlrun health --liveness`, CPU time", "`python -c pass`", xs["t"], ys["t"], "<= 0.05 s")
        finally:
            if held is not None:
                bench.stop(held, signal.SIGINT)
            bench.close()
    text = render(table)
    out.write_text(text)
    print("\n" + text)
    update_page(text, "probes")
