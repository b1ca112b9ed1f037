"""Real projects: the project file, worker roles, app discovery, the app's own broker, tlrun init.

Every project here has a unique directory and a unique package or module name, and runs on the test's own
redis-server, so that no sweep can reach anything outside the test.
"""

from __future__ import annotations

import json
import re
import socket
import textwrap
import uuid
from pathlib import Path

import pytest
import tomllib

from helpers import Project, RedisServer, client, gone, ping_replies, send_task, wait_for
from tlrun.errors import ConfigError
from tlrun.project import file as project_file
from tlrun.project.discover import discover_app

HOST = socket.gethostname()
READY = r"(\d+) workers? ready: (.+) in \d+\.\d s"


def _no_broker_env(project: Project) -> dict[str, str]:
    env = project.env()
    env.pop("CELERY_BROKER_URL")
    return env


def _active_queues(url: str) -> dict[str, list[str]]:
    replies = client(url).control.broadcast("active_queues", reply=True, timeout=1.0)
    return {node: sorted(q["name"] for q in queues) for reply in replies for node, queues in reply.items()}


# -- a Django project with two queues and beat: `tlrun init` once, then commands without arguments ---------
DJANGO_FILES = {
    "manage.py": """
        import os
        import sys

        if __name__ == "__main__":
            os.environ.setdefault("DJANGO_SETTINGS_MODULE", "{pkg}.settings")
            from django.core.management import execute_from_command_line

            execute_from_command_line(sys.argv)
    """,
    "{pkg}/__init__.py": """
        from .celery import app as celery_app

        __all__ = ("celery_app",)
    """,
    "{pkg}/settings.py": """
        SECRET_KEY = "test-only"
        INSTALLED_APPS = ["{shop}"]
        USE_TZ = True
        CELERY_BROKER_URL = "{url}"
        CELERY_RESULT_BACKEND = "{url}"
        CELERY_TASK_ROUTES = {{"{shop}.tasks.report": {{"queue": "reports"}}}}
        CELERY_BEAT_SCHEDULE = {{"tick": {{"task": "{shop}.tasks.tick", "schedule": 1.0}}}}
        CELERY_TASK_ACKS_LATE = True
        CELERY_WORKER_PREFETCH_MULTIPLIER = 1
    """,
    "{pkg}/celery.py": """
        import os

        from celery import Celery

        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "{pkg}.settings")
        app = Celery("{pkg}")
        app.config_from_object("django.conf:settings", namespace="CELERY")
        app.autodiscover_tasks()
    """,
    "{shop}/__init__.py": "",
    "{shop}/tasks.py": """
        import redis
        from celery import shared_task
        from django.conf import settings


        @shared_task(bind=True)
        def where(self):
            return self.request.hostname


        @shared_task(bind=True)
        def report(self):
            return self.request.hostname


        @shared_task
        def tick():
            redis.Redis.from_url(settings.CELERY_BROKER_URL).rpush("ticks", 1)
    """,
}


def _django_project(base: Path, url: str) -> tuple[Project, str, str]:
    proj = Project(base, url, write_app=False)
    pkg, shop = f"site_{uuid.uuid4().hex[:8]}", f"shop_{uuid.uuid4().hex[:8]}"
    for name, text in DJANGO_FILES.items():
        path = proj.root / name.format(pkg=pkg, shop=shop)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip().format(pkg=pkg, shop=shop, url=url))
    (proj.root / "pyproject.toml").write_text('# the project\'s own\n[project]\nname = "mysite"  # keep me\n')
    return proj, pkg, shop


