"""The development stack under tlrun dev: processes of the project file, a Procfile, Flower; each a unit with
the workers' guarantees (its group stopped on every path, a stray found and swept, one restarted or stopped
from another shell without touching the others). Real processes, real Redis, real workers."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from helpers import Project, free_port, gone, ping_replies, processes_under, wait_for

pytestmark = pytest.mark.timeout(180)
HOST = socket.gethostname()
READY = r"tlrun: \d+ workers? ready: "
NO_PDEATHSIG = {"TLRUN_NO_PDEATHSIG": "1"}

DEAF = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("deaf up", flush=True)
while True:
    time.sleep(1)
"""

POLITE = """
import signal, sys, time
def on_int(signum, frame):
    print("got SIGINT", flush=True)
    sys.exit(0)
signal.signal(signal.SIGINT, on_int)
signal.signal(signal.SIGTERM, lambda s, f: sys.exit(9))
print("polite up", flush=True)
while True:
    time.sleep(1)
"""


def _stack(project: Project, extra: str = "", deaf_grace: int = 2) -> None:
    (project.root / "deaf.py").write_text(DEAF)
    (project.root / "polite.py").write_text(POLITE)
    (project.root / "pyproject.toml").write_text(
        f"""[tool.tlrun]
app = "{project.app}"

[tool.tlrun.processes.web]
command = "{sys.executable} -m http.server {{port}} --bind 127.0.0.1"
port = "auto"
ready = "http"

[tool.tlrun.processes.deaf]
command = ["{sys.executable}", "deaf.py"]
ready = "deaf up"
grace = {deaf_grace}

[tool.tlrun.processes.polite]
command = ["{sys.executable}", "polite.py"]
ready = "polite up"
stop_signal = "SIGINT"
{extra}"""
    )


def _ps(project: Project) -> list[dict[str, Any]]:
    result = project.run("ps", "--json")
    assert result.returncode == 0, result.stderr
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows


def _pids(project: Project) -> dict[str, int]:
    return {str(r["name"]): int(r["pid"]) for r in _ps(project) if r["name"]}


def _get(url: str, auth: str | None = None) -> int:
    request = urllib.request.Request(url)
    if auth is not None:
        import base64

        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _answers(url: str) -> bool:
    try:
        return _get(url) == 200
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ConnectionRefusedError):
            return False
        raise


def _tree(pid: int) -> list[int]:
    try:
        proc = psutil.Process(pid)
        return [pid, *(c.pid for c in proc.children(recursive=True))]
    except psutil.Error:
        return []


