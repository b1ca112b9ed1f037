"""How the app is configured, read as text (nothing imported): Django settings or app.conf, a database
scheduler for beat, queues named in Django-namespaced settings. init and doctor use it where importing the
app is not possible or not wanted, and to write advice in the dialect the project uses.
"""

from __future__ import annotations

import ast
import os
import re
from dataclasses import dataclass
from pathlib import Path

MAX_BYTES = 512 * 1024
_SETTINGS_RE = re.compile(r"""DJANGO_SETTINGS_MODULE['"]\s*,\s*['"]([A-Za-z_][\w.]*)['"]""")
_CONFIG_FROM = re.compile(
    r"""\.config_from_object\(\s*['"]([^'"]+)['"](?:[^)]*?namespace\s*=\s*['"](\w+)['"])?""", re.S
)
_DB_SCHEDULER = re.compile(r"""(?:CELERY_BEAT_SCHEDULER|beat_scheduler)\s*[=:]\s*['"]([\w.:]+)['"]""")
_DEFAULT_SCHEDULERS = ("celery.beat:PersistentScheduler", "celery.beat.PersistentScheduler")
_QUEUE_CALL = re.compile(r"""Queue\(\s*['"]([^'"]+)['"]""")


def _read(path: Path) -> str:
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_BYTES:
            return ""
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _module_file(code_root: Path, module: str) -> Path | None:
    base = code_root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def django_settings(root: Path, code_root: Path) -> Path | None:
    """The settings module manage.py names (root or code root), when it is a file of the project."""
    for base in dict.fromkeys((root, code_root)):
        match = _SETTINGS_RE.search(_read(base / "manage.py"))
        if match:
            return _module_file(code_root, match.group(1))
    return None


@dataclass(frozen=True)
class Dialect:
    """Where a Celery setting of this app is written: `app.conf` keys, a config module's lowercase names, or
    Django settings with the namespace's prefix (`CELERY_TASK_ACKS_LATE`)."""

    kind: str  # "conf", "module" or "django"
    where: str = "app.conf.update(...)"  # the file or object the user edits
    namespace: str = ""

    def key(self, setting: str) -> str:
        if self.kind == "django":
            prefix = f"{self.namespace}_" if self.namespace else ""
            return f"{prefix}{setting}".upper()
        return setting

    def assign(self, setting: str, value: str) -> str:
        """`CELERY_TASK_ACKS_LATE = True` in settings.py, or `task_acks_late=True` in app.conf.update(...)."""
        if self.kind == "conf":
            return f"{setting}={value} in app.conf.update(...)"
        return f"{self.key(setting)} = {value} in {self.where}"


def dialect(root: Path, code_root: Path, app: str) -> Dialect:
    """How the app module (the -A value's module, or its package's celery.py) loads its configuration."""
    module = app.partition(":")[0]
    files = [_module_file(code_root, module), _module_file(code_root, f"{module}.celery")]
    for path in files:
        if path is None:
            continue
        match = _CONFIG_FROM.search(_read(path))
        if match is None:
            continue
        source, namespace = match.group(1), match.group(2) or ""
        if source.startswith("django.conf"):
            settings = django_settings(root, code_root)
            where = os.path.relpath(settings, root) if settings is not None else "your Django settings"
            return Dialect("django", where, namespace)
        return Dialect("module", f"{source.replace('.', '/')}.py", namespace)
    return Dialect("conf")


def beat_evidence(root: Path, code_root: Path, app: str) -> str | None:
    """Why the project runs beat even with an empty beat_schedule: django-celery-beat installed, or a
    scheduler of its own (a database or Redis scheduler) named in the settings or the app module."""
    texts = []
    settings = django_settings(root, code_root)
    if settings is not None:
        texts.append((os.path.relpath(settings, root), _read(settings)))
    for module in (app.partition(":")[0], f"{app.partition(':')[0]}.celery"):
        path = _module_file(code_root, module)
        if path is not None:
            texts.append((os.path.relpath(path, root), _read(path)))
    for rel, text in texts:
        if re.search(r"""['"]django_celery_beat['"]""", text):
            return f"django_celery_beat in {rel}"
        match = _DB_SCHEDULER.search(text)
        if match and match.group(1) not in _DEFAULT_SCHEDULERS:
            return f"scheduler {match.group(1)} in {rel}"
    return None


def namespaced_queues(root: Path, code_root: Path) -> tuple[str | None, list[str]]:
    """(default queue, other queues) from CELERY_TASK_DEFAULT_QUEUE, CELERY_TASK_ROUTES and
    CELERY_TASK_QUEUES in the Django settings, read as literals."""
    settings = django_settings(root, code_root)
    if settings is None:
        return None, []
    try:
        tree = ast.parse(_read(settings))
    except (SyntaxError, ValueError):
        return None, []
    default, queues = None, []
    for node in tree.body:
        if not isinstance(node, ast.Assign) or len(node.targets) != 1 or not isinstance(node.targets[0], ast.Name):
            continue
        name = node.targets[0].id
        if name == "CELERY_TASK_DEFAULT_QUEUE" and isinstance(node.value, ast.Constant):
            default = str(node.value.value)
        elif name == "CELERY_TASK_ROUTES":
            try:
                routes = ast.literal_eval(node.value)
            except ValueError:
                continue
            for target in routes.values() if isinstance(routes, dict) else ():
                queue = target.get("queue") if isinstance(target, dict) else target
                if isinstance(queue, str):
                    queues.append(queue)
        elif name == "CELERY_TASK_QUEUES":
            queues += _QUEUE_CALL.findall(ast.get_source_segment(_read(settings), node.value) or "")
    return default, queues
