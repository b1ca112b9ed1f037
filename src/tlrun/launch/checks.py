"""What the launch path checks before anything is stopped or started, and how a failed start is explained."""

from __future__ import annotations

import itertools
import re
import sys

from tlrun.config import Settings
from tlrun.errors import AppImportError, BrokerError, ConfigError, UsageError, WorkerStartError


def celery_version() -> tuple[int, ...]:
    """The installed Celery's version, without importing Celery; a ConfigError when there is none.

    Read from the `__version__` line of its package (one small file); importlib.metadata, which scans every
    distribution on sys.path, only when that line is not there (it costs the launcher 12-30 ms of CPU)."""
    import importlib.util

    spec = importlib.util.find_spec("celery")
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"Celery is not installed in {sys.prefix}, the environment tlrun runs in",
            hint=f"install it there, with your broker's extra: {sys.executable} -m pip install 'celery[redis]'",
        )
    try:
        with open(spec.origin, encoding="utf-8") as fh:
            found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", fh.read(8192), re.MULTILINE)
    except (OSError, ValueError):
        found = None
    installed = found.group(1) if found else _distribution_version()
    parts = []
    for piece in installed.split(".")[:3]:
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        parts.append(int(digits or 0))
    return tuple(parts)


def _distribution_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("celery")
    except PackageNotFoundError:
        return "0"


_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def missing_attribute(app: str) -> str | None:
    """When Celery says the app's module "was not found" although it exists: what is missing is the name in
    it (`proj.celery_app:ap`, `proj.ap`). None when the module itself is missing (Celery said it right)."""
    import importlib.util

    module, _, name = app.partition(":")
    if not name:
        module, _, name = app.rpartition(".")
    if not module or not name:
        return None
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return f"module {module!r} has no attribute {name!r}" if found else None


def start_failure(app: str, ready_timeout: float, status: int | None, tail: list[str], timeout: bool) -> Exception:
    """Turn a worker that never answered into the error that explains it."""
    text = "\n".join(tail)
    if (
        status == 2
        and "Unable to load celery application" not in text
        and ("No such option" in text or "Usage:" in text)
    ):
        # Celery's command line refused an argument tlrun passed through (`tlrun worker -- --bogus`).
        reason = next((ln.strip() for ln in reversed(tail) if ln.strip().startswith("Error:")), "a bad argument")
        return UsageError(f"celery worker refused its arguments: {reason.removeprefix('Error: ')}")
    if "Unable to load celery application" in text or (status == 2 and "Error" in text):
        reason = next(
            (ln.strip() for ln in reversed(tail) if ln.strip() and not ln.startswith(("Usage:", "Try "))),
            "unknown error",
        )
        if "was not found" in reason:  # Celery says so for a missing attribute as for a missing module
            missing = missing_attribute(app)
            if missing is not None:
                return AppImportError(
                    f"app {app!r} does not import: {missing}",
                    hint="-A module:name names the Celery() object in the module (a typo in the name?)",
                )
        # The innermost frame of the traceback that is not Python's own import machinery: the user's line.
        frames = [m.groups() for m in _FRAME.finditer(text) if "<frozen" not in m.group(1)]
        where = f" ({frames[-1][0]}, line {frames[-1][1]})" if frames else ""
        return AppImportError(f"app {app!r} does not import: {reason}{where}", details=tuple(tail))
    if timeout:
        return WorkerStartError(
            f"the worker did not answer a ping within {ready_timeout:g} s",
            hint="raise --ready-timeout, or read the log: " + (tail[-1] if tail else "(empty)"),
        )
    return WorkerStartError(f"the worker exited with status {status} before it answered a ping")


def check_app_module(settings: Settings) -> None:
    """The app's top-level module exists where the worker will look (the project root, then sys.path).
    Nothing is imported or run: a package's code runs only in the worker (or when the broker comes from it)."""
    import importlib.util

    top = settings.app.split(":", 1)[0].split(".", 1)[0]
    for folder in reversed(settings.import_path):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        where = " or ".join(map(str, settings.import_path))
        raise AppImportError(
            f"app {settings.app!r} does not import: no module named {top!r} in {where}", hint=app_hint(settings)
        )


def app_hint(settings: Settings) -> str:
    """What to try when the app's module is not found: the right way round for the layout tlrun saw."""
    if settings.source_dir is None:
        return 'packages under src/? set source = "src" under [tool.tlrun]; or pass --project-dir'
    looked = f"tlrun looked in {settings.source_dir.name}/ and the root"
    return f"check the app's module name, or pass --project-dir ({looked})"


UNSHAREABLE_SCHEMES = ("memory",)


def refuse_unshareable(url: str) -> None:
    """A broker that lives inside one process cannot be shared by a launcher and its worker."""
    scheme = url.split("://", 1)[0].split("+")[-1].lower()
    if scheme in UNSHAREABLE_SCHEMES:
        raise BrokerError(
            f"broker {scheme}:// lives inside one process: the worker and tlrun cannot share it",
            hint="use a Redis or RabbitMQ URL (tlrun dev starts a private redis-server when none answers)",
        )
