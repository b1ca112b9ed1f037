"""tlrun dev --reload on a Django project of realistic weight, and the spare's pre-imported base
(tlrun/launch/base.py): every kind of save reaches a task, a broken save keeps the old worker, a `pip install`
while it runs is picked up, and an installed module that looks for the project's makes the spares plain."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import signal
import subprocess
import textwrap
import zipfile
from pathlib import Path

import pytest

import djangosite
from helpers import PY, Launched, Project, send_task, wait_for
from test_dev import READY

pytestmark = pytest.mark.timeout(240)
RELOADED = r"reloaded: .* ready, swap took [\d.]+ s(?: \((\d+) installed modules imported before the save\))?"


def _reloads(launched: Launched) -> list[re.Match[str]]:
    return list(re.finditer(RELOADED, launched.output()))


def _save_and_wait(launched: Launched, save: object, url: str, task: str, wanted: object) -> re.Match[str]:
    """Save, wait for the next `reloaded:` line, and see the task return the new value at once."""
    before = len(_reloads(launched))
    assert callable(save)
    save()
    wait_for(lambda: len(_reloads(launched)) > before, 60, "the reload after the save")
    assert send_task(url, task).get(timeout=30) == wanted
    return _reloads(launched)[-1]


def _base_rows(project: Project) -> list[dict[str, object]]:
    ps = project.run("ps", "--json")
    assert ps.returncode == 0, ps.stderr
    return [row for row in json.loads(ps.stdout) if row["kind"] == "base"]


def test_a_django_project_reloads_tasks_models_and_settings_from_a_base_of_installed_modules(
    project: Project,
) -> None:
    pytest.importorskip("rest_framework")
    pytest.importorskip("django_celery_beat")
    root, url = project.root, project.broker_url
    djangosite.write_site(root, url)
    launched = project.launch("--reload", command="dev", app_arg=False)
    launched.wait_output(READY, 60)
    assert send_task(url, "catalog.tasks.value").get(timeout=30) == 1
    assert send_task(url, "catalog.tasks.fields").get(timeout=30)[:3] == ["amount", "data", "group"]
    # The role's spare, in `ps` as its base (no node yet): what the worker imported from outside the project.
    wait_for(lambda: len(_base_rows(project)) == 1, 60, "the role's base in ps")
    (base,) = _base_rows(project)
    assert base["node"] is None and base["launcher_pid"] == launched.pid and base["project"] is True
    assert base["role"] == "default" and base["name"] is None  # the role's, not a unit of its own
    assert isinstance(base["pss_bytes"], int) and base["pss_bytes"] > 0
    table = project.run("ps").stdout
    assert re.search(rf"^{base['pid']}\s+base\s+-\s+-\s", table, re.M), table

    task = _save_and_wait(launched, lambda: djangosite.save_task(root, 2), url, "catalog.tasks.value", 2)
    assert task.group(1) is not None and int(task.group(1)) > 300, task.group(0)  # Django, DRF, beat, Celery...
    assert "catalog/tasks.py changed" in task.group(0)
    _save_and_wait(launched, lambda: djangosite.save_model(root, 21), url, "orders.tasks.status_length", 21)
    _save_and_wait(launched, lambda: djangosite.save_settings(root, 7), url, "accounts.tasks.setting", 7)

    # A broken save: the worker that serves keeps the last good code; the next good save is served.
    failed = launched.output().count("reload failed")
    (root / "catalog" / "tasks.py").write_text("VALUE = (\n")
    wait_for(lambda: launched.output().count("reload failed") > failed, 60, "the failed reload")
    assert send_task(url, "catalog.tasks.value").get(timeout=30) == 2
    assert send_task(url, "accounts.tasks.setting").get(timeout=30) == 7
    _save_and_wait(launched, lambda: djangosite.save_task(root, 3), url, "catalog.tasks.value", 3)
    assert "warning: reload: spares" not in launched.output()

    launched.send(signal.SIGINT)
    assert launched.wait(60) == 0
    assert list(project.runtime.rglob("*.modules")) == []  # the launcher's lists of modules go with it


_EXTRA_APP = """
import os

import {package}
from celery import Celery

app = Celery("{name}")
app.conf.result_backend = os.environ.get("TEST_RESULT_BACKEND")
VALUE = {value}


@app.task(name="{name}.value")
def value():
    return VALUE


@app.task(name="{name}.package")
def package():
    return getattr({package}, "VERSION", None), getattr({package}, "FOUND", None)
