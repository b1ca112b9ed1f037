"""The project's id: a module of its own, with nothing heavy to import (the liveness probe, ops/probe.py)."""

from __future__ import annotations

import os

try:  # hashlib loads OpenSSL (about 9 ms of CPU): the liveness probe takes the built-in SHA-256
    from _sha2 import sha256  # type: ignore[import-not-found,unused-ignore]  # Python 3.12+
except ImportError:
    try:
        from _sha256 import sha256  # type: ignore[import-not-found,no-redef,unused-ignore]
    except ImportError:
        from hashlib import sha256  # type: ignore[assignment,unused-ignore]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

IMPLICIT_ROLE = "default"  # the role of a project whose file declares none


def project_id(root: Path | str, app: str) -> str:
    """A short stable id for (project directory, app): the sweep's marker and the lock's name."""
    digest = sha256(f"{os.path.realpath(root)}\0{app}".encode()).hexdigest()
    return str(digest[:16])
