"""The project's modules under one import root, read as text: which create a Celery app, which import one, and
whether an `-A` value names a module that really gives Celery an app (nothing is imported).

An app is created by `Celery(...)` under any import path or alias, by a subclass of Celery (`class
MyCelery(Celery)`, used wherever that name is imported), or by a factory: a module-level function whose body
returns what it created with `Celery(...)` (`app = create_celery()`). A value's module gives an app the way
Celery's `find_app` looks for one: the attribute named, else `app`, `celery`, any app it binds (created or
imported: `from .celery import app as celery_app`), else the package's `celery` submodule.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from tlrun.project.discocache import Seen
from tlrun.project.layout import SHADOWED, walk

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
MAX_KINDS = 16  # subclass and factory names followed at most (a project has one or two)
_ALIAS_RE = re.compile(rb"^\s*from\s+celery\s+import\s+[^\n]*?\bCelery\s+as\s+(\w+)", re.M)
_MODULE_ALIAS_RE = re.compile(rb"^\s*import\s+celery\s+as\s+(\w+)", re.M)
_FROM_RE = re.compile(rb"^[ \t]*from[ \t]+(\.*[\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[^\n]*)", re.M)
_IMPORT_RE = re.compile(rb"^[ \t]*import[ \t]+([\w.]+(?:[ \t]*,[ \t]*[\w.]+)*)", re.M)
_MAIN_RE = re.compile(rb"""__name__\s*==\s*['"]__main__['"]""")
_START_RE = re.compile(rb"\.(?:start|worker_main)\(")
TASK_RE = re.compile(rb"^[ \t]*@[ \t]*(?:[\w.]+\.)?(?:task|shared_task|periodic_task)\b", re.M)
_CLASS_RE = re.compile(rb"^class[ \t]+(\w+)[ \t]*\(([^)]*)\)", re.M)
_DEF_RE = re.compile(rb"^def[ \t]+(\w+)[ \t]*\(", re.M)
_TOP_LEVEL = re.compile(rb"^(?=[^\s#)\]])", re.M)
_CALL_RE = re.compile(rb"^([A-Za-z_]\w*)[ \t]*(?::[^=\n]+)?=[ \t]*([A-Za-z_][\w.]*)[ \t]*\(", re.M)


def _creation_re(names: frozenset[bytes]) -> re.Pattern[bytes]:
    """`attr = Celery(`, `attr: T = celery.Celery[...](`, `app = factory.make_celery(` at the start of a line
    (module level)."""
    name = b"|".join(re.escape(n) for n in sorted(names))
    return re.compile(
        rb"^([A-Za-z_]\w*)[ \t]*(?::[^=\n]+)?=[ \t]*(?:[A-Za-z_]\w*\.)*(?:" + name + rb")"
        rb"[ \t]*(?:\[[^\n=]*\])?[ \t]*\(([^\n]{0,60})",
        re.M,
    )


_PLAIN_CREATION = _creation_re(frozenset({b"Celery"}))


@dataclass
class Module:
    name: str
    rel: str
    creates: list[tuple[str, str, bool]] = field(default_factory=list)  # (attr, call as written, configured)
    imports: set[str] = field(default_factory=set)  # modules it imports (absolute)
    names: list[tuple[str, str, str]] = field(default_factory=list)  # (module, name, bound as)
    launchable: bool = False
    defines_tasks: bool = False
    calls: list[tuple[str, str]] = field(default_factory=list)  # (attr, function): `app = create_app(...)`


def module_name(rel: str) -> str:
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