def test_the_stack_runs_beside_the_workers_one_unit_at_a_time(project: Project) -> None:
    """Ready lines of each kind; a crashing process backs off and never takes the workers down; `restart web`
    and `stop polite` (SIGINT, its stop signal) touch nothing else; a save restarts only what asked for it;
    a SIGKILLed launcher (Linux backstop off) leaves none of them running within the longest grace plus 3 s."""
    _stack(
        project,
        f"""
[tool.tlrun.processes.once]
command = ["{sys.executable}", "-c", "print('once ran', flush=True); raise SystemExit(3)"]

[tool.tlrun.processes.saver]
command = ["{sys.executable}", "-c", "import time; print('saver up', flush=True); time.sleep(600)"]
ready = "saver up"
reload = true
""",
    )
    dev = project.launch("--reload", command="dev", env=project.env(**NO_PDEATHSIG))
    dev.wait_output(READY)
    url = dev.wait_output(r"tlrun: web ready on (http://127\.0\.0\.1:\d+)").group(1)
    dev.wait_output(r"tlrun: deaf ready")
    dev.wait_output(r"tlrun: polite ready")
    assert _get(url) == 200
    # The crashing one: reported, retried with a doubling delay, and the worker keeps answering.
    dev.wait_output(r"once crashed \(status 3\): starting it again in 1 s")
    dev.wait_output(r"once crashed \(status 3\): starting it again in 2 s")
    node = f"api{dev.pid}@{HOST}"
    assert ping_replies(project.broker_url) == [node]

    rows = {r["name"]: r for r in _ps(project)}
    assert rows["web"]["kind"] == "process" and rows["web"]["port"] == int(url.rsplit(":", 1)[1])
    assert rows["web"]["state"] == "ready" and rows["web"]["launcher_pid"] == dev.pid
    assert rows["default"]["kind"] == "worker" and {"kind", "name", "state", "port", "uptime"} <= set(rows["web"])
    before = _pids(project)

    restarted = project.run("restart", "web")
    assert restarted.returncode == 0, restarted.stderr
    after = wait_for(lambda: (p := _pids(project)).get("web") not in (None, before["web"]) and p, 10, "web again")
    assert {k: after[k] for k in ("default", "deaf", "polite")} == {k: before[k] for k in ("default", "deaf", "polite")}
    # Its new process exists before it listens: a refused connection means "not yet", until the deadline.
    wait_for(lambda: _answers(url), 10, "web answering on its port again")

    stopped = project.run("stop", "polite")
    assert stopped.returncode == 0, stopped.stderr
    assert "got SIGINT" in (project.root / "logs" / f"proc_polite_{dev.pid}.log").read_text()
    left = _pids(project)
    assert "polite" not in left and left["default"] == before["default"] and left["web"] == after["web"]
    again = project.run("restart", "polite")
    assert again.returncode == 0, again.stderr
    wait_for(lambda: "polite" in _pids(project), 10, "polite started again")
    assert project.run("restart", "nothing").returncode == 2
    # A role by its name: stopped alone (web runs on), then started again with the guard, sweep and verify.
    assert project.run("stop", "default").returncode == 0
    wait_for(lambda: ping_replies(project.broker_url) == [], 10, "the role's worker gone")
    assert "web" in _pids(project) and "default" not in _pids(project)
    app_file = project.root / f"{project.app}.py"
    good = app_file.read_text()
    app_file.write_text(good + "\ndef broken(:\n")
    refused = project.run("restart", "default")  # its app does not import: the launcher and web run on
    assert refused.returncode == 18 and "SyntaxError" in refused.stderr, refused.stderr
    assert "web" in _pids(project) and dev.proc.poll() is None
    app_file.write_text(good)
    assert project.run("restart", "default").returncode == 0
    assert ping_replies(project.broker_url) == [node]
    logs = project.run("logs", "web", "-n", "50")
    assert logs.returncode == 0 and "Serving HTTP on 127.0.0.1" in logs.stdout

    # A save: the worker reloads, `saver` (reload = true) restarts, web (runserver reloads itself) does not.
    saver = _pids(project)["saver"]
    web = _pids(project)["web"]
    (project.root / "touched.py").write_text("X = 1\n")
    dev.wait_output(r"reload: restarting saver")
    wait_for(lambda: _pids(project).get("saver") not in (None, saver), 15, "saver restarted on the save")
    assert _pids(project)["web"] == web

    tree = [pid for name, pid in _pids(project).items() for pid in _tree(pid)]
    dev.send(signal.SIGKILL)
    dev.wait(5)
    wait_for(lambda: gone(tree), 2 + 3, "every unit's processes gone after the launcher's SIGKILL")
    assert not processes_under(project.base)


def test_a_stray_process_is_listed_reported_and_swept(project: Project) -> None:
    """A process that ignores SIGTERM outlives its SIGKILLed launcher for its grace: ps lists it as a stray,
    doctor reports it, the next dev sweeps it (matched by tlrun's marker) before it starts its own."""
    _stack(project, deaf_grace=60)
    env = project.env(**NO_PDEATHSIG, TLRUN_STOP_GRACE="1")
    first = project.launch("--only", "deaf", command="dev", env=env)
    first.wait_output(r"tlrun: deaf ready")
    first.send(signal.SIGKILL)
    first.wait(5)
    stray = wait_for(lambda: [r for r in _ps(project) if r["name"] == "deaf" and r["stray"]], 10, "the stray")
    assert stray[0]["kind"] == "process" and stray[0]["launcher_pid"] is None
    doctor = project.run("doctor", "--json")
    findings = json.loads(doctor.stdout)["findings"]
    assert any(f["code"] == "STRAY_PROCESS" and str(stray[0]["pid"]) in f["message"] for f in findings), findings
    second = project.launch("--only", "deaf,web", command="dev", env=env)
    second.wait_output(rf"stopping stray process deaf pid {stray[0]['pid']}")
    second.wait_output(r"tlrun: web ready on")
    second.wait_output(r"tlrun: deaf ready")
    assert gone([stray[0]["pid"]])
    rows = _ps(project)
    assert sorted(r["name"] for r in rows) == ["deaf", "web"] and all(r["launcher_pid"] == second.pid for r in rows)
    # A second Ctrl-C does not wait for deaf's 60 s grace: SIGKILL to its group.
    second.send(signal.SIGINT)
    second.wait_output(r"warm shutdown|web stopped")
    second.send(signal.SIGINT)
    second.wait(10)  # far sooner than deaf's grace
    assert "cold shutdown: SIGQUIT to process:deaf" in second.output()
    assert not processes_under(project.base)


