"""Find the project's Celery app from evidence, as a person would, from text alone (nothing is imported).

What the project says ranks over what its source happens to contain, and is checked against the source:
1. the `-A`/`--app` value the project's run files pass to `celery` (Procfile, compose, Dockerfile, systemd,
   supervisor, scripts, Makefile...), then its docs (README, *.md, *.rst) when no run file names one: a value
   counts only when its module gives Celery an app (appsource.py); one that does not is reported, not taken.
   The value is looked up where the command runs (`cd apps && celery`, compose `working_dir`, WORKDIR,
   systemd `WorkingDirectory`), then the file's own folder, the code root and the root: the folder it is
   found in is the app's import root, which the workers get on PYTHONPATH. An app only a subproject's own run
   file names (a monorepo) is refused, naming the folder to run from;
2. Django: manage.py names DJANGO_SETTINGS_MODULE, and the settings' package has a celery.py, a
   celery_app.py, or imports the app in its __init__ (Celery's documented Django layout);
3. a module that creates a Celery app at module level (`Celery(...)` under any alias, a subclass, a factory);
   a module that imports that app together with the task modules and defines no task itself (or starts it:
   `app.start()` under `__main__`) is what the project runs, and ranks first. The folder tlrun is run from
   (out of any package) is searched too: Celery puts it on sys.path.
Several different answers at the top rank are never a silent pick: a ConfigError lists each with its evidence.
Virtual environments, tests, caches, node_modules and .git are skipped, symlinks are never followed, and a
top-level module that would shadow a package tlrun imports (`celery.py`) is never a candidate.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from tlrun.errors import ConfigError
from tlrun.project import discocache, evidence
from tlrun.project.appsource import Index, apps_below
from tlrun.project.discocache import Seen
from tlrun.project.layout import ROOT_MARKERS, Source, inside_package

SUBPROJECT_MARKERS = ("pyproject.toml", "setup.py", "setup.cfg", "manage.py", "requirements.txt", "Pipfile")
MAX_LISTED = 12  # candidates listed in a refusal (the message stays within 20 lines)
PIN = 'pass -A/--app, set CELERY_APP in .env, or write `app = "..."` under [tool.tlrun] in pyproject.toml'


@dataclass(frozen=True)
class Candidate:
    app: str  # what -A takes: `pkg.module` or `pkg.module:attr`
    path: str  # relative to the project root
    evidence: str = ""  # why: `Procfile: celery -A x worker`, `creates Celery('x')`
    configured: bool = True  # False: a bare Celery() that a factory configures later (listed, never picked)
    import_root: str = ""  # the folder it imports from, relative to the project root ("": the code root)

    def describe(self) -> str:
        text = f"{self.app} ({self.path}: {self.evidence})" if self.evidence else f"{self.app} ({self.path})"
        return text + (f" [imported from {self.import_root}/]" if self.import_root else "")


@dataclass(frozen=True)
class Discovery:
    app: str
    found: str  # what was found, for the one line tlrun prints
    import_root: str = ""  # relative to the project root: the folder the app imports from, when not the code root
    warnings: tuple[str, ...] = field(default=())  # evidence that was read and not taken, and why


class _Indexes:
    """One source index per import root, made when first needed."""

    def __init__(self, seen: Seen | None) -> None:
        self.seen = seen
        self._by_root: dict[Path, Index] = {}

    def __call__(self, folder: Path) -> Index:
        if folder not in self._by_root:
            self._by_root[folder] = Index(folder, self.seen)
        return self._by_root[folder]


def _app_value(module: str, attr: str) -> str:
    # Celery's find_app looks for `app` (then `celery`) itself; any other name is spelled out.
    return module if attr == "app" else f"{module}:{attr}"


def _source_candidates(index: Index, shown: str, import_root: str = "") -> list[Candidate]:
    """Rank 3: the modules that create the app, or the ones that import it with its tasks (preferred)."""
    creators = index.creators()
    runners: list[Candidate] = []
    for creator in creators:
        attrs = {attr for attr, _call, _conf in creator.creates}
        needle = creator.name.rsplit(".", 1)[-1].encode()
        # Only a module that names the creator's module can import the app from there: the rest of a large
        # tree is never parsed.
        for rel, source in index.sources.items():
            if needle not in source or rel == creator.rel:
                continue
            module = index.module(_name_of(rel))
            if module is None or module.defines_tasks:
                continue  # a task module that imports other task modules is not what the project runs
            bound = [b for src, name, b in module.names if src == creator.name and name in attrs]
            if not bound:
                continue
            tasks = sorted(
                t
                for t in module.imports
                if t not in (creator.name, module.name) and (m := index.module(t)) is not None and m.defines_tasks
            )
            if tasks or module.launchable:
                why = f"imports {bound[0]} from {creator.name}" + (
                    f" and the task modules {', '.join(tasks[:3])}" if tasks else " and starts it"
                )
                path = os.path.join(shown, module.rel)
                runners.append(Candidate(_app_value(module.name, bound[0]), path, why, import_root=import_root))
    if runners:
        return sorted(set(runners), key=lambda c: c.path)
    ranked: list[tuple[tuple[bool, bool], Candidate]] = []
    for creator in creators:
        for attr, call, configured in creator.creates:
            why = f"creates {call}" + ("" if configured else ", unconfigured")
            why += ", starts it" if creator.launchable else ""
            rank = (creator.launchable, configured)
            path = os.path.join(shown, creator.rel)
            value = _app_value(creator.name, attr)
            ranked.append((rank, Candidate(value, path, why, configured, import_root)))
    if not ranked:
        return []
    top = max(rank for rank, _c in ranked)
    return sorted({c for rank, c in ranked if rank == top}, key=lambda c: c.path)


def _name_of(rel: str) -> str:
    from tlrun.project.appsource import module_name

    return module_name(rel)


def _django_candidate(root: Path, code_root: Path, indexes: _Indexes, seen: Seen | None) -> Candidate | None:
    """manage.py's settings package holds the app: celery.py, celery_app.py, or what its __init__ imports."""
    import re

    for base in dict.fromkeys((root, code_root)):
        manage = base / "manage.py"
        if seen is not None:
            seen.file(str(manage))
        try:
            if manage.is_symlink() or not manage.is_file():
                continue
            match = re.search(
                rb"""DJANGO_SETTINGS_MODULE['"]\s*,\s*['"]([A-Za-z_][\w.]*)['"]""", manage.read_bytes()[:524288]
            )
        except OSError:
            continue
        if match is None:
            continue
        package = match.group(1).decode().rsplit(".", 1)[0]
        if not package:
            continue
        named = f"named by {os.path.relpath(manage, root)}"
        celery_py = code_root.joinpath(*package.split("."), "celery.py")
        if seen is not None:
            seen.file(str(celery_py))
        if not celery_py.is_symlink() and celery_py.is_file():
            return Candidate(f"{package}.celery", os.path.relpath(celery_py, root), named)
        index = indexes(code_root)
        init = index.module(package)
        for value in (f"{package}.celery_app", *(f"{src}:{name}" for src, name, _b in (init.names if init else ()))):
            if index.module(value.partition(":")[0]) is not None and index.gives_app(value):
                module, _, attr = value.partition(":")
                rel = os.path.relpath(index.root / (index.rel_of[module]), root)
                return Candidate(_app_value(module, attr or "app"), rel, f"{named}, {package} imports it")
    return None


