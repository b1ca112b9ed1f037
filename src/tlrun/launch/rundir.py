"""tlrun's per-user state directories, created and checked: a module of its own, light enough for the
early start (launch/early.py), which needs the runtime directory before the launch core is imported."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from tlrun.errors import UnsafeStateError


def runtime_dir(environ: Mapping[str, str]) -> Path:
    """$XDG_RUNTIME_DIR/tlrun, else a 0700 directory under the user's cache dir; created and checked.
    State that may differ between shells lives here (beat's schedule, the private broker's files): never
    the locks, which must be the same for every shell of the user (see lock_dir)."""
    xdg = environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        base = Path(xdg) / "tlrun"
    else:
        home = os.path.expanduser("~")
        if not os.path.isabs(home):
            # No HOME and no password entry: expanduser returns "~" itself, a directory named `~` in the
            # project (which a later `rm -rf ~` would take for a home). Use the per-user temporary one.
            import tempfile

            return private_dir(Path(tempfile.gettempdir()) / f"tlrun-{os.getuid()}")
        cache = environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
        base = Path(cache) / "tlrun"
    return private_dir(base)


def private_dir(base: Path) -> Path:
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:  # an unwritable HOME or cache directory: say which, never a traceback
        raise UnsafeStateError(
            f"cannot create tlrun's state directory {base}: {exc.strerror}",
            hint="set XDG_RUNTIME_DIR (or XDG_CACHE_HOME) to a directory of yours",
        ) from None
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeStateError(f"{base} is not a directory (a symlink?): refusing to use it")
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise UnsafeStateError(
            f"{base} must be owned by you with mode 0700 (it is uid {st.st_uid}, mode {st.st_mode & 0o777:o})"
        )
    return base