def test_a_procfile_worker_line_runs_as_a_role(project: Project) -> None:
    """A Procfile's `celery worker` line runs as a role named after the line (tlrun's node name, one ping
    reply, its queues), its beat line as tlrun's beat, and the other lines as processes with $PORT."""
    port = free_port()
    (project.root / ".env").write_text("FROM_DOTENV=dotenv-value-7\n")
    (project.root / "Procfile").write_text(
        'envy: echo "envy sees $FROM_DOTENV" && sleep 600\n'
        f"web: {sys.executable} -m http.server $PORT --bind 127.0.0.1\n"
        f"jobs: celery -A {project.app} worker -Q celery,mail -c 1 -n custom@%h --loglevel info\n"
    )
    dev = project.launch(command="dev", app_arg=False, env=project.env(PORT=str(port)))
    dev.wait_output(r"Procfile line 3 \(jobs\) runs a Celery worker: tlrun runs it as role jobs \(celery,mail\)")
    dev.wait_output(r"\[envy\] envy sees dotenv-value-7")
    dev.wait_output(READY)
    dev.wait_output(rf"tlrun: web ready on http://127\.0\.0\.1:{port + 100}\b")  # $PORT: base + 100 per line
    node = f"jobs{dev.pid}@{HOST}"
    assert ping_replies(project.broker_url) == [node]
    assert "-n custom" not in dev.output()
    rows = {r["name"]: r for r in _ps(project)}
    assert rows["jobs"]["node"] == node and rows["web"]["port"] == port + 100
    exported = project.run("export", "procfile", "-A", project.app)
    assert exported.returncode == 0, exported.stderr
    assert f"web: {sys.executable} -m http.server $PORT --bind 127.0.0.1" in exported.stdout
    assert "jobs: python -m tlrun worker" in exported.stdout and "--role jobs" in exported.stdout
    dev.send(signal.SIGINT)
    assert dev.wait(30) == 0
    assert not processes_under(project.base)


@pytest.mark.skipif(importlib.util.find_spec("flower") is None, reason="flower is not installed")
def test_flower_answers_on_its_printed_url_behind_basic_auth(project: Project) -> None:
    secret = "fl-pass-8b1d"
    env = project.env(FLOWER_BASIC_AUTH=f"admin:{secret}")
    dev = project.launch("--flower", command="dev", env=env)
    dev.wait_output(READY)
    url = dev.wait_output(r"tlrun: flower ready on (http://127\.0\.0\.1:\d+)", 60).group(1)
    assert _get(url) == 401
    assert _get(url + "/workers", auth=f"admin:{secret}") == 200
    flower = next(r for r in _ps(project) if r["name"] == "flower")
    assert flower["kind"] == "flower" and flower["port"] == int(url.rsplit(":", 1)[1])
    cmdlines = [" ".join(psutil.Process(p).cmdline()) for p in _tree(flower["pid"])]
    assert cmdlines and not any(secret in c for c in cmdlines)
    dev.send(signal.SIGINT)
    assert dev.wait(30) == 0
    assert secret not in dev.output()
    assert not processes_under(project.base)


@pytest.mark.skipif(importlib.util.find_spec("flower") is None, reason="flower is not installed")
def test_flower_without_basic_auth_is_flagged_when_others_can_log_in(project: Project) -> None:
    from helpers import throwaway_user

    with throwaway_user(shell="/bin/sh") as other:
        dev = project.launch("--flower", "--only", "flower", command="dev", env=project.env())
        dev.wait_output(
            rf"warning: Flower runs without FLOWER_BASIC_AUTH and this host has other login users \(.*{other.pw_name}",
            30,
        )
        dev.wait_output(r"tlrun: flower ready on http://127\.0\.0\.1:\d+", 60)
        dev.send(signal.SIGINT)
        assert dev.wait(30) == 0


