"""Discovery that is never wrong (issue 39): one fixture project per pattern that made zero-configuration
discovery pick a wrong app with exit 0, refuse without the truth, or find nothing, on real open-source
projects. Each is resolved as a command does (the root found from the folder it runs in, the code's folder,
the Procfile, the discovery cache) from the repository root, the folder the project runs Celery from, and a
deep subfolder; and the answer is imported as the worker would (the import root on PYTHONPATH, from the
project root) to prove it is a Celery app.

Every fixture is written by the test; no real project's files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import PY, Project
from test_layouts import _tree
from tlrun.config import load_settings
from tlrun.errors import ConfigError

pytestmark = pytest.mark.timeout(120)
BROKER = "redis://127.0.0.1:1/0"  # never connected to: the apps are only imported


def _app(name: str) -> str:
    return f"from celery import Celery\n\napp = Celery({name!r}, broker={BROKER!r})\n"


@pytest.fixture
def here(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Commands resolve from a folder; the cache lives in a runtime folder of the test's own."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    for key in ("CELERY_APP", "TLRUN_APP", "TLRUN_NO_DISCOVERY_CACHE"):
        monkeypatch.delenv(key, raising=False)
    yield


def _resolve(cwd: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path, Path, list[str]]:
    """(app, project root, the folder it imports from, warnings) as a command run in `cwd` has them."""
    monkeypatch.chdir(cwd)
    settings = load_settings({})
    warnings = [message for level, message in settings.notes if level == "warning"]
    return settings.app, settings.project_root, settings.code_root, warnings


def _imports_as_celery_app(root: Path, code_root: Path, app: str) -> None:
    """What the worker does: run in the project root, the code root first on PYTHONPATH, Celery's find_app."""
    probe = (
        "import sys; from celery import Celery; from celery.app.utils import find_app; "
        f"app = find_app({app!r}); print(type(app).__mro__[-3].__name__ if not isinstance(app, Celery) else 'ok')"
    )
    env = {**os.environ, "PYTHONPATH": str(code_root)}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=root, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout.strip() == "ok", (app, code_root, done.stderr[-800:])


def _walk(base: Path, folders: list[str], monkeypatch: pytest.MonkeyPatch, app: str, imports_from: str) -> list[str]:
    """From every folder: the same app, imported from the same folder; it imports as a Celery app."""
    warnings: list[str] = []
    for folder in folders:
        for _cached in (False, True):  # the first command, then one answered from the discovery cache
            got, root, code_root, said = _resolve(base / folder, monkeypatch)
            assert (got, code_root) == (app, base / imports_from), (folder, got, root, code_root)
            warnings += said
    _imports_as_celery_app(root, code_root, app)
    return warnings


