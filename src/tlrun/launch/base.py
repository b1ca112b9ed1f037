"""The pre-imported base of `tlrun dev --reload`'s spare: everything a worker of this role imported from outside
the project, imported before the next save, so that a save costs only the project's own code.

A worker of tlrun dev writes, once it consumes, the names of the modules it holds that are installed (the
standard library and the interpreter's site-packages: Django, Django REST framework, Celery, the app's
third-party dependencies) to a file of the launcher's runtime directory (BASE_ENV names it). The role's next
spare imports those modules, in the order the worker first imported them, before it says `spare`; nothing of
the project's own: the project's folders are off `sys.path` meanwhile. A module that fails there (one that
needs Django's apps loaded, as every models module does) is left for the real start, which imports it as
always.

Two things make the base unusable, and the spare then tells the launcher instead of importing the app:
- `stale`: an installed folder changed since the base imported (a `pip install`): the launcher starts a
  fresh worker, which imports the new versions (and its successor's base is built from them);
- `impure <module>`: importing that installed module looked for a module of the project (a library reading
  the project's settings at import, or trying an optional module the project may have): kept in the base, it
  would not see the project's next save. The launcher says so once and its spares import no base since.

This module imports only the standard library and tlrun.safefile: it runs in every worker of tlrun dev.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from tlrun import safefile

MAX_BYTES = 4 * 1024 * 1024


def installed_dirs() -> tuple[str, ...]:
    """The interpreter's own folders: the standard library and every site-packages (its own, and any other on
    the path), each ending in a slash, as written and resolved (a venv's lib64 is a link to lib)."""
    import site
    import sysconfig

    dirs = {sysconfig.get_path(key) for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    with contextlib.suppress(AttributeError):  # virtualenv's old site.py has neither
        dirs.update(site.getsitepackages())
        dirs.add(site.getusersitepackages())
    # Another environment's packages on the path (PYTHONPATH, a .pth file: Debian's dist-packages, a shared venv)
    dirs.update(p for p in sys.path if os.path.basename(os.path.normpath(p)) in ("site-packages", "dist-packages"))
    found: set[str] = set()
    for d in dirs:
        if d:
            found.add(os.path.join(os.path.abspath(d), ""))
            found.add(os.path.join(os.path.realpath(d), ""))
    return tuple(sorted(found))


def _installed(module: ModuleType | None, dirs: tuple[str, ...]) -> bool:
    file = getattr(module, "__file__", None)
    return isinstance(file, str) and os.path.abspath(file).startswith(dirs)


def installed_modules() -> list[str]:
    """The installed modules this process holds, in the order they were first imported."""
    dirs = installed_dirs()
    return [
        name
        for name, module in list(sys.modules.items())
        if not name.startswith(("__", "tlrun")) and _installed(module, dirs)
    ]


def record(path: str) -> None:
    """The worker's side, once it consumes: write what the next spare should import. Never fails the worker."""
    with contextlib.suppress(OSError, ValueError):
        safefile.write_atomic(Path(path), "\n".join(installed_modules()) + "\n", 0o600)


def _stamp(dirs: Sequence[str]) -> dict[str, int]:
    """Each installed folder's modification time: a `pip install` adds or removes a distribution's folder in
    the site-packages it writes to."""
    stamp = {}
    for d in dirs:
        with contextlib.suppress(OSError):
            stamp[d] = os.stat(d).st_mtime_ns
    return stamp


class _ProjectLookups(importlib.abc.MetaPathFinder):
    """Last on `sys.meta_path` while the base imports: notes a top-level name nothing installed has but one of
    the project's folders (taken off `sys.path` meanwhile) would."""

    def __init__(self, folders: list[str]) -> None:
        self.folders = folders
        self.wanted: list[str] = []

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if path is None and importlib.machinery.PathFinder.find_spec(name, self.folders) is not None:
            self.wanted.append(name)
        return None


class Base:
    """What a spare imported before it said `spare`."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.imported = 0  # modules imported here, submodules included (beyond Celery's warm-up)
        self.failed = 0  # names that did not import without the project (left for the real start)
        self.impure = ""  # the installed module that looked for one of the project's
        self._stamp: dict[str, int] = {}

    def build(self) -> Base:
        data = safefile.read_private(Path(self.path), MAX_BYTES) if self.path else None
        names = data.decode("utf-8", "replace").split() if data else []
        dirs = installed_dirs()

        def installed(entry: str) -> bool:  # the folder itself, or one inside it (lib-dynload, a .pth's)
            return os.path.join(os.path.abspath(entry or "."), "").startswith(dirs)

        self._stamp = _stamp([*dirs, *(p for p in sys.path if installed(p))])
        if not names:
            return self
        saved = sys.path[:]
        project = [p for p in saved if not installed(p)]
        sys.path[:] = [p for p in saved if p not in project]
        lookups = _ProjectLookups([os.path.abspath(p or ".") for p in project])
        sys.meta_path.append(lookups)
        held = len(sys.modules)
        try:
            for name in names:
                if name in sys.modules:
                    continue
                try:
                    importlib.import_module(name)
                except Exception:  # not SystemExit: the shim's answer to SIGTERM before Celery runs (a stop)
                    self.failed += 1
                if lookups.wanted:
                    self.impure = f"{name} (it looked for {lookups.wanted[0]})"
                    break
        finally:
            sys.meta_path.remove(lookups)
            sys.path[:] = saved
            self.imported = len(sys.modules) - held
        return self

    def stale(self) -> bool:
        """An installed folder changed since the base imported: its modules may be old versions."""
        return _stamp(list(self._stamp)) != self._stamp

    def unusable(self) -> str:
        """Why the spare must not become the worker (its word to the launcher), or empty."""
        return f"impure {self.impure}" if self.impure else "stale" if self.stale() else ""