def test_bad_stack_input_is_refused_before_anything_starts(project: Project) -> None:
    (project.root / "pyproject.toml").write_text(
        f'[tool.tlrun]\napp = "{project.app}"\n[tool.tlrun.processes.web]\ncommand = "serve {{port}}"\n'
    )
    result = project.run("dev", "-A", project.app)
    assert result.returncode == 3 and "uses {port} but the process has no `port`" in result.stderr
    (project.root / "pyproject.toml").write_text(
        f'[tool.tlrun]\napp = "{project.app}"\n[tool.tlrun.processes.web]\ncommand = "no-such-program-x1"\n'
    )
    result = project.run("dev", "-A", project.app)
    assert result.returncode == 3 and "'no-such-program-x1' is not on PATH" in result.stderr
    result = project.run("dev", "-A", project.app, "--only", "nope")
    assert result.returncode == 2 and "no unit named 'nope'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not processes_under(project.base)


def test_procfile_lines_and_celery_lines_are_read_as_honcho_does(tmp_path: Path) -> None:
    from tlrun.project.processes import celery_line, read_procfile

    path = tmp_path / "Procfile"
    path.write_text(
        "# comment\n"
        "web: gunicorn app:wsgi -b 0.0.0.0:$PORT\n"
        "worker: DJANGO_SETTINGS_MODULE=x exec celery -A proj worker -B -Q a,b --concurrency=3 --pidfile=/x -O fair\n"
        "clock: python -m celery -A proj beat -l info\n"
        "assets: npm run dev\n"
        "shell: cd x && celery -A proj worker\n"
    )
    stack = read_procfile(path, {"PORT": "7000"})
    assert [(p.name, p.port) for p in stack.processes] == [("web", 7000), ("assets", 7300), ("shell", 7400)]
    assert stack.processes[0].argv == ("sh", "-c", "gunicorn app:wsgi -b 0.0.0.0:$PORT")
    assert stack.roles == (("worker", {"queues": ["a", "b"], "concurrency": 3, "extra_args": ["-O", "fair"]}),)
    assert stack.app == "proj" and stack.beat
    assert celery_line("celery -A p inspect ping") is None and celery_line("honcho start") is None
    assert read_procfile(path, {}).processes[0].port == 5000
    assert stack.app_evidence == "Procfile line 3: `celery -A proj worker`"
    assert [n.split(" runs ")[0] for n in stack.role_notes] == ["Procfile line 3 (worker)"] and stack.release is None
    path.write_text("release: python manage.py migrate\nweb: gunicorn app:wsgi\n")
    stack = read_procfile(path, {})
    assert stack.release is not None and stack.release.argv == ("sh", "-c", "python manage.py migrate")
    assert [p.name for p in stack.processes] == ["web"]  # Heroku's release phase: never a service


