"""What the project itself says about its Celery app: the `-A`/`--app` value its own files pass to `celery`.

Read as text, never run: Procfile(s), compose files, Makefile, justfile, tox.ini, noxfile.py, shell scripts,
supervisor and systemd files, Dockerfiles, pyproject.toml (its scripts and task-runner tables), and commands
in README and docs. A value counts only when it names a module of the project (a tutorial's `-A proj` in a
README of a project without `proj` is not evidence).
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from tlrun.project.discocache import Seen
from tlrun.project.layout import walk

MAX_RUN_FILE_BYTES = 256 * 1024
MAX_RUN_DEPTH = 3
_SKIP = frozenset(
    {
        "node_modules",
        "__pycache__",
        "site-packages",
        "venv",
        "env",
        "build",
        "dist",
        "migrations",
        "logs",
        "static",
        "staticfiles",
        "media",
    }
)
# (glob on the file name, the kind of evidence it gives)
_RUN_FILES = (
    ("Procfile*", "Procfile"),
    ("docker-compose*.yml", "compose"),
    ("docker-compose*.yaml", "compose"),
    ("compose*.yml", "compose"),
    ("compose*.yaml", "compose"),
    ("Makefile", "Makefile"),
    ("makefile", "Makefile"),
    ("GNUmakefile", "Makefile"),
    ("*.mk", "Makefile"),
    ("justfile", "justfile"),
    ("Justfile", "justfile"),
    ("tox.ini", "tox.ini"),
    ("noxfile.py", "noxfile.py"),
    ("*.sh", "script"),
    ("*.bash", "script"),
    ("*.conf", "supervisor"),
    ("*.service", "systemd"),
    ("Dockerfile*", "Dockerfile"),
    ("*.dockerfile", "Dockerfile"),
    ("pyproject.toml", "pyproject.toml"),
    ("README*", "docs"),
    ("*.md", "docs"),
    ("*.rst", "docs"),
)
_SUBCOMMANDS = (
    "worker|beat|multi|flower|events|inspect|control|purge|status|shell|call|result|report|amqp|migrate|graph|"
    "list|upgrade|logtool"
)
_CELERY = re.compile(r"(?<![\w.-])celery(?![\w.-])(?P<rest>[^\n]*)")
_APP_OPT = re.compile(r"(?:^|\s)(?:-A|--app)(?:\s*=\s*|\s+|(?=[A-Za-z_]))([A-Za-z_][\w.]*(?::[A-Za-z_]\w*)?)(?=\s|$)")
_SUBCOMMAND = re.compile(rf"(?:^|\s)(?:{_SUBCOMMANDS})(?:\s|$)")
_NOISE = str.maketrans({c: " " for c in "\"'`,[]();|&\\"})


@dataclass(frozen=True)
class Said:
    app: str  # the value as the project writes it
    where: str  # `Procfile: celery -A myapp worker`


_ANY_RUN_FILE = re.compile("|".join(fnmatch.translate(pattern) for pattern, _kind in _RUN_FILES))


def _kind(name: str) -> str | None:
    if _ANY_RUN_FILE.match(name) is None:  # one match for the common case: not a run file
        return None
    for pattern, kind in _RUN_FILES:
        if fnmatch.fnmatchcase(name, pattern):
            return kind
    return None


def run_files(root: Path, seen: Seen | None = None) -> list[tuple[str, str]]:
    """(path relative to root, kind) of every file that may run Celery, shallowest first."""

    def descend(entry: os.DirEntry[str], depth: int) -> bool:
        return depth < MAX_RUN_DEPTH and not entry.name.startswith(".") and entry.name not in _SKIP

    return [(rel, kind) for entry, rel in walk(root, descend, seen) if (kind := _kind(entry.name)) is not None]


def said_in(text: str) -> list[tuple[str, str]]:
    """(app, the command as written) for each `celery ... -A APP ... <subcommand>` line of a file's text."""
    said: list[tuple[str, str]] = []
    for line in text.splitlines():
        if "celery" not in line:
            continue
        plain = line.translate(_NOISE)
        for match in _CELERY.finditer(plain):
            rest = match.group("rest")
            option = _APP_OPT.search(rest)
            if option is None or _SUBCOMMAND.search(rest) is None:
                continue
            shown = " ".join(("celery" + rest).split())
            said.append((option.group(1).rstrip("."), shown[:72] + ("..." if len(shown) > 72 else "")))
    return said


def read_said(root: Path, seen: Seen | None = None) -> list[Said]:
    """Every app value the project's run files and docs pass to celery, in the order of run_files."""
    found: list[Said] = []
    for rel, _kind_name in run_files(root, seen):
        path = os.path.join(str(root), rel)
        try:
            flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
            fd = os.open(path, flags)
            with os.fdopen(fd, "rb") as fh:
                info = os.fstat(fh.fileno())
                if seen is not None:
                    seen.file(path, info)
                if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_RUN_FILE_BYTES:
                    continue  # a FIFO or device planted under a run file's name is never read
                data = fh.read(MAX_RUN_FILE_BYTES)
        except OSError:
            continue
        if b"celery" not in data:
            continue
        for app, command in said_in(data.decode("utf-8", "replace")):
            found.append(Said(app, f"{rel}: `{command}`"))
    return found


def same_app(a: str, b: str) -> bool:
    """Do two -A values name the same app? `proj`, `proj.celery`, `proj.celery:app` and `proj:app` do."""
    return _normal(a) == _normal(b)


def _normal(value: str) -> str:
    module, _, attr = value.partition(":")
    if attr in ("app", "celery"):
        attr = ""
    if not attr and module.endswith((".app", ".celery")) and "." in module:
        # `proj.celery.app` is module proj.celery, attribute app; `proj.celery` is found from `proj`
        module = module.rsplit(".", 1)[0]
        if module.endswith(".celery"):
            module = module.rsplit(".", 1)[0]
    return f"{module}:{attr}" if attr else module


def module_exists(code_root: Path, value: str, seen: Seen | None = None) -> bool:
    """Is the module part of an -A value a module or package under the project's code root?"""
    module = value.partition(":")[0]
    parts = module.split(".")
    for take in (len(parts), len(parts) - 1):  # `proj.celery.app` may be module proj.celery, attribute app
        if take <= 0:
            continue
        base = code_root.joinpath(*parts[:take])
        if seen is not None:
            seen.folder(str(base.parent))
            seen.file(str(base.with_suffix(".py")))
            seen.file(str(base / "__init__.py"))
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            return True
        if take == 1 and base.is_dir() and not base.is_symlink():
            return True  # a namespace package
    return False
