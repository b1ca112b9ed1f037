"""The command line: `tlrun.cli:main`. The group and shared options are in base.py; each command module
registers its commands on the group when imported, which the group does for the command that runs
(base.COMMAND_MODULES)."""

from __future__ import annotations

from tlrun.cli.base import cli, main

__all__ = ["cli", "main"]
