"""Find the project's Celery app from evidence, as a person would, from text alone (nothing is imported).

What the project says ranks over what its source happens to contain:
1. the `-A`/`--app` value the project's own run files and docs pass to `celery` (evidence.py);
2. Django: manage.py names DJANGO_SETTINGS_MODULE, and the settings' package has a celery.py;
3. a module that creates a Celery app at module level (`Celery(...)`, `celery.Celery(...)`, an aliased
   import, a subscripted generic `Celery[...](...)`); a module that imports that app together with the task
   modules (or starts it: `app.start()` under `__main__`) is what the project runs, and ranks first.
Several different answers at the top rank are never a silent pick: a ConfigError lists each with its evidence.
Virtual environments, tests, caches, node_modules and .git are skipped, symlinks are never followed, and a
top-level module that would shadow a package tlrun imports (`celery.py`) is never a candidate.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from tlrun.errors import ConfigError
from tlrun.project import discocache, evidence
from tlrun.project.discocache import Seen
from tlrun.project.layout import SHADOWED, Source, inside_package, walk

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
        "t",  # Celery's own test folder
        "testing",
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
_ALIAS_RE = re.compile(rb"^\s*from\s+celery\s+import\s+[^\n]*?\bCelery\s+as\s+(\w+)", re.M)
_MODULE_ALIAS_RE = re.compile(rb"^\s*import\s+celery\s+as\s+(\w+)", re.M)
_FROM_RE = re.compile(rb"^[ \t]*from[ \t]+(\.*[\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[^\n]*)", re.M)
_IMPORT_RE = re.compile(rb"^[ \t]*import[ \t]+([\w.]+(?:[ \t]*,[ \t]*[\w.]+)*)", re.M)
_MAIN_RE = re.compile(rb"""__name__\s*==\s*['"]__main__['"]""")
_START_RE = re.compile(rb"\.(?:start|worker_main)\(")
_TASK_RE = re.compile(rb"^[ \t]*@[ \t]*(?:[\w.]+\.)?(?:task|shared_task)\b", re.M)


def _creation_re(names: frozenset[bytes], prefixes: frozenset[bytes]) -> re.Pattern[bytes]:
    """`attr = Celery(`, `attr: T = celery.Celery[...](` at the start of a line (module level)."""
    name = b"|".join(re.escape(n) for n in sorted(names))
    prefix = b"|".join(re.escape(p) for p in sorted(prefixes))
    return re.compile(
        rb"^([A-Za-z_]\w*)[ \t]*(?::[^=\n]+)?=[ \t]*(?:(?:" + prefix + rb")\.)?(?:" + name + rb")"
        rb"[ \t]*(?:\[[^\n=]*\])?[ \t]*\(([^\n]{0,60})",
        re.M,
    )


_PLAIN_CREATION = _creation_re(frozenset({b"Celery"}), frozenset({b"celery"}))


@dataclass(frozen=True)
class Candidate:
    app: str  # what -A takes: `pkg.module` or `pkg.module:attr`
    path: str  # relative to the project root
    evidence: str = ""  # why: `Procfile: celery -A x worker`, `creates Celery('x')`
    configured: bool = True  # False: a bare Celery() that a factory configures later (listed, never picked)

    def describe(self) -> str:
        return f"{self.app} ({self.path}: {self.evidence})" if self.evidence else f"{self.app} ({self.path})"


@dataclass(frozen=True)
class Discovery:
    app: str
    found: str  # what was found, for the one line tlrun prints


@dataclass
class _Module:
    name: str
    rel: str
    creates: list[tuple[str, str, bool]] = field(default_factory=list)  # (attr, call as written, configured)
    imports: set[str] = field(default_factory=set)  # modules it imports (absolute)
    names: list[tuple[str, str, str]] = field(default_factory=list)  # (module, name, bound as)
    launchable: bool = False


def _module_name(rel: str) -> str:
    parts = rel[: -len(".py")].split(os.sep)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_identifier_path(rel: str) -> bool:
    return all(part.isidentifier() for part in rel[: -len(".py")].split(os.sep))


def _absolute(module: str, current: str, is_package: bool) -> str:
    """`from .config import app` inside pkg.tasks means pkg.config."""
    dots = len(module) - len(module.lstrip("."))
    if not dots:
        return module
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (dots - 1)] if dots > 1 else base
    rest = module[dots:]
    return ".".join([*base, rest] if rest else base)