"""


def _extra_site(project: Project) -> Path:
    """A site-packages of another environment, on the workers' path (PYTHONPATH): installed, as far as the
    base goes."""
    site = project.base / "extra" / "site-packages"
    site.mkdir(parents=True)
    return site


def _write_extra_app(project: Project, package: str, value: int) -> None:
    (project.root / f"{project.app}.py").write_text(
        textwrap.dedent(_EXTRA_APP).lstrip().format(name=project.app, package=package, value=value)
    )


def _wheel(project: Project, package: str, version: str) -> Path:
    """A pure-Python wheel of `package` at `version`, written as any build backend writes one."""
    files = {
        f"{package}/__init__.py": f'VERSION = "{version}"\n',
        f"{package}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n",
        f"{package}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: tlrun-tests\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = [
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
        f"{len(text.encode())}"
        for name, text in files.items()
    ]
    files[f"{package}-{version}.dist-info/RECORD"] = (
        "\n".join([*record, f"{package}-{version}.dist-info/RECORD,,"]) + "\n"
    )
    path = project.base / f"{package}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
    return path


def _pip_install(project: Project, site: Path, package: str, version: str) -> None:
    """A real `pip install --upgrade` of that wheel into the other environment's site-packages."""
    argv = [PY, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--upgrade", "--target", str(site)]
    done = subprocess.run([*argv, str(_wheel(project, package, version))], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_pip_install_while_dev_runs_is_picked_up_at_the_next_save(project: Project) -> None:
    site = _extra_site(project)
    package = f"tlver_{project.app[-6:]}"
    _pip_install(project, site, package, "1")
    _write_extra_app(project, package, 1)
    env = project.env(PYTHONPATH=str(site))
    launched = project.launch("--reload", command="dev", env=env)
    launched.wait_output(READY, 60)
    assert send_task(project.broker_url, f"{project.app}.package").get(timeout=30) == ["1", None]
    wait_for(lambda: len(_base_rows(project)) == 1, 60, "the role's base in ps")

    _pip_install(project, site, package, "2")
    _save_and_wait(
        launched, lambda: _write_extra_app(project, package, 2), project.broker_url, f"{project.app}.value", 2
    )
    assert send_task(project.broker_url, f"{project.app}.package").get(timeout=30) == ["2", None]
    assert "reload: installed packages changed: a fresh worker imports them" in launched.output()
    # The next spare's base is built from the new versions: the save after is served from it.
    wait_for(lambda: len(_base_rows(project)) == 1, 60, "the next base in ps")
    again = _save_and_wait(
        launched, lambda: _write_extra_app(project, package, 3), project.broker_url, f"{project.app}.value", 3
    )
    assert again.group(1) is not None
    assert send_task(project.broker_url, f"{project.app}.package").get(timeout=30) == ["2", None]
    assert launched.output().count("installed packages changed") == 1
    launched.send(signal.SIGINT)
    assert launched.wait(60) == 0


def test_an_installed_module_that_looks_for_the_projects_turns_the_base_off_once(project: Project) -> None:
    site = _extra_site(project)
    package = f"tlpeek_{project.app[-6:]}"
    local = f"{project.app}_local"
    # Like a library that reads an optional settings module of the project at import time.
    (site / f"{package}.py").write_text(
        f"try:\n    import {local}\n    FOUND = True\nexcept ImportError:\n    FOUND = False\n"
    )
    (project.root / f"{local}.py").write_text("")
    _write_extra_app(project, package, 1)
    launched = project.launch("--reload", command="dev", env=project.env(PYTHONPATH=str(site)))
    launched.wait_output(READY, 60)
    assert send_task(project.broker_url, f"{project.app}.package").get(timeout=30) == [None, True]
    wait_for(lambda: len(_base_rows(project)) == 1, 60, "the role's base in ps")

    first = _save_and_wait(
        launched, lambda: _write_extra_app(project, package, 2), project.broker_url, f"{project.app}.value", 2
    )
    assert first.group(1) is None  # a fresh worker took over, not the impure spare
    assert send_task(project.broker_url, f"{project.app}.package").get(timeout=30) == [None, True]
    warning = f"warning: reload: spares pre-import Celery only from now on: importing {package} (it looked for {local})"
    assert warning in launched.output()
    _save_and_wait(
        launched, lambda: _write_extra_app(project, package, 3), project.broker_url, f"{project.app}.value", 3
    )
    assert send_task(project.broker_url, f"{project.app}.package").get(timeout=30) == [None, True]
    assert launched.output().count("spares pre-import Celery only") == 1
    launched.send(signal.SIGINT)
    assert launched.wait(60) == 0


@pytest.mark.parametrize("pool", ["prefork", "threads", "solo"])
def test_every_pool_reloads_from_its_base_and_a_handler_of_worker_init_keeps_the_old_order(
    project: Project, pool: str
) -> None:
    """Each pool's spare builds its worker and starts its pool before `go`, beside the old worker; with a
    handler of the user's on worker_init it waits for `go` first (the handler may bind what the old one
    holds), and the reload is as right."""
    from test_dev import call, write_app

    write_app(project, 1)
    launched = project.launch("--reload", "--pool", pool, command="dev")
    launched.wait_output(READY, 60)
    wait_for(lambda: len(_base_rows(project)) == 1, 60, "the role's base in ps")
    first = _save_and_wait(launched, lambda: write_app(project, 2), project.broker_url, f"{project.app}.value", 2)
    assert first.group(1) is not None and int(first.group(1)) > 0
    hooked = project.root / f"{project.app}.py"
    (old,) = [row["pid"] for row in json.loads(project.run("ps", "--json").stdout) if row["kind"] == "worker"]
    (project.root / "old.txt").write_text(str(old))
    handler = (
        "\nfrom celery.signals import worker_init\n\n\n"
        "def _seen(**kw):\n"
        "    old = open(os.path.join(os.getcwd(), 'old.txt')).read()\n"
        "    with open(os.path.join(os.getcwd(), 'inits.txt'), 'a') as fh:\n"
        "        fh.write('alive ' if os.path.exists('/proc/' + old) else 'gone ')\n\n\n"
        "worker_init.connect(_seen, weak=False)\n"
    )

    def save_with_handler() -> None:
        write_app(project, 3)
        hooked.write_text(hooked.read_text() + handler)

    wait_for(lambda: len(_base_rows(project)) == 1, 60, "the next base in ps")
    _save_and_wait(launched, save_with_handler, project.broker_url, f"{project.app}.value", 3)
    assert (project.root / "inits.txt").read_text() == "gone "  # the user's handler ran once the old one was
    assert call(project, "value") == 3
    launched.send(signal.SIGINT)
    assert launched.wait(60) == 0


def test_beat_restarts_once_the_new_worker_answers_and_a_stopped_roles_base_goes_with_it(project: Project) -> None:
    """Beat's restart (its stop takes 0.3-0.5 s with Django) waits for no task: it follows the new worker's
    answer. `tlrun stop default` ends the role's base too: no save will take it."""
    from test_dev import write_app

    write_app(project, 1)
    launched = project.launch("--reload", "--beat", command="dev")
    launched.wait_output(READY, 60)
    wait_for(lambda: len(_base_rows(project)) == 1, 60, "the role's base in ps")
    beats = launched.output().count("starting beat")
    _save_and_wait(launched, lambda: write_app(project, 2), project.broker_url, f"{project.app}.value", 2)
    wait_for(lambda: launched.output().count("starting beat") > beats, 30, "beat's restart")
    output = launched.output()
    assert output.rindex("starting beat") > output.rindex("reloaded: ")
    wait_for(lambda: len(_base_rows(project)) == 1, 60, "the next base in ps")
    stop = project.run("stop", "default")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    wait_for(lambda: _base_rows(project) == [], 30, "the stopped role's base to go")
    assert [row["kind"] for row in json.loads(project.run("ps", "--json").stdout)] == ["beat"]
    launched.send(signal.SIGINT)
    assert launched.wait(60) == 0


def test_ctrl_c_while_a_spare_imports_its_base_stops_it_at_once(project: Project) -> None:
    """SIGTERM reaches a spare in the middle of its base's import (the shim raises SystemExit there, before
    Celery runs): it ends then, not after the 30 s grace period."""
    site = _extra_site(project)
    package = f"tlslow_{project.app[-6:]}"
    seen = project.base / "importing"
    seen.mkdir()
    (site / f"{package}.py").write_text(
        f"import os\nimport time\n\nopen(os.path.join({str(seen)!r}, str(os.getpid())), 'w').close()\ntime.sleep(8)\n"
    )
    _write_extra_app(project, package, 1)
    launched = project.launch("--reload", command="dev", env=project.env(PYTHONPATH=str(site)))
    launched.wait_output(READY, 60)
    wait_for(lambda: len(_base_rows(project)) == 1, 30, "the role's base in ps")
    spare = _base_rows(project)[0]["pid"]
    wait_for(lambda: (seen / str(spare)).exists(), 30, "the spare inside its base's 8 s import")
    launched.send(signal.SIGINT)
    assert launched.wait(15) == 0  # the grace period is 30 s
    assert "grace period over" not in launched.output()
