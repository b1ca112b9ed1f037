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
    kind: str = "run"  # "run": a file that runs it (Procfile, compose, scripts...); "docs": prose
    folder: str = ""  # the file's folder, relative to the root read from ("" for the root itself)
    workdir: str | None = None  # the folder the command runs in, as the file says (`cd apps &&`, working_dir)


_ASSIGN = re.compile(
    r"""^[ \t]*(?:-[ \t]*|export[ \t]+|ENV[ \t]+)?([A-Za-z_]\w*)(?:[ \t]*[:=][ \t]*|[ \t]+)"""
    r"""["']?([A-Za-z_][\w.:-]*)["']?[ \t]*$""",
    re.M,
)
_VARIABLE = re.compile(r"\$\{([A-Za-z_]\w*)(?::?-([^}]*))?\}|\$([A-Za-z_]\w*)")
_CD_INLINE = re.compile(r"(?:^|[\s;&(\"'])cd[ \t]+([\w./${}-]+)[ \t]*(?:&&|;)")
_WORKDIR = re.compile(
    r"""^[ \t]*(?:cd[ \t]+([\w./${}-]+)[ \t]*$|WORKDIR[ \t]+(\S+)|WorkingDirectory[ \t]*=[ \t]*(\S+)|"""
    r"""directory[ \t]*=[ \t]*(\S+)|working_dir[ \t]*:[ \t]*["']?([^"'\s]+))""",
)
_SERVICE = re.compile(r"^[ ]{0,2}[\w.-]+:[ \t]*$")


def variables(text: str) -> dict[str, str]:
    """NAME=value, NAME: value, ENV NAME value, export NAME=value lines: what `${NAME}` may stand for."""
    return {m.group(1): m.group(2) for m in _ASSIGN.finditer(text)}


def substitute(text: str, known: dict[str, str]) -> str:
    """${NAME}, ${NAME:-default} and $NAME replaced from `known` (a default when unknown); others kept."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3)
        if name in known:
            return known[name]
        return match.group(2) if match.group(2) is not None else match.group(0)

    return _VARIABLE.sub(value, text) if "$" in text else text


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


def said_in(text: str, known: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(app, the command as written) for each `celery ... -A APP ... <subcommand>` line of a file's text."""
    return [(app, command) for app, command, _workdir in _said_with_workdir(text, known or {})]


def _said_with_workdir(text: str, known: dict[str, str]) -> list[tuple[str, str, str | None]]:
    """(app, command, the folder it runs in as written) for each celery line; the folder is a `cd X &&` on
    the line, else the last cd / WORKDIR / WorkingDirectory / directory / working_dir before it (a compose
    service's own)."""
    said: list[tuple[str, str, str | None]] = []
    workdir: str | None = None
    block = 0  # where the current compose service's (or Makefile target's) lines start in `said`
    for line in text.splitlines():
        if _SERVICE.match(line):
            workdir, block = None, len(said)  # a new compose service, or a Makefile target
        directive = _WORKDIR.match(line)
        if directive:
            workdir = substitute(next(g for g in directive.groups() if g), known)
            if directive.group(5):  # a compose service's working_dir holds for its command above it too
                said[block:] = [(a, c, w if w is not None else workdir) for a, c, w in said[block:]]
        if "celery" not in line:
            continue
        # Variables are filled in to read the line, never to show it: .env holds passwords too.
        as_written = [m.group("rest") for m in _CELERY.finditer(line.translate(_NOISE))]
        line = substitute(line, known)
        plain = line.translate(_NOISE)
        for i, match in enumerate(_CELERY.finditer(plain)):
            rest = match.group("rest")
            option = _APP_OPT.search(rest)
            if option is None or _SUBCOMMAND.search(rest) is None:
                continue
            shown = " ".join(("celery" + (as_written[i] if i < len(as_written) else "")).split())
            inline = [m.group(1) for m in _CD_INLINE.finditer(line[: line.find("celery")])]
            where = inline[-1] if inline else workdir
            said.append((option.group(1).rstrip("."), shown[:72] + ("..." if len(shown) > 72 else ""), where))
    return said


def _read(path: str, seen: Seen | None, limit: int = MAX_RUN_FILE_BYTES) -> bytes | None:
    """A regular file's bytes, never through a symlink and never blocking on a FIFO or device."""
    try:
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        fd = os.open(path, flags)
        with os.fdopen(fd, "rb") as fh:
            info = os.fstat(fh.fileno())
            if seen is not None:
                seen.file(path, info)
            if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
                return None
            return fh.read(limit)
    except OSError:
        if seen is not None:
            seen.file(path)
        return None


def read_said(root: Path, seen: Seen | None = None) -> list[Said]:
    """Every app value the project's run files and docs pass to celery, in the order of run_files. A shell
    variable in a command is read from the same file, the root's .env, or a compose file's environment."""
    texts: list[tuple[str, str, str]] = []
    shared: dict[str, str] = {}
    dotenv = _read(os.path.join(str(root), ".env"), seen)
    if dotenv is not None:
        shared.update(variables(dotenv.decode("utf-8", "replace")))
    for rel, kind in run_files(root, seen):
        data = _read(os.path.join(str(root), rel), seen)
        if data is None:
            continue
        text = data.decode("utf-8", "replace")
        if kind == "compose" and "environment" in text:
            shared = {**variables(text), **shared}
        if "celery" in text:
            texts.append((rel, kind, text))
    found: list[Said] = []
    for rel, kind, text in texts:
        known = {**shared, **variables(text)} if "$" in text else shared
        for app, command, workdir in _said_with_workdir(text, known):
            if "$" in app or (workdir is not None and "$" in workdir):
                continue
            rank = "docs" if kind == "docs" else "run"
            found.append(Said(app, f"{rel}: `{command}`", rank, os.path.dirname(rel), workdir))
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