def read_module(rel: str, source: bytes, kinds: frozenset[bytes] = frozenset()) -> Module:
    """What one module creates and imports; `kinds` are the project's Celery subclasses and factories."""
    info = Module(module_name(rel), rel)
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
    own = frozenset(k for k in kinds if k in source)
    if b"Celery" in source or own:
        aliases = frozenset({b"Celery", *_ALIAS_RE.findall(source), *own})
        creation = _PLAIN_CREATION if len(aliases) == 1 else _creation_re(aliases)
        for match in creation.finditer(source):
            attr, args = match.group(1).decode(), match.group(2).decode()
            called = match.group(0)[: match.group(0).rfind(b"(")].rsplit(b"=", 1)[-1].strip()
            kind = called.rsplit(b".", 1)[-1].split(b"[", 1)[0].strip()
            # Its first argument only: the rest may hold a broker URL with a password, never printed.
            first = re.split(r"[,)]", args, maxsplit=1)[0].strip()
            more = ", ..." if re.match(r"[^,)]*,", args) or (")" not in args and args) else ""
            call = f"{kind.decode()}({first}{more})"
            configured = (
                kind in own
                or not args.lstrip().startswith(")")
                or re.search(
                    rb"^" + re.escape(match.group(1)) + rb"\.(?:config_from_object|conf\.|autodiscover_tasks)",
                    source,
                    re.M,
                )
            )
            info.creates.append((attr, call, bool(configured)))
    info.calls = [(m.group(1).decode(), m.group(2).decode()) for m in _CALL_RE.finditer(source)]
    info.launchable = bool(_MAIN_RE.search(source) and _START_RE.search(source))
    info.defines_tasks = TASK_RE.search(source) is not None
    return info


def _classes_in(source: bytes) -> set[bytes]:
    """The Celery subclasses a module defines at module level."""
    aliases = {b"Celery", *_ALIAS_RE.findall(source)}
    prefixes = {b"celery", *_MODULE_ALIAS_RE.findall(source)}
    spelled = aliases | {p + b".Celery" for p in prefixes}
    return {m.group(1) for m in _CLASS_RE.finditer(source) if spelled & {b.strip() for b in m.group(2).split(b",")}}


def _body(source: bytes, function: str) -> bytes | None:
    """The body of a module-level function, or None."""
    match = re.search(rb"^def[ \t]+" + re.escape(function.encode()) + rb"[ \t]*\(", source, re.M)
    if match is None:
        return None
    end = next((m.start() for m in _TOP_LEVEL.finditer(source, match.end())), len(source))
    return source[match.end() : end]


def _factories_in(source: bytes, classes: set[bytes]) -> set[bytes]:
    """Module-level functions whose body returns an app it creates (`x = Celery(...)` ... `return x`)."""
    makers = b"|".join(map(re.escape, sorted({b"Celery", *_ALIAS_RE.findall(source), *classes})))
    factories: set[bytes] = set()
    tops = [m.start() for m in _TOP_LEVEL.finditer(source)] + [len(source)]
    for match in _DEF_RE.finditer(source):
        end = next((t for t in tops if t > match.start()), len(source))
        body = source[match.end() : end]
        for made in re.finditer(rb"^[ \t]+(\w+)[ \t]*=[ \t]*(?:\w+\.)?(?:" + makers + rb")[ \t]*\(", body, re.M):
            if re.search(rb"^[ \t]+return[ \t]+" + re.escape(made.group(1)) + rb"\b", body, re.M):
                factories.add(match.group(1))
        if re.search(rb"^[ \t]+return[ \t]+(?:\w+\.)?(?:" + makers + rb")[ \t]*\(", body, re.M):
            factories.add(match.group(1))
    return factories


def scan(code_root: Path, seen: Seen | None) -> dict[str, bytes]:
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