@dataclass(frozen=True)
class _Checked:
    said: evidence.Said
    folder: Path  # the import root its module was found in
    why: str | None  # how the module gives an app; None: it gives none
    explicit: bool  # the folder is the one the command runs in (cd, working_dir...)


def _workdirs(workdir: str, folder: Path, base: Path) -> list[Path]:
    """The project folders a command's working directory may be: relative to its file, or to the repository;
    an absolute path (a container's /app/apps) by its longest tail that exists here, else the root."""
    path = PurePosixPath(workdir)
    if path.is_absolute():
        parts = path.parts[1:]
        tails = [base.joinpath(*parts[k:]) for k in range(len(parts)) if parts[k:]]
        return [*(t for t in tails if ".." not in t.parts), base]
    if ".." in path.parts:
        return [p for p in ((folder / workdir).resolve(),) if p.is_relative_to(base)]
    return [folder / workdir, base / workdir]


def _check_said(root: Path, base: Path, code_root: Path, indexes: _Indexes, seen: Seen | None) -> list[_Checked]:
    """Each -A value the project's files say, with the import root its module is in and whether it gives an
    app; a value that names no module of the project is not evidence (a tutorial's `-A proj`)."""
    checked: list[_Checked] = []
    for said in evidence.read_said(base, seen):
        folder = base / said.folder
        roots = [(d, True) for d in (_workdirs(said.workdir, folder, base) if said.workdir else [])]
        roots += [(folder, False), (code_root, False), (root, False)]
        seen_roots: set[Path] = set()
        failed: _Checked | None = None
        for directory, explicit in roots:
            if directory in seen_roots or not directory.is_dir() or directory.is_symlink():
                continue
            seen_roots.add(directory)
            if not evidence.module_exists(directory, said.app, seen):
                continue
            why = indexes(directory).gives_app(said.app)
            if why is not None:
                checked.append(_Checked(said, directory, why, explicit))
                break
            failed = failed or _Checked(said, directory, None, explicit)
        else:
            if failed is not None:
                checked.append(failed)
    return checked