def _read_module(rel: str, source: bytes) -> _Module:
    info = _Module(_module_name(rel), rel)
    is_package = rel.endswith("__init__.py")
    for match in _FROM_RE.finditer(source):
        module = _absolute(match.group(1).decode(), info.name, is_package)
        info.imports.add(module)
        for item in match.group(2).decode().strip("()").replace("\n", ",").split(","):
            words = item.split("#", 1)[0].split()
            if len(words) == 1 and words[0].isidentifier():
                info.names.append((module, words[0], words[0]))
                info.imports.add(f"{module}.{words[0]}")  # `from pkg import tasks` imports pkg.tasks
            elif len(words) == 3 and words[1] == "as":
                info.names.append((module, words[0], words[2]))
                info.imports.add(f"{module}.{words[0]}")
    for match in _IMPORT_RE.finditer(source):
        info.imports.update(m.strip().decode() for m in match.group(1).split(b","))
    if b"Celery" in source:
        aliases = frozenset({b"Celery", *_ALIAS_RE.findall(source)})
        prefixes = frozenset({b"celery", *_MODULE_ALIAS_RE.findall(source)})
        creation = _PLAIN_CREATION if len(aliases) == 1 and len(prefixes) == 1 else _creation_re(aliases, prefixes)
        for match in creation.finditer(source):
            attr, args = match.group(1).decode(), match.group(2).decode()
            # Its first argument only: the rest may hold a broker URL with a password, never printed.
            first = re.split(r"[,)]", args, maxsplit=1)[0].strip()
            more = ", ..." if re.match(r"[^,)]*,", args) or (")" not in args and args) else ""
            call = f"Celery({first}{more})"
            configured = not args.lstrip().startswith(")") or re.search(
                rb"^" + re.escape(match.group(1)) + rb"\.(?:config_from_object|conf\.|autodiscover_tasks)",
                source,
                re.M,
            )
            info.creates.append((attr, call, bool(configured)))
    info.launchable = bool(_MAIN_RE.search(source) and _START_RE.search(source))
    return info


def _scan(code_root: Path, seen: Seen | None) -> dict[str, bytes]:
    """The source of every module that may matter, by path relative to the code root."""
    found: dict[str, bytes] = {}

    def descend(entry: os.DirEntry[str], depth: int) -> bool:
        """Only packages (with an __init__.py) are read below the code root."""
        return (
            depth < MAX_DEPTH
            and entry.name not in SKIP_DIRS
            and not entry.name.startswith(".")
            and entry.name.isidentifier()
            and os.path.isfile(os.path.join(entry.path, "__init__.py"))
        )

    for entry, rel in walk(code_root, descend, seen):
        name = entry.name
        if not name.endswith(".py") or name.startswith("test_") or not _is_identifier_path(rel):
            continue
        if os.sep not in rel and name[:-3] in SHADOWED:
            continue  # `celery.py` at the top would shadow Celery itself: never the app's module
        if not entry.is_file(follow_symlinks=False):
            continue  # a FIFO or device named like a module is never opened
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as fh:
                source = fh.read(MAX_SOURCE_BYTES + 1)
                if seen is not None and b"Celery" in source:
                    seen.file(entry.path, os.fstat(fh.fileno()))  # a possible creator: the answer rests on it
        except OSError:
            continue
        if len(source) <= MAX_SOURCE_BYTES and (b"import" in source or b"Celery" in source):
            found[rel] = source
    return found


def _app_value(module: str, attr: str) -> str:
    # Celery's find_app looks for `app` (then `celery`) itself; any other name is spelled out.
    return module if attr == "app" else f"{module}:{attr}"


def _source_candidates(code_root: Path, shown: str, seen: Seen | None) -> list[Candidate]:
    """Rank 3: the modules that create the app, or the ones that import it with its tasks (preferred)."""
    sources = _scan(code_root, seen)
    by_name = {_module_name(rel): source for rel, source in sources.items()}
    # Only a module that names Celery can create the app; only one that names the creator's module can
    # import it from there: the rest of a large tree is never parsed.
    creators = [m for rel, s in sources.items() if b"Celery" in s and (m := _read_module(rel, s)).creates]
    runners: list[Candidate] = []
    for creator in creators:
        attrs = {attr for attr, _call, _conf in creator.creates}
        needle = creator.name.rsplit(".", 1)[-1].encode()
        for rel, source in sources.items():
            if needle not in source or _module_name(rel) == creator.name:
                continue
            if seen is not None:
                seen.file(os.path.join(code_root, rel))  # a possible runner: the answer rests on it too
            module = _read_module(rel, source)
            bound = [b for src, name, b in module.names if src == creator.name and name in attrs]
            if not bound:
                continue
            tasks = sorted(
                t
                for t in module.imports
                if t not in (creator.name, module.name) and t in by_name and _TASK_RE.search(by_name[t])
            )
            if tasks or module.launchable:
                why = f"imports {bound[0]} from {creator.name}" + (
                    f" and the task modules {', '.join(tasks[:3])}" if tasks else " and starts it"
                )
                runners.append(Candidate(_app_value(module.name, bound[0]), os.path.join(shown, module.rel), why))
    if runners:
        return sorted(set(runners), key=lambda c: c.path)
    ranked: list[tuple[tuple[bool, bool], Candidate]] = []
    for creator in creators:
        for attr, call, configured in creator.creates:
            why = f"creates {call}" + ("" if configured else ", unconfigured")
            why += ", starts it" if creator.launchable else ""
            rank = (creator.launchable, configured)
            path = os.path.join(shown, creator.rel)
            ranked.append((rank, Candidate(_app_value(creator.name, attr), path, why, configured)))
    if not ranked:
        return []
    top = max(rank for rank, _c in ranked)
    return sorted({c for rank, c in ranked if rank == top}, key=lambda c: c.path)