def test_django_project_init_then_every_command_without_arguments(project: Project) -> None:
    pytest.importorskip("django")
    proj, pkg, shop = _django_project(project.base / "dj", project.broker_url)
    env = _no_broker_env(proj)
    try:
        init = proj.run("init", env=env)
        assert init.returncode == 0, init.stderr
        assert f"using app {pkg}.celery (found {pkg}/celery.py, named by manage.py)" in init.stdout
        text = (proj.root / "pyproject.toml").read_text()
        assert text.startswith('# the project\'s own\n[project]\nname = "mysite"  # keep me\n')
        table = tomllib.loads(text)["tool"]["tlrun"]
        assert table["app"] == f"{pkg}.celery" and table["beat"] is True
        assert table["workers"] == {"default": {"queues": ["celery"]}, "reports": {"queues": ["reports"]}}
        again = proj.run("init", env=env)
        assert again.returncode == 3 and "already has [tool.tlrun]" in again.stderr

        dev = proj.launch(command="dev", env=env, app_arg=False)
        count, nodes = dev.wait_output(READY, 60).groups()
        assert count == "2" and "private redis-server" not in dev.output()
        default_node, reports_node = f"default{dev.pid}@{HOST}", f"reports{dev.pid}@{HOST}"
        assert nodes.startswith(f"{default_node} (pid ") and f", {reports_node} (pid " in nodes
        # Exactly the two nodes answer on the settings' broker, each consuming only its role's queues.
        assert sorted(ping_replies(project.broker_url)) == [default_node, reports_node]
        assert _active_queues(project.broker_url) == {default_node: ["celery"], reports_node: ["reports"]}
        assert send_task(project.broker_url, f"{shop}.tasks.where").get(timeout=30) == default_node
        routed = client(project.broker_url).send_task(f"{shop}.tasks.report", queue="reports")
        assert routed.get(timeout=30) == reports_node
        import redis

        ticks = redis.Redis.from_url(project.broker_url)
        try:
            wait_for(lambda: ticks.llen("ticks") >= 2, 30, "beat's periodic task to run twice")
        finally:
            ticks.close()

        ps = proj.run("ps", "--json", env=env)
        rows = json.loads(ps.stdout)
        assert sorted((r["kind"], r["role"]) for r in rows) == [
            ("beat", None),
            ("worker", "default"),
            ("worker", "reports"),
        ]
        doctor = proj.run("doctor", "--json", env=env)
        report = json.loads(doctor.stdout)
        codes = {f["code"] for f in report["findings"]}
        assert not codes & {"ROLE_MISSING", "STRAY_PROCESS", "DUPLICATE_NODE", "NO_WORKERS"}, report["findings"]
        assert sorted(n["name"] for n in report["nodes"]) == [default_node, reports_node]
        pids = [r["pid"] for r in rows]
        stop = proj.run("stop", env=env)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert dev.wait(30) == 0
        assert gone(pids)
        after = proj.run("doctor", "--json", env=env)
        assert "ROLE_MISSING" in {f["code"] for f in json.loads(after.stdout)["findings"]}
        assert after.returncode == 9
    finally:
        proj.cleanup()


def test_dev_uses_the_broker_the_app_sets_in_code(tmp_path: Path, project: Project) -> None:
    """broker= in the app's code, nothing in the environment: no private redis-server, the app's broker."""
    other = RedisServer(tmp_path / "other-redis")
    try:
        url = other.url()
        (project.root / f"{project.app}.py").write_text(
            f"from celery import Celery\n\napp = Celery({project.app!r}, broker={url!r})\n"
        )
        dev = project.launch(command="dev", env=_no_broker_env(project))
        dev.wait_output(READY, 60)
        assert "private redis-server" not in dev.output()
        assert f"api{dev.pid}@{HOST}" in ping_replies(url)
        dev.reap()
    finally:
        other.stop()


ROLES_TOML = """
[tool.tlrun]
app = "{app}"

[tool.tlrun.workers.default]
queues = ["celery"]
concurrency = 1

[tool.tlrun.workers.reports]
queues = ["reports"]
pool = "solo"
"""


def test_roles_run_side_by_side_and_sweep_only_their_own(project: Project) -> None:
    (project.root / "pyproject.toml").write_text(ROLES_TOML.format(app=project.app))
    hand = project.hand_worker(f"hand@{HOST}", extra=("-Q", "celery"))
    hand.wait_output("ready", 30)
    reports = project.launch("--role", "reports", app_arg=False)
    reports.wait_output(READY, 60)
    assert f"stray worker pid {hand.pid}" not in reports.output()
    assert hand.proc.poll() is None  # a worker of the default role is not the reports launcher's stray
    default = project.launch("--role", "default", app_arg=False)
    default.wait_output(READY, 60)
    assert f"stopping stray worker pid {hand.pid}" in default.output()
    wait_for(lambda: hand.proc.poll() is not None, 40, "the hand-started default worker to be swept")
    nodes = sorted(ping_replies(project.broker_url))
    assert nodes == [f"default{default.pid}@{HOST}", f"reports{reports.pid}@{HOST}"]
    twice = project.run("worker", "--role", "reports")
    assert twice.returncode == 6 and "a worker of role reports of app" in twice.stderr
    logs = project.run("logs", "--role", "reports", "--list")
    assert f"celery_reports_{reports.pid}.log" in logs.stdout and "celery_default_" not in logs.stdout
    health = project.run("health")
    assert health.returncode == 0 and health.stdout.count(": alive") == 2, health.stdout
    odd = project.hand_worker(f"odd@{HOST}", extra=("-Q", "archive"))
    odd.wait_output("ready", 30)
    doctor = project.run("doctor", "--json")
    findings = {f["code"]: f["message"] for f in json.loads(doctor.stdout)["findings"]}
    assert f"odd@{HOST} consumes archive, which no role" in findings["UNDECLARED_QUEUES"]
    assert "ROLE_MISSING" not in findings
    odd.reap()
    stop = project.run("stop")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert reports.wait(30) == 0 and default.wait(30) == 0