def _relative(folder: Path, root: Path) -> str:
    rel = os.path.relpath(folder, root)
    return "" if rel == "." else rel


def _evidence_base(root: Path) -> Path:
    """Where run files and docs are read from: the root, or the repository above a root that is one only for
    its manage.py (`src/manage.py`: the deploy files and docs above it say how the project runs)."""
    if any((root / m).exists() for m in ROOT_MARKERS if m != "manage.py"):
        return root
    for parent in list(root.parents)[:2]:
        if (parent / ".git").exists() or (parent / "pyproject.toml").is_file():
            return parent
    return root


def _refuse(header: str, candidates: list[Candidate], hint: str = PIN) -> ConfigError:
    lines = [f"  {c.describe()}" for c in candidates[:MAX_LISTED]]
    if len(candidates) > MAX_LISTED:
        lines.append(f"  ... and {len(candidates) - MAX_LISTED} more")
    return ConfigError("\n".join([header, *lines]), hint=hint)


def _from_said(checked: list[_Checked], root: Path, code_root: Path, cwd: Path | None) -> Discovery | None:
    """Rank 1: the one app the run files (else the docs) name and whose module gives one."""
    for kind in ("run", "docs"):
        groups: list[list[_Checked]] = []
        for item in checked:
            if item.said.kind != kind or item.why is None:
                continue
            for group in groups:
                if evidence.same_app(group[0].said.app, item.said.app) and group[0].folder == item.folder:
                    group.append(item)
                    break
            else:
                groups.append([item])
        candidates = []
        for group in groups:
            first = group[0]
            path, _, command = first.said.where.partition(": ")
            more = f" and {len(group) - 1} more" if len(group) > 1 else ""
            import_root = "" if first.folder in (code_root, root) else _relative(first.folder, root)
            candidates.append(Candidate(first.said.app, path, command + more, import_root=import_root))
        if len(candidates) > 1:
            raise _refuse(f"no Celery app given, and the project's files name {len(candidates)}:", candidates)
        if candidates:
            found, first = candidates[0], groups[0][0]
            inside = cwd is not None and cwd.is_relative_to(first.folder)
            subproject = any((first.folder / m).exists() for m in SUBPROJECT_MARKERS)
            if found.import_root and not first.explicit and subproject and not inside:
                raise ConfigError(
                    f"no Celery app given; the project's files name one in the subproject {found.import_root}/: "
                    f"{found.path}: {found.evidence}",
                    hint=f"run tlrun from {found.import_root} (cd {found.import_root}), or pass "
                    f"--project-dir {found.import_root}",
                )
            where = f" (imported from {found.import_root}/)" if found.import_root else ""
            return Discovery(found.app, f"{found.path}: {found.evidence}{where}", found.import_root)
    return None


