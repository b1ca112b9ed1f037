"""The project root, found from any folder inside it (layout.py has the rest of where the project is): a
module of its own, with nothing heavy to import, for the liveness probe (ops/liveness.py).

The root is found the way git, pytest and ruff find theirs, by walking up from the current directory: the
nearest ancestor whose project file has a tlrun table (`[tool.tlrun]` in pyproject.toml, or a tlrun.toml)
wins; without one, the nearest ancestor holding a pyproject.toml, a manage.py or a .git.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

PYPROJECT = "pyproject.toml"
TLRUN_TOML = "tlrun.toml"
ROOT_MARKERS = (PYPROJECT, TLRUN_TOML, "manage.py", ".git")
_TLRUN_TABLE = re.compile(rb"^\s*\[\s*tool\s*\.\s*tlrun\s*[\].]", re.M)
MAX_MARKER_BYTES = 1024 * 1024


def _has_tlrun_table(directory: Path) -> bool:
    if (directory / TLRUN_TOML).is_file():
        return True
    try:
        with open(directory / PYPROJECT, "rb") as fh:
            return _TLRUN_TABLE.search(fh.read(MAX_MARKER_BYTES)) is not None
    except OSError:
        return False


def find_root(start: Path) -> Path:
    """The project root for a command run in `start` (see the module's docstring); `start` itself when no
    ancestor has a marker."""
    start = start.resolve()
    chain = [start, *start.parents]
    for directory in chain:
        if _has_tlrun_table(directory):
            return directory
    for directory in chain:
        if any(os.path.lexists(directory / marker) for marker in ROOT_MARKERS):
            if directory == Path(directory.anchor):
                break  # a marker at / is the machine's, not a project's
            return directory
    return start
