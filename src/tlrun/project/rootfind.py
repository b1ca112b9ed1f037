"""The project root, found from any folder inside it (layout.py has the rest of where the project is): a
module of its own, with nothing heavy to import, for the liveness probe (ops/liveness.py).

The root is found the way git, pytest and ruff find theirs, by walking up from the current directory: the
nearest ancestor whose project file has a tlrun table (`[tool.tlrun]` in pyproject.toml, or a tlrun.toml)
wins; without one, the nearest ancestor holding a pyproject.toml, a manage.py or a .git.
"""

from __future__ import annotations

import os
import re

TYPE_CHECKING = False  # pathlib only where a Path is returned: the liveness probe uses the string forms
if TYPE_CHECKING:
    from pathlib import Path

PYPROJECT = "pyproject.toml"
TLRUN_TOML = "tlrun.toml"
ROOT_MARKERS = (PYPROJECT, TLRUN_TOML, "manage.py", ".git")
_TLRUN_TABLE = re.compile(rb"^\s*\[\s*tool\s*\.\s*tlrun\s*[\].]", re.M)
MAX_MARKER_BYTES = 1024 * 1024


def _has_tlrun_table(directory: str) -> bool:
    if os.path.isfile(os.path.join(directory, TLRUN_TOML)):
        return True
    try:
        with open(os.path.join(directory, PYPROJECT), "rb") as fh:
            return _TLRUN_TABLE.search(fh.read(MAX_MARKER_BYTES)) is not None
    except OSError:
        return False


def find_root(start: Path) -> Path:
    """The project root for a command run in `start` (see the module's docstring); `start` itself when no
    ancestor has a marker."""
    from pathlib import Path

    return Path(root_of(str(start)))


def root_of(start: str) -> str:
    """find_root, on strings (the liveness probe imports no pathlib)."""
    start = os.path.realpath(start)
    chain = [start]
    while os.path.dirname(chain[-1]) != chain[-1]:
        chain.append(os.path.dirname(chain[-1]))
    for directory in chain:
        if _has_tlrun_table(directory):
            return directory
    for directory in chain:
        if any(os.path.lexists(os.path.join(directory, marker)) for marker in ROOT_MARKERS):
            if os.path.dirname(directory) == directory:
                break  # a marker at / is the machine's, not a project's
            return directory
    return start