class Index:
    """The modules under one import root, parsed on demand."""

    def __init__(self, root: Path, seen: Seen | None = None) -> None:
        self.root, self.seen = root, seen
        self.sources = scan(root, seen)
        self.rel_of = {module_name(rel): rel for rel in self.sources}
        # One pass over every module for the word Celery; the rest of a large tree is never looked at again
        # unless the project has a subclass or a factory, whose users need not name Celery.
        self._naming = [rel for rel, source in self.sources.items() if b"Celery" in source]
        classes: set[bytes] = set()
        for rel in self._naming:
            if b"class" in self.sources[rel]:
                classes |= _classes_in(self.sources[rel])
        factories: set[bytes] = set()
        for rel in self._using(frozenset(classes)):
            if b"def" in self.sources[rel]:
                factories |= _factories_in(self.sources[rel], classes)
        self.kinds = frozenset(sorted(classes | factories)[:MAX_KINDS])
        self._parsed: dict[str, Module] = {}

    def module(self, name: str) -> Module | None:
        rel = self.rel_of.get(name)
        if rel is None:
            return None
        if name not in self._parsed:
            source = self.sources[rel]
            if self.seen is not None:
                self.seen.file(os.path.join(self.root, rel))  # the answer rests on it
            self._parsed[name] = read_module(rel, source, self.kinds)
        return self._parsed[name]

    def creators(self) -> list[Module]:
        """Every module that creates an app at module level."""
        found = []
        for rel in self._using(self.kinds):
            module = self.module(module_name(rel))
            if module is not None and module.creates:
                found.append(module)
        return found

    def _using(self, kinds: frozenset[bytes]) -> list[str]:
        """The modules that name Celery or one of `kinds`, in the scan's order."""
        if not kinds:
            return self._naming
        return [rel for rel, source in self.sources.items() if b"Celery" in source or any(k in source for k in kinds)]

    def gives_app(self, value: str, depth: int = 0) -> str | None:
        """Why the -A value names an app under this root ("creates Celery('x')", "imports app from
        pkg.celery"), or None when its module gives Celery none."""
        module_part, _, attr = value.partition(":")
        target, wanted = module_part, attr or None
        if self.module(target) is None and not attr and "." in target:
            target, wanted = target.rsplit(".", 1)  # `proj.celery.app`: module proj.celery, attribute app
        module = self.module(target)
        if depth > 4:
            return None
        if module is None:  # an empty __init__.py is not read: its package may still hold celery.py
            inner = self.gives_app(f"{target}.celery", depth + 1) if wanted is None else None
            return f"{target}.celery {inner}" if inner is not None else None
        for name, call, _configured in module.creates:
            if wanted in (None, name):
                return f"creates {call}"
        for source, name, bound in module.names:
            known = wanted in (None, bound) and self.module(source) is not None and source != module.name
            if known and self.gives_app(f"{source}:{name}", depth + 1) is not None:
                return f"imports {name} from {source}"
        for name, function in module.calls:  # `app = create_app()` returning an app made elsewhere
            if wanted in (None, name):
                why = self._returned(module, function, depth)
                if why is not None:
                    return why
        if wanted is None and module.rel.endswith("__init__.py"):
            inner = self.gives_app(f"{module.name}.celery", depth + 1) if self.module(f"{module.name}.celery") else None
            if inner is not None:
                return f"{module.name}.celery {inner}"
        return None

    def _returned(self, module: Module, function: str, depth: int) -> str | None:
        """Why `function(...)` called in `module` returns an app: the name its body returns gives one."""
        home, name = module.name, function
        if "." in function:
            return None
        for source, imported, bound in module.names:
            if bound == function:
                home, name = source, imported
        target = self.module(home)
        body = _body(self.sources[target.rel], name) if target is not None else None
        if target is None or body is None:
            return None
        for returned in re.findall(rb"^[ \t]+return[ \t]+(\w+)[ \t]*$", body, re.M):
            if self.gives_app(f"{home}:{returned.decode()}", depth + 1) is not None:
                return f"calls {name}() from {home}, which returns its app"
        return None


def apps_below(root: Path, most: int = 3) -> list[tuple[str, str]]:
    """(folder, module file) for folders one or two levels down, out of any package, holding a package whose
    celery.py or celery_app.py creates an app (a repository's example projects): where to run from. Only
    names and small files are read."""
    found: list[tuple[str, str]] = []
    for first in _folders(root):
        for folder in [first, *_folders(first)]:
            for package in _folders(folder, packages=True):
                for name in ("celery.py", "celery_app.py"):
                    path = package / name
                    try:
                        if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_SOURCE_BYTES:
                            continue
                        if b"Celery(" in path.read_bytes():
                            found.append((os.path.relpath(folder, root), f"{package.name}/{name}"))
                            break
                    except OSError:
                        continue
                if len(found) >= most:
                    return found
    return found


def _folders(directory: Path, packages: bool = False) -> list[Path]:
    """Sub-folders worth a look: not hidden, not skipped, not symlinks; packages only, or no package."""
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError:
        return []
    chosen = []
    for entry in entries[:200]:
        if entry.name.startswith(".") or entry.name in SKIP_DIRS or not entry.is_dir(follow_symlinks=False):
            continue
        if os.path.isfile(os.path.join(entry.path, "__init__.py")) == packages:
            chosen.append(Path(entry.path))
    return chosen