def test_procfile_notes_never_contradict_and_its_app_is_said(tmp_path: Path) -> None:
    """A Procfile's worker line is said to run as a role only when it does (the project file's roles win, and
    then only that is said); the app read from its `-A` gets a `using app` line, as any app tlrun finds."""
    from tlrun.config import build_settings
    from tlrun.project import file as project_file
    from tlrun.project.processes import read_procfile

    (tmp_path / "Procfile").write_text("jobs: celery -A tlproj worker -Q mail\n")
    stack = read_procfile(tmp_path / "Procfile", {})
    alone = build_settings({}, {}, {}, tmp_path, stack=stack)
    assert alone.app == "tlproj" and [r.name for r in alone.roles] == ["jobs"]
    assert any("using app tlproj (Procfile line 1: `celery -A tlproj worker`;" in m for _l, m in alone.notes)
    assert any("tlrun runs it as role jobs" in n for n in alone.stack_notes)
    (tmp_path / "tlrun.toml").write_text('[workers.default]\nqueues = ["celery"]\n')
    declared = build_settings({}, {}, {}, tmp_path, project=project_file.load(tmp_path), stack=stack)
    assert [r.name for r in declared.roles] == ["default"]
    assert not any("runs it as role" in n for n in declared.stack_notes)
    assert any("worker lines do not run" in n for n in declared.stack_notes)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('[processes.web]\ncommand = "x"\nport = 0', "expected a port"),
        ('[processes.web]\ncommand = "x"\nready = "http"', '"http" needs a `port`'),
        ('[processes.web]\ncommand = "x"\nstop_signal = "SIGKILL"', "expected one of SIGTERM"),
        ('[processes.web]\ncommand = "x"\nbogus = 1', "unknown key"),
        ('[processes.flower]\ncommand = "x"', "not a process name"),
        ('[processes.web]\ncommand = "x"\nready = "("', "is not a regular expression"),
        ('[processes.web]\ncommand = "x"\ncwd = "../up"', "inside it"),
        ('[workers.web]\nqueues = ["a"]\n[processes.web]\ncommand = "x"', "names a role and a process"),
    ],
)
def test_a_bad_processes_table_names_file_and_key(tmp_path: Path, table: str, message: str) -> None:
    from tlrun.errors import ConfigError
    from tlrun.project import file as project_file

    (tmp_path / "tlrun.toml").write_text('app = "x"\n' + table + "\n")
    with pytest.raises(ConfigError) as caught:
        project_file.load(tmp_path)
    assert message in str(caught.value) and "tlrun.toml" in str(caught.value)


def test_exported_services_run_the_processes(tmp_path: Path) -> None:
    """One unit or program per process, stopped as a group with its stop signal; systemd-analyze accepts them."""
    import configparser
    import shutil

    from tlrun.config import build_settings
    from tlrun.deploy import export
    from tlrun.project import file as project_file

    (tmp_path / "tlrun.toml").write_text(
        'app = "proj.celery"\n[processes.web]\ncommand = "python manage.py runserver 127.0.0.1:{port}"\n'
        'port = 8000\nstop_signal = "SIGINT"\nenv = { DJANGO_DEBUG = "1" }\n'
    )
    settings = build_settings({}, {}, {}, tmp_path, project=project_file.load(tmp_path))
    spec = export.spec_for(settings, user="nobody")
    units = export.systemd(spec)
    web = units["tlrun-proj-celery-web.service"]
    assert f"ExecStart={sys.executable} manage.py runserver 127.0.0.1:8000" in web.replace("'", "")
    assert "KillSignal=SIGINT" in web and "KillMode=control-group" in web and "Environment=DJANGO_DEBUG=1" in web
    assert "tlrun-proj-celery-web.service" in units["tlrun-proj-celery.target"]
    conf = configparser.ConfigParser(interpolation=None)
    conf.read_string(export.supervisor(spec)["tlrun-proj-celery.conf"])
    program = conf["program:tlrun-proj-celery-web"]
    assert (
        program["stopsignal"] == "INT"
        and program["stopasgroup"] == "true"
        and 'DJANGO_DEBUG="1"' in program["environment"]
    )
    assert "web: DJANGO_DEBUG=1 python manage.py runserver 127.0.0.1:8000" in export.procfile(spec)["Procfile"]
    if shutil.which("systemd-analyze"):
        for name, text in units.items():
            (tmp_path / name).write_text(text)
        checked = subprocess.run(
            ["systemd-analyze", "verify", str(tmp_path / "tlrun-proj-celery-web.service")],
            capture_output=True,
            text=True,
            env={"SYSTEMD_LOG_LEVEL": "err", "PATH": "/usr/bin:/bin"},
            timeout=60,
        )
        assert checked.returncode == 0 and not checked.stderr.strip(), checked.stderr


def test_only_a_process_runs_without_any_worker(project: Project) -> None:
    """`--only web`: no worker at all, the launcher holds the process alone; Ctrl-C stops it (status 0)."""
    _stack(project)
    dev = project.launch("--only", "web", command="dev")
    dev.wait_output(r"tlrun: web ready on")
    assert "starting api" not in dev.output()
    assert [r["name"] for r in _ps(project)] == ["web"]
    dev.send(signal.SIGINT)
    assert dev.wait(20) == 0
    assert not processes_under(project.base)


DJANGO_SETTINGS = """
SECRET_KEY = "test-only"
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "site_{app}.urls"
INSTALLED_APPS = []
DATABASES = {{}}
USE_TZ = True
"""

