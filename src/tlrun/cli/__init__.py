"""The command line: `tlrun.cli:main`. The group and shared options are in base.py; each command module
registers its commands on the group when imported, which the group does for the command that runs
(base.COMMAND_MODULES). The liveness probe's documented commands are answered before click is imported
(ops/liveness.py: a probe runs every few seconds in every pod)."""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["cli", "main"]


def main() -> None:
    from tlrun.ops.liveness import fast_health

    code = fast_health(sys.argv[1:])
    if code is not None:
        raise SystemExit(code)
    from tlrun.cli.base import main as run

    run()


def __getattr__(name: str) -> Any:
    if name == "cli":
        from tlrun.cli.base import cli

        return cli
    raise AttributeError(name)
