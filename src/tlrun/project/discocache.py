"""Discovery's answer, kept in the runtime directory until the files it rests on change.

Discovery reads every module of the project (about 17 us a file here: 0.34 s at 20,000 files), on every
command that has no pinned app. What it read is recorded as it goes (`Seen`): the mtime of every folder it
listed (a file added, deleted or renamed changes its folder's mtime) and the size and mtime of every file its
answer rests on (the modules that name Celery or import the app's module, the run files and docs it read,
manage.py). The next command checks only those (a few hundred stats, about 2 ms at 20,000 files) and reuses
the answer when nothing changed. A module that never named Celery is not re-read: one edited in place to
create a second app is noticed once a file of its folder is added, removed or renamed, or with
`TLRUN_NO_DISCOVERY_CACHE=1`; `tlrun init` (which pins the app) never uses the cache.

The cache file is the user's own (runtime directory 0700, written atomically, never through a symlink); one
that is unreadable, foreign, from another tlrun version or malformed is ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlrun import __version__, safefile

if TYPE_CHECKING:
    from tlrun.project.discover import Discovery

DISABLE_ENV = "TLRUN_NO_DISCOVERY_CACHE"
RACY = 2.0  # seconds: a file changed this recently may change again within its mtime's granularity
MAX_CACHE_BYTES = 4 << 20


class Seen:
    """What one discovery rested on: folders listed (path -> mtime) and files read (path -> size, mtime)."""

    def __init__(self) -> None:
        self.dirs: dict[str, int] = {}
        self.files: dict[str, list[int]] = {}

    def folder(self, path: str) -> None:
        try:
            self.dirs[path] = os.stat(path).st_mtime_ns
        except OSError:
            self.dirs[path] = -1

    def file(self, path: str, info: os.stat_result | None = None) -> None:
        try:
            info = info or os.stat(path, follow_symlinks=False)
            self.files[path] = [info.st_size, info.st_mtime_ns]
        except OSError:
            self.files[path] = [-1, -1]  # absent: its appearing changes the answer

    def racy(self, now_ns: int) -> bool:
        limit = now_ns - int(RACY * 1e9)
        return any(m > limit for m in self.dirs.values()) or any(m > limit for _s, m in self.files.values())


def _current(seen: Mapping[str, Any]) -> bool:
    for path, mtime in seen.get("dirs", {}).items():
        try:
            if os.stat(path).st_mtime_ns != mtime:
                return False
        except OSError:
            if mtime != -1:
                return False
    for path, (size, mtime) in seen.get("files", {}).items():
        try:
            info = os.stat(path, follow_symlinks=False)
        except OSError:
            if mtime != -1:
                return False
            continue
        if [info.st_size, info.st_mtime_ns] != [size, mtime]:
            return False
    return True


def cache_path(runtime: Path, root: Path, code_root: Path, run_folder: Path | None = None) -> Path:
    """One answer per root, code root and run folder (the folder tlrun runs from, when it is searched too)."""
    key = hashlib.sha256(f"{root}\0{code_root}\0{run_folder or ''}".encode()).hexdigest()[:20]
    return runtime / f"discovery-{key}.json"


def load(path: Path, root: Path, code_root: Path) -> Discovery | None:
    """The cached answer when it still holds, else None."""
    from tlrun.project.discover import Discovery

    raw = safefile.read_private(path, MAX_CACHE_BYTES)
    try:
        data = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("version") != __version__:
        return None
    if data.get("root") != str(root) or data.get("code_root") != str(code_root):
        return None
    app, found, import_root = data.get("app"), data.get("found"), data.get("import_root", "")
    warnings = data.get("warnings", [])
    if not isinstance(warnings, list) or not all(isinstance(v, str) for v in (import_root, *warnings)):
        return None
    if not isinstance(app, str) or not isinstance(found, str):
        return None
    try:
        return Discovery(app, found, import_root, tuple(warnings)) if _current(data) else None
    except (TypeError, ValueError, AttributeError):
        return None


def store(path: Path, root: Path, code_root: Path, found: Discovery, seen: Seen) -> None:
    """Keep the answer, unless a file it rests on changed too recently to trust its mtime."""
    from tlrun.safefile import write_atomic

    if seen.racy(time.time_ns()):
        return
    data = {
        "version": __version__,
        "root": str(root),
        "code_root": str(code_root),
        "app": found.app,
        "found": found.found,
        "import_root": found.import_root,
        "warnings": list(found.warnings),
        "dirs": seen.dirs,
        "files": seen.files,
    }
    try:
        write_atomic(path, json.dumps(data), mode=0o600)
    except OSError:
        pass  # a cache that cannot be written costs the next command a scan, nothing else
