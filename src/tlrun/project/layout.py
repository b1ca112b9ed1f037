"""Where the project is: its root (found from any folder inside it) and where its code lives (a src/ layout).

The root is found the way git, pytest and ruff find theirs, by walking up from the current directory:
the nearest ancestor whose project file has a tlrun table (`[tool.tlrun]` in pyproject.toml, or a
tlrun.toml) wins; without one, the nearest ancestor holding a pyproject.toml, a manage.py or a .git.
Nothing is imported; only small files are read.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tlrun.errors import ConfigError
from tlrun.project.discocache import Seen
from tlrun.project.rootfind import MAX_MARKER_BYTES as MAX_MARKER_BYTES
from tlrun.project.rootfind import PYPROJECT as PYPROJECT
from tlrun.project.rootfind import ROOT_MARKERS as ROOT_MARKERS
from tlrun.project.rootfind import TLRUN_TOML as TLRUN_TOML
from tlrun.project.rootfind import find_root as find_root

# Top-level modules that would shadow a package tlrun or the worker imports: never an app candidate, and
# never found by tlrun's own imports (the project's folders go on sys.path only after these are imported).
SHADOWED = frozenset(
    {
        "celery",
        "kombu",
        "billiard",
        "amqp",
        "vine",
        "redis",
        "click",
        "psutil",
        "tlrun",
        "tomlkit",
        "dotenv",
        "watchfiles",
        "django",
        "json5",
        "prometheus_client",
    }
)


def read_pyproject(root: Path) -> dict[str, Any]:
    """root/pyproject.toml parsed, or {} when it is missing or unreadable (the strict reading, with its
    errors, is project/file.py's)."""
    from tlrun.project import file

    try:
        with open(root / PYPROJECT, "rb") as fh:
            data = fh.read(MAX_MARKER_BYTES + 1)
        if len(data) > MAX_MARKER_BYTES:
            return {}
        document: dict[str, Any] = file.tomllib.loads(data.decode("utf-8"))
        return document
    except (OSError, UnicodeDecodeError, file.tomllib.TOMLDecodeError, RecursionError):
        return {}


@dataclass(frozen=True)
class Source:
    directory: Path  # where the project's top-level modules are
    why: str  # "source = ..." / "src/ layout" / "" (the root itself)


def _packages_in(directory: Path) -> list[str]:
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return []
    found = []
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False) and entry.name.isidentifier():
                if os.path.isfile(os.path.join(entry.path, "__init__.py")):
                    found.append(entry.name)
            elif entry.name.endswith(".py") and entry.name[:-3].isidentifier() and entry.name != "setup.py":
                found.append(entry.name[:-3])
        except OSError:
            continue
    return found


def _declared_src(document: dict[str, Any]) -> str | None:
    """A packaging tool's setting that puts the packages under a folder: setuptools' `package-dir` or
    `packages.find.where`, hatch's wheel `packages`, Poetry's `packages` `from`."""
    tool = document.get("tool")
    if not isinstance(tool, dict):
        return None
    setuptools = tool.get("setuptools")
    if isinstance(setuptools, dict):
        package_dir = setuptools.get("package-dir")
        if isinstance(package_dir, dict) and isinstance(package_dir.get(""), str):
            return str(package_dir[""])
        packages = setuptools.get("packages")
        find = packages.get("find") if isinstance(packages, dict) else None
        where = find.get("where") if isinstance(find, dict) else None
        if isinstance(where, list) and len(where) == 1 and isinstance(where[0], str) and where[0] not in (".", ""):
            return str(where[0])
    hatch = tool.get("hatch")
    try:
        wheel_packages = hatch["build"]["targets"]["wheel"]["packages"]  # type: ignore[index]
    except (KeyError, TypeError):
        wheel_packages = None
    if isinstance(wheel_packages, list) and wheel_packages and isinstance(wheel_packages[0], str):
        parent = os.path.dirname(wheel_packages[0].rstrip("/"))
        if parent:
            return parent
    poetry = tool.get("poetry")
    packages = poetry.get("packages") if isinstance(poetry, dict) else None
    if isinstance(packages, list):
        for item in packages:
            if isinstance(item, dict) and isinstance(item.get("from"), str):
                return str(item["from"])
    return None


def check_source(root: Path, value: str, where: str) -> Path:
    """The project file's `source`: a folder inside the root."""
    path = Path(value)
    if path.is_absolute() or ".." in path.parts:
        raise ConfigError(f'{where}: {value!r} must be a folder inside the project root, e.g. "src"')
    directory = root / path
    if directory.is_symlink() or not directory.is_dir():
        raise ConfigError(
            f"{where}: {directory} is not a folder", hint='set source to where your packages are, e.g. "src"'
        )
    return directory


def find_source(root: Path, document: dict[str, Any] | None, declared: str | None = None) -> Source:
    """Where the code lives: the project file's `source` when set; else a src/ layout (a packaging tool's
    setting pointing there, or no top-level package beside a src/ folder holding some); else the root."""
    if declared is not None:
        return Source(check_source(root, declared, f"{root / PYPROJECT} (key source)"), f"source = {declared!r}")
    from_tool = _declared_src(document or {})
    if from_tool is not None and from_tool not in (".", ""):
        directory = root / from_tool
        if directory.is_dir() and not directory.is_symlink():
            return Source(directory, f"{from_tool}/ layout (pyproject.toml's packaging settings)")
    src = root / "src"
    top = _packages_in(root)
    if src.is_dir() and not src.is_symlink() and _packages_in(src) and not any(os.path.isdir(root / n) for n in top):
        return Source(src, "src/ layout")
    return Source(root, "")


def walk(
    root: Path, descend: Callable[[os.DirEntry[str], int], bool], seen: Seen | None = None
) -> Iterator[tuple[os.DirEntry[str], str]]:
    """(entry, path relative to root) of every file under root, breadth first, in name order, never through a
    symlink; a folder is entered when `descend(entry, its depth)` says so (the root is depth 0). Each folder
    listed is recorded in `seen` (the discovery cache)."""
    queue: collections.deque[tuple[str, str, int]] = collections.deque([(str(root), "", 0)])
    while queue:
        directory, rel_dir, depth = queue.popleft()
        if seen is not None:
            seen.folder(directory)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            rel = os.path.join(rel_dir, entry.name) if rel_dir else entry.name
            try:
                if entry.is_symlink():
                    continue
                if entry.is_dir(follow_symlinks=False):
                    if descend(entry, depth):
                        queue.append((entry.path, rel, depth + 1))
                    continue
            except OSError:
                continue
            yield entry, rel


def inside_package(directory: Path) -> bool:
    """Is this folder a Python package (the place a newcomer runs tlrun from, next to celery.py)?"""
    return (directory / "__init__.py").is_file()
