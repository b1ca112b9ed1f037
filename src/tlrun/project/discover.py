"""Find the project's Celery app the way a person would, from source text alone (nothing is imported).

1. A Django project: manage.py names DJANGO_SETTINGS_MODULE; the settings' package has a celery.py.
2. Otherwise: a module in the project root, or in one of its packages, that creates a `Celery(` instance at
   module level (`app = Celery(...)`). Virtual environments, tests, caches, node_modules and .git are skipped,
   and symlinks are never followed (a link may point out of the project, or into a loop).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from tlrun.errors import ConfigError

SKIP_DIRS = frozenset(
    {
        ".git",
        ".hg",
        ".svn",
        ".venv",
        "venv",
        "env",
        ".env",
        ".tox",
        ".nox",
        "node_modules",
        "__pycache__",
        "build",
        "dist",
        "site-packages",
        "tests",
        "test",
        "migrations",
        "logs",
        ".mypy_cache",
        ".ruff_cache",
        ".pytest_cache",
        ".eggs",
    }
)
MAX_DEPTH = 4  # package nesting below the root
MAX_SOURCE_BYTES = 512 * 1024  # a larger .py file is generated code, not an app module
_SETTINGS_RE = re.compile(rb"""DJANGO_SETTINGS_MODULE['"]\s*,\s*['"]([A-Za-z_][\w.]*)['"]""")
# `name = Celery(` or `name = celery.Celery(` at the start of a line (module level), annotations allowed.
_APP_RE = re.compile(rb"^([A-Za-z_]\w*)\s*(?::[^=\n]+)?=\s*(?:celery\.)?Celery\(", re.M)


@dataclass(frozen=True)
class Candidate:
    app: str  # what -A takes: `pkg.module` or `pkg.module:attr`
    path: str  # relative to the project root


@dataclass(frozen=True)
class Discovery:
    app: str
    found: str  # what was found, for the one line tlrun prints


def _module_name(rel: str) -> str:
    parts = rel[: -len(".py")].split(os.sep)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_identifier_path(rel: str) -> bool:
    return all(part.isidentifier() for part in rel[: -len(".py")].split(os.sep))


def _source_candidates(root: Path) -> list[Candidate]:
    found: list[Candidate] = []
    # (directory, its path relative to root, depth); only the root and packages (with __init__.py) are read.
    stack: list[tuple[str, str, int]] = [(str(root), "", 0)]
    while stack:
        directory, rel_dir, depth = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            rel = os.path.join(rel_dir, entry.name) if rel_dir else entry.name
            try:
                if entry.is_symlink():
                    continue
                if entry.is_dir(follow_symlinks=False):
                    if (
                        depth < MAX_DEPTH
                        and entry.name not in SKIP_DIRS
                        and not entry.name.startswith(".")
                        and entry.name.isidentifier()
                        and os.path.isfile(os.path.join(entry.path, "__init__.py"))
                    ):
                        stack.append((entry.path, rel, depth + 1))
                    continue
                if not entry.name.endswith(".py") or entry.name.startswith("test_") or not _is_identifier_path(rel):
                    continue
                if entry.stat(follow_symlinks=False).st_size > MAX_SOURCE_BYTES:
                    continue
                with open(entry.path, "rb") as fh:
                    source = fh.read()
            except OSError:
                continue
            if b"Celery(" not in source:
                continue
            match = _APP_RE.search(source)
            if match is None:
                continue
            attr = match.group(1).decode()
            module = _module_name(rel)
            # Celery's find_app looks for `app` and `celery` itself; any other name is spelled out.
            found.append(Candidate(module if attr in ("app", "celery") else f"{module}:{attr}", rel))
    return sorted(found, key=lambda c: c.path)


def _django_candidate(root: Path) -> Candidate | None:
    manage = root / "manage.py"
    try:
        if manage.is_symlink() or not manage.is_file():
            return None
        match = _SETTINGS_RE.search(manage.read_bytes()[:MAX_SOURCE_BYTES])
    except OSError:
        return None
    if match is None:
        return None
    package = match.group(1).decode().rsplit(".", 1)[0]
    celery_py = root.joinpath(*package.split("."), "celery.py")
    if package and not celery_py.is_symlink() and celery_py.is_file():
        return Candidate(f"{package}.celery", os.path.relpath(celery_py, root))
    return None


def discover_app(root: Path) -> Discovery:
    """The one Celery app of the project, or a ConfigError saying there is none, or listing several."""
    django = _django_candidate(root)
    if django is not None:
        return Discovery(django.app, f"found {django.path}, named by manage.py")
    candidates = _source_candidates(root)
    if len(candidates) == 1:
        return Discovery(candidates[0].app, f"found {candidates[0].path}")
    pin = 'pass -A/--app, set CELERY_APP in .env, or write `app = "..."` under [tool.tlrun] in pyproject.toml'
    if not candidates:
        raise ConfigError(f"no Celery app given, and none found in {root}", hint=pin)
    listed = "; ".join(f"{c.app} ({c.path})" for c in candidates)
    raise ConfigError(f"no Celery app given, and {len(candidates)} found in {root}: {listed}", hint=pin)