# 1. A stale documentation line outranks the source -------------------------------------------------------
def test_a_doc_naming_a_module_that_is_no_app_is_reported_and_not_taken(
    tmp_path: Path, here: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = _tree(
        tmp_path / "stale",
        {
            ".git/HEAD": "ref: refs/heads/main\n",
            "pyproject.toml": "[project]\nname = 'stale'\n",
            "common/__init__.py": "import os\n",
            "common/util.py": "import os\n\n\ndef helper():\n    return 1\n",
            "common/README.md": "Start a worker:\n\n    celery -A common worker -l info\n",
            "shop/__init__.py": "",
            "shop/celery.py": _app("shop"),
            "shop/orders/__init__.py": "",
            "shop/orders/tasks.py": "from shop.celery import app\n\n\n@app.task\ndef order():\n    return 1\n",
        },
    )
    warnings = _walk(base, ["", "common", "shop/orders"], monkeypatch, "shop.celery", "")
    assert any("common/README.md" in w and "gives Celery no app: not taken" in w for w in warnings), warnings


# 2. The folder a project runs Celery from is its import root ---------------------------------------------
def test_the_working_directory_of_the_run_files_is_the_import_root(
    tmp_path: Path, here: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = _tree(
        tmp_path / "workdir",
        {
            ".git/HEAD": "ref: refs/heads/main\n",
            "docker-compose.yml": """
                services:
                  web:
                    command: gunicorn ops.wsgi
                    working_dir: /srv/app/apps
                  worker:
                    command: celery -A ops worker -l info
                    working_dir: /srv/app/apps
            """,
            "Makefile": "worker:\n\tcd apps && celery -A ops worker -l info\n",
            "apps/manage.py": "import os\nos.environ.setdefault('DJANGO_SETTINGS_MODULE', 'ops.settings')\n",
            "apps/ops/__init__.py": "from .celery import app as celery_app\n\n__all__ = ['celery_app']\n",
            "apps/ops/celery.py": _app("ops") + "app.autodiscover_tasks(['billing'])\n",
            "apps/ops/settings.py": "DEBUG = True\n",
            "apps/billing/__init__.py": "",
            "apps/billing/tasks.py": "from ops.celery import app\n\n\n@app.task\ndef bill():\n    return 1\n",
        },
    )
    # From the repository root the app imports from apps/ (what the compose file and the Makefile say).
    _walk(base, [""], monkeypatch, "ops", "apps")
    # From apps/ (its manage.py makes it the root) and a deep subfolder: the root itself.
    _walk(base, ["apps", "apps/billing"], monkeypatch, "ops", "apps")


def test_a_package_in_the_folder_celery_runs_from_is_the_app(
    tmp_path: Path, here: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Celery's own example projects: `celery -A proj worker` run in examples/next-steps of a repository."""
    base = _tree(
        tmp_path / "library",
        {
            ".git/HEAD": "ref: refs/heads/main\n",
            "pyproject.toml": "[project]\nname = 'library'\n",
            "library/__init__.py": "import os\n",
            "examples/next-steps/setup.py": "from setuptools import setup\n\nsetup(name='proj')\n",
            "examples/next-steps/proj/__init__.py": "",
            "examples/next-steps/proj/celery.py": _app("proj")[:-2] + ", include=['proj.tasks'])\n",
            "examples/next-steps/proj/tasks.py": "from .celery import app\n\n\n@app.task\ndef add(x):\n    return x\n",
        },
    )
    _walk(base, ["examples/next-steps", "examples/next-steps/proj"], monkeypatch, "proj.celery", "examples/next-steps")
    # From the repository root nothing says where to run from: no guess, but the hint names the folder.
    monkeypatch.chdir(base)
    with pytest.raises(ConfigError, match="none found") as info:
        load_settings({})
    assert "an app is in examples/next-steps (proj/celery.py): run tlrun from there" in (info.value.hint or "")


# 3. Task modules that import each other do not hide the app -----------------------------------------------
def test_task_modules_importing_each_other_are_not_what_the_project_runs(
    tmp_path: Path, here: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    tasks = (
        "from proj.celery_app import app\nfrom proj.{other}.tasks import {fn}\n\n\n@app.task\ndef {own}():\n    pass\n"
    )
    base = _tree(
        tmp_path / "mutual",
        {
            "pyproject.toml": "[project]\nname = 'mutual'\n",
            "proj/__init__.py": "",
            "proj/celery_app.py": _app("proj") + "app.autodiscover_tasks(['proj.billing', 'proj.orders'])\n",
            "proj/billing/__init__.py": "",
            "proj/billing/tasks.py": tasks.format(other="orders", fn="notify", own="charge"),
            "proj/orders/__init__.py": "",
            "proj/orders/tasks.py": tasks.format(other="billing", fn="charge", own="notify"),
        },
    )
    _walk(base, ["", "proj", "proj/billing"], monkeypatch, "proj.celery_app", "")


# 4. manage.py in a subfolder does not hide the repository's run files; Celery's Django layout -------------
def test_a_django_project_under_src_reads_the_deploy_files_above_it(
    tmp_path: Path, here: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = _tree(
        tmp_path / "djsrc",
        {
            ".git/HEAD": "ref: refs/heads/main\n",
            "README.md": "Workers:\n\n    celery -A pkg.celery_app worker -l info\n",
            "deploy/worker.service": "[Service]\nWorkingDirectory=/srv/app/src\n"
            "ExecStart=/srv/venv/bin/celery -A pkg.celery_app worker\n",
            "src/manage.py": "import os\nos.environ.setdefault('DJANGO_SETTINGS_MODULE', 'pkg.settings')\n",
            "src/pkg/__init__.py": "from .celery_app import app as celery_app\n",
            "src/pkg/celery_app.py": _app("pkg"),
            "src/pkg/settings.py": "DEBUG = True\n",
            "src/orders/__init__.py": "",
            "src/orders/tasks.py": "from celery import shared_task\n\n\n@shared_task\ndef order():\n    return 1\n",
            "src/legacy/__init__.py": "",
            "src/legacy/old_celery.py": _app("legacy"),  # a second app in the source: text alone cannot choose
        },
    )
    _walk(base, ["", "src", "src/orders"], monkeypatch, "pkg.celery_app", "src")
    # Without any run file or doc: the module the settings package's __init__ imports the app from.
    for name in ("README.md", "deploy/worker.service"):
        (base / name).unlink()
    _walk(base, ["src", "src/orders"], monkeypatch, "pkg.celery_app", "src")


# 5. Apps made by a subclass, a factory, or named through a shell variable ---------------------------------
@pytest.mark.parametrize("way", ["subclass", "factory", "variable"])
def test_apps_from_a_subclass_a_factory_or_a_variable(
    tmp_path: Path, here: None, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    files = {"pyproject.toml": "[project]\nname = 'made'\n", "svc/__init__.py": "", "svc/jobs/__init__.py": ""}
    if way == "subclass":
        files["core/__init__.py"] = ""
        files["core/base.py"] = "from celery import Celery\n\n\nclass MyCelery(Celery):\n    task_cls = 'celery:Task'\n"
        files["svc/worker.py"] = f"from core.base import MyCelery\n\napp = MyCelery('svc', broker={BROKER!r})\n"
        want = "svc.worker"
    elif way == "factory":
        files["factory.py"] = (
            "import celery\n\n\ndef create_application(name):\n"
            f"    application = celery.Celery(name, broker={BROKER!r})\n"
            "    application.conf.task_acks_late = True\n    return application\n"
        )
        files["svc/worker.py"] = "from factory import create_application\n\napp = create_application('svc')\n"
        want = "svc.worker"
    else:
        files["svc/worker.py"] = _app("svc")
        files["other/__init__.py"] = ""
        files["other/worker.py"] = _app("other")  # a second app: the source alone cannot choose
        files["scripts/worker.sh"] = "#!/bin/sh\nexec celery -A ${CELERY_APP_NAME}.worker worker -l info\n"
        files["docker-compose.yml"] = "services:\n  worker:\n    environment:\n      CELERY_APP_NAME: svc\n"
        want = "svc.worker"
    base = _tree(tmp_path / way, files)
    _walk(base, ["", "svc/jobs"], monkeypatch, want, "")


# 6. A monorepo root names the folder to run from ---------------------------------------------------------
def test_a_monorepo_root_says_which_folder_to_run_from(
    tmp_path: Path, here: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = _tree(
        tmp_path / "mono",
        {
            ".git/HEAD": "ref: refs/heads/main\n",
            "apps/web/package.json": "{}\n",
            "apps/api/pyproject.toml": "[project]\nname = 'web-api'\n",
            "apps/api/Procfile": "worker: celery -A web_api worker -l info\n",
            "apps/api/web_api/__init__.py": "from .celery import app\n",
            "apps/api/web_api/celery.py": _app("web_api"),
            "apps/api/web_api/sub/__init__.py": "",
        },
    )
    monkeypatch.chdir(base)
    with pytest.raises(ConfigError) as info:
        load_settings({})
    assert "subproject apps/api/" in str(info.value) and "apps/api/Procfile" in str(info.value)
    assert "--project-dir apps/api" in (info.value.hint or "")
    _walk(base, ["apps/api", "apps/api/web_api/sub"], monkeypatch, "web_api", "apps/api")


# 7. init: never an app that is not one, never an internal error on a Django project ------------------------
def _init(project: Project, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in project.env().items() if k not in ("CELERY_APP", "DJANGO_SETTINGS_MODULE")}
    return subprocess.run(
        [PY, "-m", "tlrun", "init", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_init_never_writes_a_module_that_is_no_app(project: Project) -> None:
    base = _tree(
        project.base / f"stale-{uuid.uuid4().hex[:6]}",
        {
            "pyproject.toml": "[project]\nname = 'stale'\n",
            "common/__init__.py": "import os\n",
            "common/README.md": "    celery -A common worker\n",
            "shop/__init__.py": "",
            "shop/celery.py": _app("shop"),
        },
    )
    refused = _init(project, base, "-A", "common")
    assert refused.returncode == 3, refused.stderr
    assert "has no attribute" in refused.stderr and "not written" in refused.stderr
    assert "tool" not in (base / "pyproject.toml").read_text()
    done = _init(project, base)
    assert done.returncode == 0, done.stderr
    assert 'app = "shop.celery"' in (base / "pyproject.toml").read_text()
    assert "common/README.md" in done.stderr and "not taken" in done.stderr


DJANGO_FILES = {
    "manage.py": "import os\nos.environ.setdefault('DJANGO_SETTINGS_MODULE', 'config.settings')\n",
    "config/__init__.py": "from .celery_app import app as celery_app\n\n__all__ = ('celery_app',)\n",
    "config/celery_app.py": """
        import os

        from celery import Celery

        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
        app = Celery("config")
        app.config_from_object("django.conf:settings", namespace="CELERY")
        app.autodiscover_tasks()
    """,
    "config/settings.py": """
        import os

        from django.core.exceptions import ImproperlyConfigured

        if "POSTGRES_DB" not in os.environ:
            raise ImproperlyConfigured("Set the POSTGRES_DB environment variable")
        SECRET_KEY = "x"
        INSTALLED_APPS = ["django.contrib.contenttypes"]
        CELERY_TASK_ROUTES = {"orders.*": {"queue": "orders"}}
    """,
}


def test_init_on_a_django_project_whose_settings_need_the_environment(project: Project) -> None:
    base = _tree(project.base / f"cookie-{uuid.uuid4().hex[:6]}", dict(DJANGO_FILES))
    done = _init(project, base)
    assert done.returncode == 0, done.stderr
    assert "ImproperlyConfigured: Set the POSTGRES_DB environment variable" in done.stderr
    text = (base / "pyproject.toml").read_text()
    assert 'app = "config.celery_app"' in text and "[tool.tlrun.workers" in text
    assert "internal error" not in done.stderr


def test_init_where_django_is_missing_from_tlruns_environment(project: Project) -> None:
    """tlrun installed apart from the project (pipx): `import django` fails in tlrun's process, as Python has
    it for an absent package (None in sys.modules); the CLI runs as its console script does."""
    base = _tree(project.base / f"nodj-{uuid.uuid4().hex[:6]}", {**DJANGO_FILES, "config/settings.py": "X = 1\n"})
    runner = "import sys; sys.modules['django'] = None; from tlrun.cli import main; sys.argv[0] = 'tlrun'; main()"
    env = {k: v for k, v in project.env().items() if k not in ("CELERY_APP", "DJANGO_SETTINGS_MODULE")}
    done = subprocess.run(
        [PY, "-c", runner, "init"], cwd=base, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "Django" in done.stderr and "wrote a single default role" in done.stderr, done.stderr
    text = (base / "pyproject.toml").read_text()
    assert 'app = "config.celery_app"' in text and "[tool.tlrun.workers.default]" in text


# 8. A root Procfile's -A is said, and checked like any other evidence --------------------------------------
def test_a_root_procfile_app_is_said_and_checked(project: Project) -> None:
    base = _tree(
        project.base / f"procfile-{uuid.uuid4().hex[:6]}",
        {
            "pyproject.toml": "[project]\nname = 'procfile'\n",
            "Procfile": "web: python -m http.server $PORT\nworker: celery -A shop worker -l info\n",
            "shop/__init__.py": "",
            "shop/celery.py": _app("shop"),
        },
    )
    env = {k: v for k, v in project.env().items() if k != "CELERY_APP"}
    ps = subprocess.run(
        [PY, "-m", "tlrun", "ps", "--json"], cwd=base, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert ps.returncode == 0 and json.loads(ps.stdout) == [], ps.stderr
    assert "using app shop (Procfile" in ps.stderr
    # A Procfile naming a module that gives no app is not taken: the source's app is, with a warning.
    _tree(base, {"Procfile": "worker: celery -A common worker\n", "common/__init__.py": "import os\n"})
    ps = subprocess.run(
        [PY, "-m", "tlrun", "ps", "--json"], cwd=base, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert ps.returncode == 0, ps.stderr
    assert "using app shop.celery" in ps.stderr and "names common, whose module gives Celery no app" in ps.stderr


def test_a_worker_started_from_the_repository_root_imports_from_the_run_files_folder(project: Project) -> None:
    """The user's path end to end: `tlrun worker` with no app named, in a repository whose compose file runs
    Celery in apps/: the worker gets apps/ on its path, answers pings, and runs a task of a sibling package."""
    import re

    from helpers import ping_replies, send_task, wait_for
    from test_layouts import _stop

    ops = f"ops_{uuid.uuid4().hex[:8]}"
    base = _tree(
        project.base / f"wd-{uuid.uuid4().hex[:6]}",
        {
            ".git/HEAD": "ref: refs/heads/main\n",
            "docker-compose.yml": "services:\n  worker:\n    working_dir: /app/apps\n"
            f"    command: celery -A {ops} worker\n",
            f"apps/{ops}/__init__.py": "from .celery import app as celery_app\n",
            f"apps/{ops}/celery.py": f"""
                import os

                from celery import Celery

                app = Celery("{ops}", include=["billing.tasks"])
                app.conf.result_backend = os.environ.get("TEST_RESULT_BACKEND")
                app.conf.broker_connection_retry_on_startup = True
            """,
            "apps/billing/__init__.py": "",
            "apps/billing/tasks.py": f"from {ops}.celery import app\n\n\n@app.task\ndef bill():\n    return 42\n",
        },
    )
    out = project.base / f"{ops}.txt"
    env = {k: v for k, v in project.env().items() if k != "CELERY_APP"}
    with out.open("w") as fh:
        worker = subprocess.Popen(
            [PY, "-m", "tlrun", "worker", "--", "--without-mingle", "--without-gossip"],
            cwd=base,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: re.search(r"tlrun: \d+ workers? ready: ", out.read_text()), 60, "the worker to be ready")
        assert f"using app {ops} (docker-compose.yml: `celery -A {ops} worker` (imported from apps/)" in out.read_text()
        assert len(ping_replies(project.broker_url)) == 1
        assert send_task(project.broker_url, "billing.tasks.bill").get(timeout=30) == 42
    finally:
        _stop(worker)
    assert worker.returncode == 0, out.read_text()[-2000:]


def test_init_writes_the_import_root_as_source_and_reads_the_routes_there(project: Project) -> None:
    """`tlrun init` at the root of a repository whose compose file runs Celery in apps/: the app imports from
    apps/ (init imports it to read its routes), and the table pins both the app and `source = "apps"`."""
    ops = f"ops_{uuid.uuid4().hex[:8]}"
    base = _tree(
        project.base / f"initwd-{uuid.uuid4().hex[:6]}",
        {
            ".git/HEAD": "ref: refs/heads/main\n",
            "docker-compose.yml": "services:\n  worker:\n    working_dir: /app/apps\n"
            f"    command: celery -A {ops} worker\n",
            f"apps/{ops}/__init__.py": "from .celery import app as celery_app\n",
            f"apps/{ops}/celery.py": f"from celery import Celery\n\napp = Celery('{ops}', include=['billing.tasks'])\n"
            "app.conf.task_routes = {'billing.*': {'queue': 'billing'}}\n",
            "apps/billing/__init__.py": "",
            "apps/billing/tasks.py": f"from {ops}.celery import app\n\n\n@app.task\ndef bill():\n    return 1\n",
        },
    )
    done = _init(project, base)
    assert done.returncode == 0, done.stderr
    import tomllib

    table = tomllib.loads((base / "pyproject.toml").read_text())["tool"]["tlrun"]
    assert (table["app"], table["source"]) == (ops, "apps"), table
    assert table["workers"]["billing"]["queues"] == ["billing"], table