def test_export_writes_one_service_per_role_plus_beat(project: Project) -> None:
    (project.root / "pyproject.toml").write_text(ROLES_TOML.format(app=project.app))
    out = project.base / "units"
    result = project.run("export", "systemd", "--beat", "-o", str(out))
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in out.iterdir())
    prefix = f"tlrun-{project.app}"
    assert names == [
        f"{prefix}-beat.service",
        f"{prefix}-default.service",
        f"{prefix}-reports.service",
        f"{prefix}.target",
    ]
    unit = (out / f"{prefix}-reports.service").read_text()
    assert re.search(rf"^ExecStart=.* -m tlrun worker -A {project.app} .*--role reports --restart$", unit, re.M)
    supervisor = project.run("export", "supervisor", "--log-dir", str(project.base / "svlogs")).stdout
    assert f"[program:{prefix}-default]" in supervisor and f"[program:{prefix}-reports]" in supervisor
    assert f"stdout_logfile={project.base}/svlogs/supervisor-{prefix}-reports.log" in supervisor
    assert "exitcodes=0,16" in supervisor  # a launcher that gave up (16) is not restarted
    procfile = project.run("export", "procfile").stdout.splitlines()
    assert [line.split(":", 1)[0] for line in procfile] == ["default", "reports"]


def test_export_refuses_values_that_would_inject_lines(project: Project) -> None:
    result = project.run("export", "systemd", "-A", "a\nExecStartPre=/bin/touch /tmp/pwned")
    assert result.returncode == 3 and "is not a dotted module path" in result.stderr
    assert "ExecStartPre" not in result.stdout


def test_a_role_given_on_the_command_line_must_exist(project: Project) -> None:
    (project.root / "pyproject.toml").write_text(ROLES_TOML.format(app=project.app))
    result = project.run("worker", "--role", "nope")
    assert result.returncode == 3 and "no role named 'nope' in this project (roles: default, reports)" in result.stderr


# -- discovery -------------------------------------------------------------------------------------------
APP_LINE = "from celery import Celery\n\napp = Celery('x')\n"


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_discovery_zero_one_two_candidates(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="none found"):
        discover_app(_tree(tmp_path / "zero", {"util.py": "x = 1\n", "notes.txt": "Celery(\n"}))
    one = _tree(
        tmp_path / "one",
        {
            "proj/__init__.py": "",
            "proj/celery.py": APP_LINE,
            ".venv/lib/site.py": APP_LINE,  # a virtual environment is never a candidate
            "tests/conftest.py": APP_LINE,
            "proj/helpers.py": "def make():\n    return Celery('inner')  # not at module level\n",
        },
    )
    found = discover_app(one)
    assert (found.app, found.found) == ("proj.celery", "found proj/celery.py: creates Celery('x')")
    custom = _tree(tmp_path / "custom", {"worker.py": "import celery\n\nqueue_app = celery.Celery('w')\n"})
    assert discover_app(custom).app == "worker:queue_app"
    two = r"2 candidates in .*:\n  proj\.celery \(proj/celery\.py: creates Celery\('x'\)\)\n  tasks \(tasks\.py: "
    with pytest.raises(ConfigError, match=two):
        discover_app(
            _tree(tmp_path / "two", {"proj/__init__.py": "", "proj/celery.py": APP_LINE, "tasks.py": APP_LINE})
        )


def test_discovery_never_follows_symlinks(tmp_path: Path) -> None:
    outside = _tree(tmp_path / "outside", {"pkg/__init__.py": "", "pkg/celery.py": APP_LINE})
    root = _tree(tmp_path / "root", {"app.py": APP_LINE, "loop/__init__.py": ""})
    (root / "loop" / "again").symlink_to(root / "loop")  # a loop
    (root / "linked").symlink_to(outside / "pkg")  # out of the project
    (root / "link_app.py").symlink_to(outside / "pkg" / "celery.py")
    assert discover_app(root).app == "app"