DJANGO_URLS = """
from django.http import HttpResponse
from django.urls import path

urlpatterns = [path("", lambda request: HttpResponse("hello from django"))]
"""

WATCHER = """
import time
print("watching frontend/ for changes", flush=True)
while True:
    time.sleep(1)
"""


def test_a_django_project_runs_its_whole_stack_with_one_command(project: Project) -> None:
    """runserver (its autoreloader's child too), a frontend watcher, two worker roles, beat and Flower from one
    `tlrun dev`; one Ctrl-C stops all of it and nothing is left."""
    site = project.root / f"site_{project.app}"
    site.mkdir()
    (site / "__init__.py").write_text("")
    (site / "settings.py").write_text(DJANGO_SETTINGS.format(app=project.app))
    (site / "urls.py").write_text(DJANGO_URLS)
    (project.root / "manage.py").write_text(
        "import os, sys\n"
        f"os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'site_{project.app}.settings')\n"
        "from django.core.management import execute_from_command_line\n"
        "execute_from_command_line(sys.argv)\n"
    )
    (project.root / "frontend").mkdir()
    (project.root / "frontend" / "watch.py").write_text(WATCHER)
    flower = importlib.util.find_spec("flower") is not None
    (project.root / "pyproject.toml").write_text(
        f"""[tool.tlrun]
app = "{project.app}"
beat = true
flower = {str(flower).lower()}

[tool.tlrun.workers.default]
queues = ["celery"]

[tool.tlrun.workers.slow]
queues = ["slow"]

[tool.tlrun.processes.web]
command = "{sys.executable} manage.py runserver 127.0.0.1:{{port}}"
port = "auto"
ready = "http"
stop_signal = "SIGINT"

[tool.tlrun.processes.assets]
command = ["{sys.executable}", "watch.py"]
cwd = "frontend"
ready = "watching"
"""
    )
    dev = project.launch(command="dev")
    dev.wait_output(READY)
    url = dev.wait_output(r"tlrun: web ready on (http://127\.0\.0\.1:\d+)", 60).group(1)
    dev.wait_output(r"tlrun: assets ready")
    if flower:
        dev.wait_output(r"tlrun: flower ready on http://127\.0\.0\.1:\d+", 60)
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.read() == b"hello from django"
    assert sorted(ping_replies(project.broker_url)) == sorted([f"default{dev.pid}@{HOST}", f"slow{dev.pid}@{HOST}"])
    kinds = {r["name"]: r["kind"] for r in _ps(project)}
    expected = {"default": "worker", "slow": "worker", "beat": "beat", "web": "process", "assets": "process"}
    assert kinds == {**expected, **({"flower": "flower"} if flower else {})}
    web_tree = _tree(_pids(project)["web"])
    assert len(web_tree) >= 3  # the watchdog, runserver's autoreloader and the server it runs
    dev.send(signal.SIGINT)
    assert dev.wait(60) == 0
    assert gone(web_tree)
    assert not processes_under(project.base)


def test_a_taken_port_and_a_process_never_ready_are_said(project: Project) -> None:
    """A fixed port something else holds is a warning before the start (the process then crashes and backs
    off); a process that never shows its ready line is said to be late once, after the readiness timeout."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        (project.root / "pyproject.toml").write_text(
            f"""[tool.tlrun]
app = "{project.app}"

[tool.tlrun.processes.web]
command = "{sys.executable} -m http.server {{port}} --bind 127.0.0.1"
port = {port}