def _django_candidate(root: Path, code_root: Path, seen: Seen | None) -> Candidate | None:
    for base in dict.fromkeys((root, code_root)):
        manage = base / "manage.py"
        if seen is not None:
            seen.file(str(manage))
        try:
            if manage.is_symlink() or not manage.is_file():
                continue
            match = _SETTINGS_RE.search(manage.read_bytes()[:MAX_SOURCE_BYTES])
        except OSError:
            continue
        if match is None:
            continue
        package = match.group(1).decode().rsplit(".", 1)[0]
        celery_py = code_root.joinpath(*package.split("."), "celery.py")
        if seen is not None:
            seen.file(str(celery_py))
        if package and not celery_py.is_symlink() and celery_py.is_file():
            rel = os.path.relpath(celery_py, root)
            return Candidate(f"{package}.celery", rel, f"named by {os.path.relpath(manage, root)}")
    return None


def _said_candidates(root: Path, code_root: Path, seen: Seen | None) -> list[Candidate]:
    """Rank 1: one candidate per distinct app the project's files pass to celery, with where it is said."""
    groups: list[list[evidence.Said]] = []
    for said in evidence.read_said(root, seen):
        if not evidence.module_exists(code_root, said.app, seen):
            continue
        for group in groups:
            if evidence.same_app(group[0].app, said.app):
                group.append(said)
                break
        else:
            groups.append([said])
    candidates = []
    for group in groups:
        where = group[0].where
        more = f" and {len(group) - 1} more" if len(group) > 1 else ""
        path, _, command = where.partition(": ")
        candidates.append(Candidate(group[0].app, path, command + more))
    return candidates


def discover_app(root: Path, source: Source | None = None, seen: Seen | None = None) -> Discovery:
    """The one Celery app of the project, or a ConfigError saying there is none, or listing several. What
    the answer rests on is recorded in `seen` (discocache.py)."""
    code_root = source.directory if source is not None else root
    shown = os.path.relpath(code_root, root) if code_root != root else ""
    pin = 'pass -A/--app, set CELERY_APP in .env, or write `app = "..."` under [tool.tlrun] in pyproject.toml'
    said = _said_candidates(root, code_root, seen)
    if len(said) == 1:
        return Discovery(said[0].app, f"{said[0].path}: {said[0].evidence}")
    if said:
        listed = "; ".join(c.describe() for c in said)
        raise ConfigError(f"no Celery app given, and the project's files name {len(said)}: {listed}", hint=pin)
    django = _django_candidate(root, code_root, seen)
    if django is not None:
        return Discovery(django.app, f"found {django.path}, {django.evidence}")
    candidates = _source_candidates(code_root, shown, seen)
    if len(candidates) == 1 and candidates[0].configured:
        return Discovery(candidates[0].app, f"found {candidates[0].path}: {candidates[0].evidence}")
    if not candidates:
        hint = pin
        if code_root == root and (root / "src").is_dir():
            hint = 'packages under src/? set source = "src" under [tool.tlrun] (tlrun init finds it); or ' + pin
        elif inside_package(root):
            hint = f"{root} is a Python package: run tlrun from the project's root folder, or " + pin
        raise ConfigError(f"no Celery app given, and none found in {code_root}", hint=hint)
    listed = "; ".join(c.describe() for c in candidates)
    count = len(candidates)
    if count == 1:
        raise ConfigError(
            f"no Celery app given; the only one found is unconfigured: {listed}",
            hint="a factory configures it later: name the module the project starts; " + pin,
        )
    raise ConfigError(f"no Celery app given, and {count} candidates in {code_root}: {listed}", hint=pin)


def discover_cached(root: Path, source: Source | None, runtime: Path | None) -> Discovery:
    """discover_app, through the cache in the runtime directory (None, or TLRUN_NO_DISCOVERY_CACHE=1: no
    cache)."""
    code_root = source.directory if source is not None else root
    if runtime is None or os.environ.get(discocache.DISABLE_ENV) == "1":
        return discover_app(root, source)
    path = discocache.cache_path(runtime, root, code_root)
    cached = discocache.load(path, root, code_root)
    if cached is not None:
        return Discovery(*cached)
    seen = Seen()
    found = discover_app(root, source, seen)
    discocache.store(path, root, code_root, found.app, found.found, seen)
    return found
