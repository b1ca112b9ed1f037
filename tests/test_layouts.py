"""Every real project layout: the app the project itself starts, from any folder, src/ layouts, a project file
kept in place, and tlrun installed outside the project's environment.

Every fixture project here is written by the test (no real project's files): one per pattern that real
projects use and that once made tlrun pick the wrong app, or none."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import textwrap
import uuid
from pathlib import Path

import pytest
import tomllib

from helpers import PY, Project, ping_replies, wait_for
from tlrun.errors import ConfigError
from tlrun.project.discover import discover_app
from tlrun.project.evidence import said_in
from tlrun.project.layout import find_root, find_source

pytestmark = pytest.mark.timeout(120)
HOST = socket.gethostname()
READY = r"tlrun: \d+ workers? ready: "


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return root


# -- discovery from evidence (text only) ------------------------------------------------------------------
CONFIG_AND_RUNNER = {
    "config.py": """
        from celery import Celery

        app = Celery("myapp", broker="redis://127.0.0.1:1/0")
    """,
    "myapp.py": """
        from config import app
        import tasks
        import reports
    """,
    "tasks.py": """
        from config import app


        @app.task
        def add(x, y):
            return x + y
    """,
    "reports.py": """
        from config import app


        @app.task
        def report():
            return 1
    """,
}


def test_the_module_the_docs_start_wins_over_the_module_that_creates_the_app(tmp_path: Path) -> None:
    docs = {"README.md": "Run it:\n\n```\ncelery -A myapp worker -l info\n```\n"}
    root = _tree(tmp_path / "docs", {**CONFIG_AND_RUNNER, **docs})
    found = discover_app(root)
    assert found.app == "myapp" and found.found == "README.md: `celery -A myapp worker -l info`"
    # Without the docs, the module that imports the app and the task modules is what the project runs.
    bare = _tree(tmp_path / "nodocs", CONFIG_AND_RUNNER)
    found = discover_app(bare)
    assert found.app == "myapp" and "imports app from config and the task modules reports, tasks" in found.found


def test_an_unconfigured_bare_app_is_never_picked_silently(tmp_path: Path) -> None:
    files = {
        "pkg/__init__.py": "",
        "pkg/extensions.py": "from celery import Celery\n\ncelery = Celery()\n",
        "pkg/factory.py": "from pkg.extensions import celery\n\ndef create_app():\n    celery.conf.update(x=1)\n"
        "    return celery\n",
        "pkg/tasks/__init__.py": "",
        "pkg/tasks/celery_app.py": "from pkg.factory import create_app\n\napp = create_app()\n",
    }
    root = _tree(tmp_path / "bare", files)
    with pytest.raises(ConfigError, match=r"the only one found is unconfigured: pkg\.extensions:celery .*unconfigured"):
        discover_app(root)
    # What the project's Procfile starts is taken instead.
    _tree(root, {"Procfile": "worker: celery -A pkg.tasks.celery_app:app worker --loglevel=info\n"})
    found = discover_app(root)
    assert found.app == "pkg.tasks.celery_app:app" and found.found.startswith("Procfile: `celery -A pkg.tasks")


def test_a_bare_app_beside_the_configured_one_loses_to_it(tmp_path: Path) -> None:
    files = {
        "pkg/__init__.py": "",
        "pkg/extensions.py": "from celery import Celery\n\ncelery = Celery()\n",
        "pkg/worker.py": "from celery import Celery\n\napp = Celery('pkg', broker='redis://127.0.0.1:1/0')\n",
    }
    found = discover_app(_tree(tmp_path / "two", files))
    assert (found.app, found.found) == (
        "pkg.worker",
        "found pkg/worker.py: creates Celery('pkg', ...)",
    )


@pytest.mark.parametrize(
    "line",
    [
        'app = Celery[DjangoTask[..., Any]]("name")',
        'app: "Celery[Task]" = Celery[Task]("name")',
        'app = celery.Celery("name")',
        'app = C("name")',
    ],
)
def test_every_way_of_writing_the_app_is_found(tmp_path: Path, line: str) -> None:
    header = "import celery\nfrom celery import Celery as C\nfrom typing import Any\n\n"
    root = _tree(tmp_path / "w", {"proj/__init__.py": "", "proj/worker.py": header + line + "\n"})
    assert discover_app(root).app == "proj.worker"


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("Procfile", "web: gunicorn x\nworker: celery --app=shop.celery worker -l info\n"),
        ("docker-compose.yml", 'services:\n  worker:\n    command: ["celery", "-A", "shop.celery", "worker"]\n'),
        ("Makefile", "worker:\n\tuv run celery -A shop worker --loglevel INFO\n"),
        ("justfile", "worker:\n    celery -Ashop.celery worker\n"),
        ("deploy/worker.service", "[Service]\nExecStart=/srv/venv/bin/celery -A shop.celery worker\n"),
        ("scripts/run.sh", "#!/bin/sh\ncd src && exec python -m celery --app shop beat\n"),
        ("pyproject.toml", '[tool.poe.tasks]\nworker = "celery -A shop.celery worker"\n'),
    ],
)
def test_run_files_name_the_app(tmp_path: Path, name: str, text: str) -> None:
    files = {
        "shop/__init__.py": "",
        "shop/celery.py": "from celery import Celery\n\napp = Celery('shop')\n",
        "other.py": "from celery import Celery\n\napp = Celery('other')\n",  # a second app: no evidence
        name: text,
    }
    found = discover_app(_tree(tmp_path / "r", files))
    assert found.app.startswith("shop") and found.found.startswith(f"{name}: `")


def test_conflicting_evidence_lists_each_candidate_with_where_it_is_said(tmp_path: Path) -> None:
    files = {
        "alpha.py": "from celery import Celery\n\napp = Celery('alpha')\n",
        "beta.py": "from celery import Celery\n\napp = Celery('beta')\n",
        "Procfile": "worker: celery -A alpha worker\n",
        "Makefile": "run:\n\tcelery -A beta worker\n",
        # A tutorial's app that is not a module of this project is not evidence.
        "docs/tutorial.md": "    celery -A proj worker\n",
    }
    with pytest.raises(ConfigError) as info:
        discover_app(_tree(tmp_path / "c", files))
    message = str(info.value)
    assert "the project's files name 2:" in message
    assert "alpha (Procfile: `celery -A alpha worker`)" in message
    assert "beta (Makefile: `celery -A beta worker`)" in message
    assert "tutorial" not in message


def test_celery_py_at_the_top_and_test_folders_are_never_candidates(tmp_path: Path) -> None:
    files = {
        "celery.py": "from celery import Celery\n\napp = Celery('shadow')\n",  # would shadow Celery itself
        "t/__init__.py": "",
        "t/unit/__init__.py": "",
        "t/unit/app.py": "from celery import Celery\n\napp = Celery('test')\n",  # Celery's own test layout
        "real.py": "from celery import Celery\n\napp = Celery('real')\n",
    }
    assert discover_app(_tree(tmp_path / "s", files)).app == "real"


def test_commands_as_docs_write_them() -> None:
    assert said_in("$ celery -A proj worker -l INFO") == [("proj", "celery -A proj worker -l INFO")]
    assert said_in("celery worker -A proj.celery:app") == [("proj.celery:app", "celery worker -A proj.celery:app")]
    assert said_in("pip install celery -A") == []  # no subcommand, no app
    assert said_in("celery -A $APP worker") == []  # a variable names nothing here
    # Filled in from what the project sets, to read the app; shown as written (.env holds passwords too).
    known = {"APP": "shop", "PASSWORD": "hunter2"}
    line = "celery -A ${APP}.worker worker -b redis://:$PASSWORD@db/0"
    assert said_in(line, known) == [("shop.worker", "celery -A ${APP}.worker worker -b redis://:$PASSWORD@db/0")]
    assert said_in("django-celery-beat -A x worker") == []


# -- the root and the code's folder -----------------------------------------------------------------------
def test_the_root_is_found_from_any_folder_inside_it(tmp_path: Path) -> None:
    root = _tree(tmp_path / "repo", {".git/HEAD": "ref\n", "pkg/__init__.py": "", "pkg/sub/__init__.py": ""})
    assert find_root(root / "pkg" / "sub") == root
    # A nearer pyproject.toml without a tlrun table loses to an ancestor whose project file has one.
    _tree(root, {"pyproject.toml": "[tool.tlrun]\napp = 'pkg'\n", "pkg/pyproject.toml": "[project]\nname='x'\n"})
    assert find_root(root / "pkg" / "sub") == root
    (root / "pyproject.toml").write_text("[project]\nname = 'repo'\n")
    assert find_root(root / "pkg" / "sub") == root / "pkg"
    lone = tmp_path / "lone" / "deep"
    lone.mkdir(parents=True)
    assert find_root(lone) == lone


def test_src_layouts_are_found_from_the_folder_or_the_packaging_settings(tmp_path: Path) -> None:
    app = {"src/pkg/__init__.py": "", "src/pkg/celery.py": "from celery import Celery\n\napp = Celery('pkg')\n"}
    plain = _tree(tmp_path / "plain", {"pyproject.toml": "[project]\nname = 'pkg'\n", **app})
    source = find_source(plain, {})
    assert source.directory == plain / "src" and source.why == "src/ layout"
    found = discover_app(plain, source)
    assert (found.app, found.found) == ("pkg.celery", "found src/pkg/celery.py: creates Celery('pkg')")
    custom = {"code/pkg/__init__.py": "", "code/pkg/celery.py": app["src/pkg/celery.py"], "pkg2/__init__.py": ""}
    hatch = _tree(tmp_path / "hatch", custom)
    document = {"tool": {"hatch": {"build": {"targets": {"wheel": {"packages": ["code/pkg"]}}}}}}
    assert find_source(hatch, document).directory == hatch / "code"
    poetry = {"tool": {"poetry": {"packages": [{"include": "pkg", "from": "code"}]}}}
    assert find_source(hatch, poetry).directory == hatch / "code"
    setuptools = {"tool": {"setuptools": {"package-dir": {"": "code"}}}}
    assert find_source(hatch, setuptools).directory == hatch / "code"
    assert find_source(hatch, {}).directory == hatch  # a top-level package: not a src/ layout
    with pytest.raises(ConfigError, match="is not a folder"):
        find_source(hatch, {}, "nowhere")
    with pytest.raises(ConfigError, match="must be a folder inside the project root"):
        find_source(hatch, {}, "../elsewhere")


# -- end to end: init once, then every command without arguments from any folder ---------------------------
def _src_project(project: Project, declared: bool) -> tuple[Path, str]:
    pkg = f"pkg_{uuid.uuid4().hex[:8]}"
    root = project.base / f"srcproj-{uuid.uuid4().hex[:6]}"
    table = '\n[tool.tlrun]\nsource = "src"\n' if declared else ""
    files = {
        "pyproject.toml": f"[project]\nname = 'srcproj'\n{table}",
        f"src/{pkg}/__init__.py": "",
        f"src/{pkg}/celery.py": f"""
            import os

            from celery import Celery

            app = Celery("{pkg}", include=["{pkg}.tasks"])
            app.conf.broker_connection_retry_on_startup = True
            app.conf.result_backend = os.environ.get("TEST_RESULT_BACKEND")
        """,
        f"src/{pkg}/tasks.py": f"""
            from {pkg}.helpers import VALUE
            from {pkg}.celery import app


            @app.task
            def value():
                return VALUE
        """,
        f"src/{pkg}/helpers.py": "VALUE = 42\n",
    }
    return _tree(root, files), pkg


def _command(project: Project, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "tlrun", *args],
        cwd=cwd,
        env=project.env(),
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Ctrl-C, as a user would; SIGKILL only if the launcher does not end (the fixture then finds leftovers)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("declared", [False, True], ids=["found", "declared"])
def test_src_layout_init_then_dev_ps_doctor_stop_from_the_root_and_a_package(project: Project, declared: bool) -> None:
    root, pkg = _src_project(project, declared)
    init = _command(project, root / "src" / pkg, "init", *(["--force"] if declared else []))
    assert init.returncode == 0, init.stderr
    table = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["tlrun"]
    assert table["app"] == f"{pkg}.celery" and table["source"] == "src"
    assert "the code lives in src/" in init.stdout
    out = project.base / f"dev-{declared}.txt"
    with out.open("w") as fh:
        dev = subprocess.Popen(
            [PY, "-m", "tlrun", "dev"], cwd=root, env=project.env(), stdout=fh, stderr=subprocess.STDOUT
        )
    try:
        wait_for(lambda: re.search(READY, out.read_text()), 60, "dev to be ready")
        node = f"default{dev.pid}@{HOST}"  # init wrote the default role
        assert ping_replies(project.broker_url) == [node]
        assert not (root / "src" / pkg / "logs").exists() and (root / "logs").is_dir()
        from helpers import send_task

        assert send_task(project.broker_url, f"{pkg}.tasks.value").get(timeout=30) == 42
        inside = root / "src" / pkg
        ps = _command(project, inside, "ps", "--json")
        assert ps.returncode == 0, ps.stderr
        assert [r["node"] for r in json.loads(ps.stdout) if r["kind"] == "worker"] == [node]
        doctor = _command(project, inside, "doctor", "--json")
        assert json.loads(doctor.stdout)["project_root"] == str(root), doctor.stderr
        stop = _command(project, inside, "stop")
        assert stop.returncode == 0, stop.stderr
        assert dev.wait(30) == 0
    finally:
        _stop(dev)


def test_run_inside_the_package_that_holds_celery_py(project: Project) -> None:
    pkg = f"proj_{uuid.uuid4().hex[:8]}"
    root = _tree(
        project.base / f"pkgdir-{uuid.uuid4().hex[:6]}",
        {
            "manage.py": "print('a project root marker')\n",
            f"{pkg}/__init__.py": "",
            f"{pkg}/celery.py": f"from celery import Celery\n\napp = Celery('{pkg}')\n",
        },
    )
    inside = root / pkg
    out = project.base / "pkg-worker.txt"
    with out.open("w") as fh:
        worker = subprocess.Popen(
            [PY, "-m", "tlrun", "worker", "--", "--without-mingle", "--without-gossip"],
            cwd=inside,
            env=project.env(),
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: re.search(READY, out.read_text()), 60, "the worker to be ready")
        assert f"using app {pkg}.celery (found {pkg}/celery.py" in out.read_text()
        assert not (inside / "logs").exists()
        ps = _command(project, inside, "ps", "--json")
        assert [r["node"] for r in json.loads(ps.stdout)] == [f"api{worker.pid}@{HOST}"], ps.stderr
        assert _command(project, inside, "stop").returncode == 0
        assert worker.wait(30) == 0
    finally:
        _stop(worker)
    # With no marker above it, the package folder is the root: its celery.py is never taken as the app.
    lone = _tree(project.base / f"lone-{uuid.uuid4().hex[:6]}" / pkg, {"__init__.py": "", "celery.py": "x = 1\n"})
    result = _command(project, lone, "ps")
    assert result.returncode == 3 and "is a Python package: run tlrun from the project's root folder" in result.stderr
    assert "internal error" not in result.stderr and not (lone / "logs").exists()


# -- init: a database scheduler, Django-namespaced queues, --force in place ------------------------------
def test_init_runs_beat_for_a_database_scheduler_and_reads_namespaced_queues(project: Project) -> None:
    site = f"site_{uuid.uuid4().hex[:8]}"
    root = _tree(
        project.base / f"djdb-{uuid.uuid4().hex[:6]}",
        {
            "manage.py": f'import os\nos.environ.setdefault("DJANGO_SETTINGS_MODULE", "{site}.settings")\n',
            f"{site}/__init__.py": "",
            f"{site}/settings.py": f"""
                SECRET_KEY = "x"
                INSTALLED_APPS = ["django_celery_beat", "not_installed_app"]
                CELERY_TASK_DEFAULT_QUEUE = "main"
                CELERY_TASK_ROUTES = {{"{site}.tasks.*": {{"queue": "reports"}}}}
                CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
                import missing_dependency_of_this_site  # the app cannot be imported here
            """,
            f"{site}/celery.py": f"""
                import os

                from celery import Celery

                os.environ.setdefault("DJANGO_SETTINGS_MODULE", "{site}.settings")
                app = Celery("{site}")
                app.config_from_object("django.conf:settings", namespace="CELERY")
                app.conf.task_default_queue  # reading the settings fails: missing_dependency_of_this_site
            """,
        },
    )
    init = _command(project, root, "init")
    assert init.returncode == 0, init.stderr
    table = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["tlrun"]
    assert table["beat"] is True and f"beat = true: django_celery_beat in {site}/settings.py" in init.stdout
    assert table["workers"] == {"default": {"queues": ["main"]}, "reports": {"queues": ["reports"]}}


def test_init_force_replaces_the_table_in_place_keeping_every_comment(project: Project) -> None:
    before = textwrap.dedent(
        """
        # the project's own file
        [project]
        name = "x"  # keep me

        # about the tlrun table
        [tool.tlrun]
        app = "old"
        beat = false
        [tool.tlrun.workers.default]
        queues = ["celery"]

        # ruff, after the table
        [tool.ruff]
        line-length = 100  # and this

        [tool.tlrun.workers.stray]
        queues = ["stray"]
        # the end
        """
    ).lstrip()
    (project.root / "pyproject.toml").write_text(before)
    result = project.run("init", "--force", "-A", project.app)
    assert result.returncode == 0, result.stderr
    after = (project.root / "pyproject.toml").read_text()
    head, _, _rest = before.partition("[tool.tlrun]\n")
    assert after.startswith(head + "[tool.tlrun]\n")
    assert "# ruff, after the table\n[tool.ruff]\nline-length = 100  # and this\n\n" in after
    assert after.endswith("# the end\n") and "stray" not in after and 'app = "old"' not in after
    assert tomllib.loads(after)["tool"]["tlrun"]["app"] == project.app


# -- doctor's advice in the app's own dialect ---------------------------------------------------------------
def test_doctor_writes_fixes_as_django_settings_for_a_namespaced_app(project: Project) -> None:
    pytest.importorskip("django")
    from test_project import _django_project

    proj, pkg, _shop = _django_project(project.base / "dj", project.broker_url)
    settings = proj.root / pkg / "settings.py"
    settings.write_text(settings.read_text().replace("CELERY_TASK_ACKS_LATE = True", ""))
    result = proj.run("doctor", "--json")
    fixes = {f["code"]: f["fix"] for f in json.loads(result.stdout)["findings"]}
    assert fixes["ACKS_EARLY"].startswith(f"CELERY_TASK_ACKS_LATE = True in {pkg}/settings.py, with ")
    assert "CELERY_TASK_REJECT_ON_WORKER_LOST = True" in fixes["ACKS_EARLY"]
    assert fixes["NO_TIME_LIMIT"].startswith("CELERY_TASK_TIME_LIMIT = <seconds")
    assert "app.conf" not in json.dumps(fixes)
    # The page every fix points to exists and speaks of time limits.
    section = (Path(__file__).parent.parent / "docs" / "celery-settings.md").read_text()
    assert "task_time_limit" in section and "visibility_timeout" in section


# -- tlrun outside the project's environment ----------------------------------------------------------------
def _project_venv(root: Path, with_tlrun: bool) -> Path:
    """A real virtual environment for the project. With tlrun: it sees this test run's packages (a .pth
    file adds them, as a `pip install` would have put them there) and has a `tlrun` console script."""
    venv = root / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    if with_tlrun:
        site = Path(
            subprocess.run(
                [str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            ).stdout.strip()
        )
        ours = sysconfig.get_paths()["purelib"]
        (site / "tests_tlrun.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
        script = venv / "bin" / "tlrun"
        script.write_text(f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom tlrun.cli import main\nsys.exit(main())\n")
        script.chmod(0o755)
    return venv


def test_tlrun_outside_the_projects_environment_hands_over_or_says_how_to_install(project: Project) -> None:
    (project.root / "uv.lock").write_text("version = 1\n")
    venv = _project_venv(project.root, with_tlrun=False)
    checkout = Path(__file__).resolve().parent.parent  # tlrun is not on the package index: from its checkout
    result = project.run("doctor")
    assert result.returncode == 3, result.stderr
    assert f"this project's environment is {venv} (found as .venv/), where tlrun is not installed" in result.stderr
    assert f"tlrun: hint: install tlrun into the project: uv add --dev {checkout}" in result.stderr
    assert "Traceback" not in result.stderr
    (project.root / "uv.lock").unlink()
    result = project.run("doctor")
    assert f"{venv}/bin/python -m pip install {checkout}" in result.stderr
    for command in (["ps", "--json"], ["logs", "--list"], ["stop"]):  # no project code: they run here
        ran = project.run(*command)
        assert ran.returncode == 0 and "not installed" not in ran.stderr, (command, ran.stdout + ran.stderr)

    import shutil

    shutil.rmtree(venv)
    venv = _project_venv(project.root, with_tlrun=True)
    handed = project.run("ps", "--json")
    assert handed.returncode == 0, handed.stderr
    assert handed.stderr.count(f"tlrun: handing over to {venv}/bin/tlrun") == 1
    assert json.loads(handed.stdout) == []
    dev = project.launch(command="dev")
    try:
        dev.wait_output(READY, 60)
        assert "handing over" in dev.output()
        # The worker runs on the project's interpreter.
        import psutil

        launcher = psutil.Process(dev.pid)
        assert str(venv / "bin" / "tlrun") in launcher.cmdline()
        children = launcher.children(recursive=True)
        workers = [p for p in children if "worker" in p.cmdline() and p.cmdline()[1:3] == ["-m", "tlrun.launch._child"]]
        assert workers and all(p.cmdline()[0] == str(venv / "bin" / "python") for p in workers)
    finally:
        dev.reap()


def test_discovery_never_blocks_on_a_planted_fifo(tmp_path: Path) -> None:
    root = _tree(
        tmp_path / "fifo", {"pkg/__init__.py": "", "pkg/app.py": "from celery import Celery\n\napp = Celery('p')\n"}
    )
    os.mkfifo(root / "pkg" / "planted.py")  # a read would block forever
    os.mkfifo(root / "Procfile")
    assert discover_app(root).app == "pkg.app"