def test_discovery_of_a_large_tree_says_what_it_found(tmp_path: Path, project: Project) -> None:
    (project.root / f"{project.app}.py").unlink()
    for i in range(40):
        _tree(project.root, {f"pkg{i}/__init__.py": "", **{f"pkg{i}/m{j}.py": "x = 1\n" * 50 for j in range(120)}})
    _tree(project.root, {"pkg7/celery_app.py": APP_LINE})
    result = project.run("logs", "--list", env=project.env())
    assert "tlrun: using app pkg7.celery_app (found pkg7/celery_app.py: creates Celery('x'); pin it" in result.stderr


def test_commands_without_any_app_say_how_to_name_one(project: Project) -> None:
    (project.root / f"{project.app}.py").unlink()
    result = project.run("stop")
    assert result.returncode == 3 and "no Celery app given, and none found" in result.stderr
    assert "[tool.tlrun]" in result.stderr


# -- malformed project files -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[tool.tlrun]\napp = 'x'\nbeat = tru\n", r"pyproject.toml: TOML syntax error: .*line 3"),
        ("[tool.tlrun]\napp = 'x'\nbaet = true\n", r"\[tool.tlrun\], key baet\): unknown key"),
        (
            "[tool.tlrun.workers.a]\nqueues = ['q']\nconcurrency = 'two'\n",
            r"key workers.a.concurrency\): expected an integer of at least 1 and at most 10000, got 'two'",
        ),
        ("[tool.tlrun.workers.a]\nconcurrency = 2\n", r"key workers.a\): a role needs `queues`"),
        ("[tool.tlrun.workers.a]\nqueues = []\n", r"key workers.a.queues\): expected a non-empty list of queue names"),
        ("[tool.tlrun]\nready_timeout = nan\n", r"key ready_timeout\): expected a number of at least 0.5, got nan"),
        ("[tool.tlrun.workers.beat]\nqueues = ['q']\n", r"'beat' is not a role name tlrun can use"),
    ],
)
def test_malformed_project_file_is_a_config_error(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "pyproject.toml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        project_file.load(tmp_path)


def test_malformed_project_file_exits_3_naming_file_and_key(project: Project) -> None:
    (project.root / "pyproject.toml").write_text("[tool.tlrun.workers.a]\nqueues = ['q']\npool = 'forking'\n")
    result = project.run("dev")
    assert result.returncode == 3
    assert f"{project.root}/pyproject.toml ([tool.tlrun], key workers.a.pool): expected one of prefork" in result.stderr
    assert "Traceback" not in result.stderr


def test_tlrun_toml_is_read_when_pyproject_has_no_table(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (tmp_path / "tlrun.toml").write_text("app = 'proj.celery'\n[workers.io]\nqueues = ['io']\n")
    found = project_file.load(tmp_path)
    assert found.path == tmp_path / "tlrun.toml" and found.values["app"] == "proj.celery"
    assert [r.name for r in found.roles] == ["io"]


def test_precedence_reaches_the_project_file() -> None:
    from tlrun.config import build_settings

    pf = project_file.parse(
        Path("/p/pyproject.toml"),
        {
            "tool": {
                "tlrun": {"app": "file_app", "grace": 9, "workers": {"r": {"queues": ["a", "b"], "concurrency": 3}}}
            }
        },
    )
    s = build_settings({}, {}, {}, Path("/p"), project=pf)
    assert (s.app, s.stop_grace, s.role.name, s.role.node_prefix, s.role.worker.queues) == (
        "file_app",
        9,
        "r",
        "r",
        "a,b",
    )
    assert s.role.worker.concurrency == 3 and s.role.declared and s.role.lock_kind == "worker-r"
    s = build_settings({"concurrency": 5}, {"TLRUN_STOP_GRACE": "4"}, {"CELERY_APP": "dot_app"}, Path("/p"), project=pf)
    assert (s.app, s.stop_grace, s.role.worker.concurrency) == ("dot_app", 4, 5)
    with pytest.raises(ConfigError, match="--queues would give all 2 roles the same value"):
        two = project_file.parse(
            Path("/p/pyproject.toml"),
            {"tool": {"tlrun": {"workers": {"a": {"queues": ["a"]}, "b": {"queues": ["b"]}}}}},
        )
        build_settings({"app": "x", "queues": "z"}, {}, {}, Path("/p"), project=two)


def test_a_password_in_dash_b_is_warned_about_once(project: Project) -> None:
    result = project.run("ps", "-A", project.app, "-b", "redis://:hunter22@127.0.0.1:1/0")
    assert result.stderr.count("holds a password, which every user can read in `ps`") == 1
    assert "hunter22" not in result.stdout + result.stderr