[tool.tlrun.processes.mute]
command = ["{sys.executable}", "-c", "import time; time.sleep(600)"]
ready = "never printed"
"""
        )
        dev = project.launch("--only", "web,mute", command="dev", env=project.env(TLRUN_READY_TIMEOUT="1"))
        dev.wait_output(rf"port {port} of process web is already in use")
        dev.wait_output(r"web crashed \(status 1\): starting it again in 1 s")
        dev.wait_output(r"mute is not ready after 1 s \(waiting for a line matching 'never printed'\)")
        dev.send(signal.SIGINT)
        assert dev.wait(20) == 0
    assert dev.output().count("mute is not ready") == 1
    assert not processes_under(project.base)


def test_flower_without_the_package_is_a_clear_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tlrun.config import build_settings
    from tlrun.errors import ConfigError
    from tlrun.project import processes

    real = importlib.util.find_spec
    monkeypatch.setattr(processes.importlib.util, "find_spec", lambda name: None if name == "flower" else real(name))
    settings = build_settings({"app": "proj"}, {}, {}, tmp_path)
    with pytest.raises(ConfigError) as caught:
        processes.flower_spec(settings.app, sys.executable)
    assert caught.value.exit_code == 3 and "pip install flower" in str(caught.value.hint)


def test_another_users_process_with_our_marker_is_never_ours(project: Project) -> None:
    """A process of another local user that carries this project's marker and a process name (forged, or
    theirs): never listed by ps, never swept by dev, never stopped by `stop web`."""
    if os.getuid() != 0:
        pytest.skip("needs root to run a process as another user")
    from tlrun.config import project_id

    _stack(project)
    env = {
        "PATH": "/usr/bin:/bin",
        "TLRUN_PROJECT": project_id(project.root, project.app),
        "TLRUN_PROCESS": "web",
        "TL_CELERY_STARTED": "1:1.00",
    }
    theirs = subprocess.Popen(["sleep", "300"], cwd="/", env=env, user=65534, group=65534, start_new_session=True)
    try:
        wait_for(lambda: psutil.Process(theirs.pid).uids().real == 65534, 10, "the other user's process")
        assert not [r for r in _ps(project) if r["pid"] == theirs.pid]
        assert project.run("stop", "web").returncode == 19
        dev = project.launch("--only", "web", command="dev")
        dev.wait_output(r"tlrun: web ready on")
        assert "stray" not in dev.output() and theirs.poll() is None
        dev.send(signal.SIGINT)
        assert dev.wait(20) == 0
        assert theirs.poll() is None
    finally:
        theirs.kill()
        theirs.wait(5)
    assert not processes_under(project.base)


ESCAPER = """
import os, subprocess, time
if os.fork() == 0:  # a daemon: fork, a new session, fork again; the middle one exits at once
    os.setsid()
    if os.fork() == 0:
        with open("daemon.pid", "w") as fh:
            fh.write(str(os.getpid()))
        os.execvp("sleep", ["sleep", "1000"])
    os._exit(0)
# One that leaves its session with an empty environment: no marker of tlrun's left to find it by.
session = subprocess.Popen(["env", "-i", "setsid", "sleep", "1001"])
with open("session.pid", "w") as fh:
    fh.write(str(session.pid))
print("escaper up", flush=True)
while True:
    time.sleep(1)
"""


def test_processes_that_escape_their_session_are_listed_and_stopped_with_their_unit(project: Project) -> None:
    """A stack process that double-forks into a session of its own, and one that runs `env -i setsid`: both
    stay under the process's watchdog (a child subreaper), are listed by ps under the process, and are gone
    after the stop, not left for the next sweep."""
    (project.root / "escaper.py").write_text(ESCAPER)
    (project.root / "pyproject.toml").write_text(
        f"""[tool.tlrun]
app = "{project.app}"

[tool.tlrun.processes.escaper]
command = ["{sys.executable}", "escaper.py"]
ready = "escaper up"
grace = 3
"""
    )
    dev = project.launch("--only", "escaper", command="dev")
    dev.wait_output(r"tlrun: escaper ready")
    pids = [
        wait_for(lambda name=name: (project.root / name).exists() and (project.root / name).read_text(), 10, name)
        for name in ("daemon.pid", "session.pid")
    ]
    escaped = [int(p) for p in pids]
    wait_for(lambda: all(psutil.Process(p).name() == "sleep" for p in escaped), 10, "both sleeps to run")
    assert all(os.getsid(p) != os.getsid(dev.pid) for p in escaped)  # out of tlrun's session
    listed = {int(r["pid"]) for r in _ps(project)}
    for row in _ps(project):
        listed.update(int(p) for p in row.get("escaped") or [])
    assert set(escaped) <= listed, (escaped, _ps(project))
    dev.send(signal.SIGINT)
    assert dev.wait(30) == 0
    for pid in escaped:
        wait_for(
            lambda pid=pid: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
            5,
            f"{pid} gone",
        )
    assert not processes_under(project.base)
