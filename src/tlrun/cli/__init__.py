"""The command line: `tlrun.cli:main`. The group and shared options are in base.py; each command module
registers its commands on the group when imported."""

from __future__ import annotations

from tlrun.cli import launching, operating, setup, units  # noqa: F401  # register the commands
from tlrun.cli.base import accept_verbose_everywhere, cli, main

accept_verbose_everywhere()

__all__ = ["cli", "main"]
