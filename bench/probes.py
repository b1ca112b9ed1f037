"""What a container's health probes cost (`scripts/bench.sh --probes`, writes bench/probes.md): wall and CPU
time of `tlrun health --liveness` (local evidence), `--readiness` (ping and consumption) and `celery inspect
ping` (what probes ran before), each against a running `tlrun worker`."""

from __future__ import annotations

import signal
import tempfile
from pathlib import Path

from harness import Bench
from run import Table, alternate, render, update_readme


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
        finally:
            if held is not None:
                bench.stop(held, signal.SIGINT)
            bench.close()
    text = render(table)
    out.write_text(text)
    print("\n" + text)
    update_readme(text, "probes")