def _run_folder(cwd: Path | None, root: Path, code_root: Path) -> Path | None:
    """The folder tlrun runs from, out of any package: Celery puts it on sys.path, so its packages can be
    the app; None when it is the root or the code root (searched anyway)."""
    if cwd is None or not cwd.is_relative_to(root):
        return None
    while cwd != root and inside_package(cwd):
        cwd = cwd.parent
    inside_code = code_root != root and cwd.is_relative_to(code_root)
    return None if cwd in (root, code_root) or inside_code else cwd


def discover_app(
    root: Path, source: Source | None = None, seen: Seen | None = None, cwd: Path | None = None
) -> Discovery:
    """The one Celery app of the project, or a ConfigError saying there is none, or listing several. What
    the answer rests on is recorded in `seen` (discocache.py); `cwd` is the folder tlrun runs from."""
    code_root = source.directory if source is not None else root
    shown = os.path.relpath(code_root, root) if code_root != root else ""
    indexes = _Indexes(seen)
    checked = _check_said(root, _evidence_base(root), code_root, indexes, seen)
    taken = _from_said(checked, root, code_root, cwd)
    if taken is not None:
        return taken
    warnings = tuple(
        f"{c.said.where} names {c.said.app}, whose module gives Celery no app: not taken"
        for c in checked
        if c.why is None
    )[:3]
    django = _django_candidate(root, code_root, indexes, seen)
    if django is not None:
        return Discovery(django.app, f"found {django.path}, {django.evidence}", warnings=warnings)
    candidates = _source_candidates(indexes(code_root), shown)
    run_folder = _run_folder(cwd, root, code_root)
    if run_folder is not None:
        rel = _relative(run_folder, root)
        candidates += _source_candidates(indexes(run_folder), rel, rel)
    if len(candidates) == 1 and candidates[0].configured:
        found = candidates[0]
        where = f" (imported from {found.import_root}/)" if found.import_root else ""
        return Discovery(found.app, f"found {found.path}: {found.evidence}{where}", found.import_root, warnings)
    if not candidates:
        rejected = [
            Candidate(
                c.said.app,
                c.said.where.split(": ", 1)[0],
                c.said.where.partition(": ")[2],
                True,
                _relative(c.folder, root),
            )
            for c in checked
        ]
        if rejected:
            raise _refuse(
                "no Celery app given; the project's files name modules that give Celery no app (not taken):",
                rejected,
            )
        hint = PIN
        below = apps_below(root)
        if below:
            where = "; ".join(f"{folder} ({module})" for folder, module in below)
            hint = f"an app is in {where}: run tlrun from there (Celery imports from the folder it runs in), or {PIN}"
        elif code_root == root and (root / "src").is_dir():
            hint = 'packages under src/? set source = "src" under [tool.tlrun] (tlrun init finds it); or ' + PIN
        elif inside_package(root):
            hint = f"{root} is a Python package: run tlrun from the project's root folder, or " + PIN
        raise ConfigError(f"no Celery app given, and none found in {code_root}", hint=hint)
    if len(candidates) == 1:
        raise ConfigError(
            f"no Celery app given; the only one found is unconfigured: {candidates[0].describe()}",
            hint="a factory configures it later: name the module the project starts; " + PIN,
        )
    raise _refuse(f"no Celery app given, and {len(candidates)} candidates in {code_root}:", candidates)


def discover_cached(root: Path, source: Source | None, runtime: Path | None, cwd: Path | None = None) -> Discovery:
    """discover_app, through the cache in the runtime directory (None, or TLRUN_NO_DISCOVERY_CACHE=1: no
    cache)."""
    code_root = source.directory if source is not None else root
    if runtime is None or os.environ.get(discocache.DISABLE_ENV) == "1":
        return discover_app(root, source, cwd=cwd)
    run_folder = _run_folder(cwd, root, code_root)
    path = discocache.cache_path(runtime, root, code_root, run_folder)
    cached = discocache.load(path, root, code_root)
    if cached is not None:
        return cached
    seen = Seen()
    found = discover_app(root, source, seen, cwd)
    discocache.store(path, root, code_root, found, seen)
    return found
