"""The journeys the README and the docs document, walked exactly as written: the container's command with tlrun
itself as PID 1 and its probes run inside that PID namespace, and the controls from a shell whose environment
is not the launcher's. Each test runs what the docs say, with real processes, on its own Redis."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from helpers import Launched, Project, Supervisord, ping_replies, send_task, wait_for
from test_units import run_task, write_code, write_roles

pytestmark = pytest.mark.timeout(240)
HOST = socket.gethostname()
READY = r"tlrun: \d+ workers? ready: (\S+) \(pid (\d+)\)"
BIN = Path(sys.executable).parent  # the environment's scripts: `tlrun` as a container's entrypoint runs it
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a PID namespace of its own needs root")
ROOT = Path(__file__).resolve().parent.parent


def _dockerfile_command() -> list[str]:
    """ENTRYPOINT plus CMD of examples/docker/Dockerfile, as docker joins them."""
    text = (ROOT / "examples" / "docker" / "Dockerfile").read_text()
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    return [*entry, *cmd]


def _dockerfile_env() -> dict[str, str]:
    text = (ROOT / "examples" / "docker" / "Dockerfile").read_text()
    block = re.search(r"^ENV (.*?)(?:\n\n|\n[A-Z]+ )", text, re.M | re.S).group(1)  # type: ignore[union-attr]
    return dict(re.findall(r"(\w+)=(\S+)", block.replace("\\\n", " ")))


def _kubernetes_probes() -> dict[str, list[str]]:
    """The exec commands of docs/kubernetes.md's readiness and liveness probes."""
    text = (ROOT / "docs" / "kubernetes.md").read_text()
    probes = {}
    for kind in ("readinessProbe", "livenessProbe"):
        block = text[text.index(kind) :]
        command = re.search(r"command: (\[.*?\])", block, re.S).group(1)  # type: ignore[union-attr]
        probes[kind] = json.loads(command)
    return probes


class Container:
    """tlrun as PID 1 of its own PID namespace (with its own /proc), started with the Dockerfile's command,
    and commands run inside that namespace as `docker exec` / the kubelet's exec probes run them."""

    def __init__(self, project: Project, env: dict[str, str]) -> None:
        self.project = project
        self.env = env
        entry, *args = _dockerfile_command()
        argv = ["unshare", "--pid", "--fork", "--mount-proc", str(BIN / entry), *args]
        self.launched = Launched(argv, project.root, env, project.base / f"container-{len(project.started)}.txt")
        project.started.append(self.launched)
        self.tlrun = wait_for(lambda: next(iter(psutil.Process(self.launched.pid).children()), None), 10, "PID 1")

    def exec(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """A command inside the namespace, in the container's working directory and environment."""
        enter = ["nsenter", "--target", str(self.tlrun.pid), "--pid", "--mount", f"--wd={self.project.root}"]
        program = argv[0] if argv[0] not in ("tlrun", "python") else str(BIN / argv[0])
        return subprocess.run(
            [*enter, program, *argv[1:]],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )


def _container_env(project: Project, grace: str) -> dict[str, str]:
    env = project.env(**_dockerfile_env())
    env.update(CELERY_APP=project.app, TLRUN_STOP_GRACE=grace)  # the image's own app is the example's
    return env


@needs_root
def test_container_pid1_answers_its_probes_reloads_and_stops_idle_with_0(project: Project) -> None:
    """The Dockerfile's command as PID 1; inside its namespace: the HEALTHCHECK, docs/kubernetes.md's two
    probes, `tlrun reload` (a new node answers), `ps` and `doctor`; then `docker stop`'s SIGTERM while idle
    with a grace of 5 s: exit 0 (an idle warm shutdown that outlasts the requeue margin is not killed by
    the requeue request)."""
    container = Container(project, _container_env(project, "5"))
    node = container.launched.wait_output(READY, 60).group(1)
    assert re.match(r"^api\d{9}@", node), node  # PID 1: a random number, not the pid
    probes = _kubernetes_probes()
    healthcheck = container.exec("tlrun", "health", "--liveness")
    assert healthcheck.returncode == 0, healthcheck.stdout + healthcheck.stderr
    for kind, command in probes.items():
        command = [c if c != "proj.celery" else project.app for c in command]
        probe = container.exec(*command)
        assert probe.returncode == 0, f"{kind}: {probe.stdout}{probe.stderr}"
    rows = json.loads(container.exec("tlrun", "ps", "--json").stdout)
    assert [(r["node"], r["launcher_pid"]) for r in rows if r.get("kind") == "worker"] == [(node, 1)], rows
    reload = container.exec("tlrun", "reload")
    assert reload.returncode == 0, reload.stdout + reload.stderr
    new = re.search(r"reloaded: (\S+) \(pid", reload.stdout).group(1)  # type: ignore[union-attr]
    wait_for(lambda: ping_replies(project.broker_url) == [new], 30, f"only {new} answering")
    doctor = container.exec("tlrun", "doctor")
    assert "ERROR" not in doctor.stdout and f"node {new} (this host" in doctor.stdout, doctor.stdout
    container.tlrun.send_signal(signal.SIGTERM)  # docker stop
    assert container.launched.wait(30) == 0, container.launched.output()
    assert "status 164" not in container.launched.output()


@needs_root
def test_container_pid1_stops_with_0_while_a_task_runs(project: Project) -> None:
    """`docker stop` while a task runs, grace 5: the task finishes within the grace, tlrun exits 0."""
    container = Container(project, _container_env(project, "5"))
    container.launched.wait_output(READY, 60)
    result = send_task(project.broker_url, f"{project.app}.sleep", 1.5)
    container.launched.wait_output(r"Task \S+\.sleep\[\S+\] received", 20)
    container.tlrun.send_signal(signal.SIGTERM)
    assert result.get(timeout=20) == 1.5
    assert container.launched.wait(30) == 0, container.launched.output()


def test_reload_stop_and_restart_from_a_shell_with_another_runtime_dir(project: Project, tmp_path: Path) -> None:
    """A launcher under a service manager and an operator's login shell have different XDG_RUNTIME_DIRs:
    `tlrun reload`, `tlrun stop NAME` and `tlrun restart NAME` from the login shell reach the launcher, and
    leave no request file behind in either runtime directory."""
    write_code(project, 1)
    write_roles(project, ["default", "slow"])
    service_env = project.env()
    launched = project.launch(app_arg=False, env=service_env)
    launched.wait_output(r"2 workers ready", 60)
    login = tmp_path / "login-run"
    login.mkdir(mode=0o700)
    shell = project.env(XDG_RUNTIME_DIR=str(login))
    write_code(project, 1, task_value=2)
    reload = project.run("reload", "--role", "slow", env=shell, timeout=60)
    assert reload.returncode == 0, reload.stdout + reload.stderr
    assert run_task(project, "task_value", queue="slow") == 2
    stop = project.run("stop", "slow", env=shell, timeout=60)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert launched.proc.poll() is None
    wait_for(lambda: not any(n.startswith("slow") for n in ping_replies(project.broker_url)), 30, "slow gone")
    restart = project.run("restart", "slow", env=shell, timeout=60)
    assert restart.returncode == 0, restart.stdout + restart.stderr
    wait_for(lambda: any(n.startswith("slow") for n in ping_replies(project.broker_url)), 30, "slow back")
    for folder in (login, project.runtime):
        assert not [p.name for p in folder.rglob("*") if p.name.endswith((".stop", ".reload", ".restart"))]
    launched.send(signal.SIGTERM)
    assert launched.wait(30) == 0


def test_a_late_requeue_request_never_kills_a_stopping_worker(project: Project) -> None:
    """The requeue request (a realtime signal whose default action ends a process) sent over and over to a
    worker from its warm shutdown until it has exited: the worker's handler, then its ignoring of the signal
    in Python's finalization (which puts every Python handler back to the default) keep it alive; the stop
    ends with status 0, never 128 + the signal (status 164, seen as PID 1 with grace 5)."""
    from tlrun.launch._child import REQUEUE_SIGNAL

    launched = project.launch("--concurrency", "1")
    worker = int(launched.wait_output(READY, 60).group(2))
    launched.send(signal.SIGTERM)
    while launched.proc.poll() is None:
        try:
            os.kill(worker, REQUEUE_SIGNAL)
        except ProcessLookupError:
            break
        try:
            launched.proc.wait(0.02)
        except subprocess.TimeoutExpired:
            pass
    assert launched.wait(30) == 0, launched.output()
    assert re.search(r"stopped \(status 0\)", launched.output()), launched.output()


def test_the_requeue_request_is_sent_only_to_a_process_that_handles_it(tmp_path: Path) -> None:
    from tlrun.launch import signals
    from tlrun.launch._child import REQUEUE_SIGNAL

    plain = subprocess.Popen(["sleep", "30"], start_new_session=True)
    handles = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import signal, time; signal.signal({REQUEUE_SIGNAL}, lambda *a: None); "
            "print('ready', flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert handles.stdout is not None and handles.stdout.readline() == b"ready\n"
        assert not signals.catches(plain.pid, REQUEUE_SIGNAL) and signals.catches(handles.pid, REQUEUE_SIGNAL)
        assert not signals.request_child(plain, REQUEUE_SIGNAL)  # type: ignore[arg-type]
        assert signals.request_child(handles, REQUEUE_SIGNAL)  # type: ignore[arg-type]
        assert plain.poll() is None and handles.poll() is None  # neither was ended by it
    finally:
        for proc in (plain, handles):
            proc.kill()
            proc.wait(10)
        assert handles.stdout is not None
        handles.stdout.close()


# -- the quick start, from a fresh clone -------------------------------------------------------------------------
def _readme_commands(section: str) -> list[list[str]]:
    """The shell commands of a README section's code blocks (indented by 4), comments dropped, one list a
    block: what a reader copies."""
    text = (ROOT / "README.md").read_text()
    body = text[text.index(f"## {section}\n") :].split("\n## ", 1)[0]
    blocks: list[list[str]] = []
    previous_blank = True
    for line in body.splitlines():
        if line.startswith("    ") and line.strip():
            command = line.strip().split("  #", 1)[0].strip()
            if previous_blank or not blocks:
                blocks.append([])
            blocks[-1].append(command)
            previous_blank = False
        else:
            previous_blank = True
    return blocks


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the repository under test as a git checkout")
@pytest.mark.timeout(420)
@pytest.mark.parametrize("shell", ["this", "system"])
def test_quick_start_from_a_fresh_clone(project: Project, shell: str) -> None:
    """The README's "Two commands", run as written in a fresh `git clone` of this repository: the install,
    `scripts/example.sh` (terminal 1), `scripts/example.sh send` (terminal 2) printing the task's result,
    then `.venv/bin/tlrun logs`, `ps` and `stop` without -A. The broker is this test's own Redis, given in
    the environment (which wins over .env, as the README says); everything else is the clone's."""
    blocks = _readme_commands("Two commands")
    assert blocks == [["scripts/example.sh", "scripts/example.sh send"], ["scripts/test.sh"]], blocks
    # scripts/test.sh is the suite itself: CI runs it (.ci/run), as the README says.
    assert "exec bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    (terminal1_command, terminal2_command), _suite = blocks
    clone = project.base / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=120)
    env = project.env()
    for key in ("VIRTUAL_ENV", "PYTHONPATH", "TEST_RESULT_BACKEND"):
        env.pop(key, None)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(BIN)))
    if shell == "system":  # a fresh login shell's PATH: the distribution's python3 (Debian 12: 3.11.2)
        env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
        if not shutil.which("python3", path=env["PATH"]) or not shutil.which("redis-server", path=env["PATH"]):
            pytest.skip("no python3 and redis-server in the system's PATH")
    terminal1 = Launched(["bash", "-c", terminal1_command], clone, env, project.base / "terminal1.txt")
    project.started.append(terminal1)
    terminal1.wait_output(READY, 300)  # the install, then tlrun dev
    assert "created .env from .env.example" in terminal1.output()

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, cwd=clone, env=env, capture_output=True, text=True, timeout=120)

    sent = run("bash", "-c", terminal2_command)
    assert sent.returncode == 0 and re.search(r"^add\(2, 3\) = 5 \(task \S+\)$", sent.stdout, re.M), (
        sent.stdout + sent.stderr
    )
    logs = run(".venv/bin/tlrun", "logs")
    assert logs.returncode == 0 and "ready." in logs.stdout, logs.stdout + logs.stderr
    ps = run(".venv/bin/tlrun", "ps")
    assert ps.returncode == 0 and re.search(r"worker\s+default\s+api\d+@", ps.stdout), ps.stdout + ps.stderr
    stop = run(".venv/bin/tlrun", "stop")
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert terminal1.wait(30) == 0, terminal1.output()


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the repository under test as a git checkout")
@pytest.mark.timeout(420)
def test_install_into_your_project_as_the_readme_says(project: Project) -> None:
    """The README's "Install into your project", as written, in a project of one's own with its own venv: the
    plain venv's install line from a fresh clone (`~/src/tlrun`: the test's HOME), then `tlrun init`, `tlrun
    dev` (Ctrl-C) and `tlrun worker` (SIGTERM) from the venv's bin on PATH, no -A anywhere."""
    blocks = _readme_commands("Install into your project")
    install, in_project = blocks
    assert install[0] == "git clone <this repository> ~/src/tlrun" and in_project == [
        "tlrun init",
        "tlrun dev",
        "tlrun worker",
    ]
    plain = next(line for line in install if line.startswith(".venv/bin/python -m pip install"))
    home = project.base / "home"
    (home / "src").mkdir(parents=True)
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(home / "src" / "tlrun")], check=True, timeout=120)
    subprocess.run([sys.executable, "-m", "venv", str(project.root / ".venv")], check=True, timeout=120)
    env = project.env(HOME=str(home))
    for key in ("VIRTUAL_ENV", "PYTHONPATH", "TEST_RESULT_BACKEND"):
        env.pop(key, None)
    system_path = [p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(BIN))]
    installed = subprocess.run(
        ["bash", "-c", plain], cwd=project.root, env=env, capture_output=True, text=True, timeout=300
    )
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    env["PATH"] = os.pathsep.join([str(project.root / ".venv" / "bin"), *system_path])  # the venv's bin first
    init = subprocess.run(
        ["bash", "-c", in_project[0]], cwd=project.root, env=env, capture_output=True, text=True, timeout=120
    )
    assert init.returncode == 0, init.stdout + init.stderr
    assert f'app = "{project.app}"' in (project.root / "pyproject.toml").read_text()
    for command, stop in ((in_project[1], signal.SIGINT), (in_project[2], signal.SIGTERM)):
        launched = Launched(["bash", "-c", f"exec {command}"], project.root, env, project.base / f"{command}.txt")
        project.started.append(launched)
        launched.wait_output(READY, 120)
        argv = psutil.Process(launched.pid).cmdline()
        assert argv[1] == str(project.root / ".venv" / "bin" / "tlrun"), argv  # the venv's own tlrun
        launched.send(stop)  # Ctrl-C in its terminal; a service manager's stop
        assert launched.wait(60) == 0, launched.output()[-3000:]


# -- the IDE configurations, run as the IDE runs them ------------------------------------------------------------
IDE_APP = """
from celery import Celery

app = Celery("{name}")
app.conf.beat_schedule = {{"tick": {{"task": "{name}.tick", "schedule": 1.0}}}}


@app.task
def tick():
    return 1
"""
WEB = """
import http.server
import os

import celery  # noqa: F401  the project's dependency: only its environment has it

server = http.server.ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), http.server.SimpleHTTPRequestHandler)
server.serve_forever()
"""
PROCFILE = """release: python -c "import celery, pathlib; pathlib.Path('released').write_text(celery.__version__)"
web: python web.py
"""


def _ide_project(project: Project) -> dict[str, str]:
    """A project with `beat = true`, a Procfile whose release and web lines run `python` (the project's
    dependencies), and the IDE files `tlrun ide` writes; the environment of an IDE started from the desktop:
    no activated virtual environment, the project's interpreter named by the configuration alone."""
    from helpers import free_port

    (project.root / f"{project.app}.py").write_text(IDE_APP.format(name=project.app))
    (project.root / "web.py").write_text(WEB)
    (project.root / "Procfile").write_text(PROCFILE)
    (project.root / "pyproject.toml").write_text(f'[tool.tlrun]\napp = "{project.app}"\nbeat = true\n')
    # honcho's ports: PORT, plus 100 per line (the web line is the second)
    (project.root / ".env").write_text(f"CELERY_BROKER_URL={project.broker_url}\nPORT={free_port() - 100}\n")
    env = project.env()
    for key in ("VIRTUAL_ENV", "CELERY_BROKER_URL", "PYTHONPATH"):
        env.pop(key, None)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(BIN)))
    for ide in ("pycharm", "vscode"):
        written = project.run("ide", ide, env=env)
        assert written.returncode == 0, written.stdout + written.stderr
    return env


def _pycharm_commands(root: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Each PyCharm configuration as the IDE runs it: the project interpreter (SDK_HOME empty) with `-m` and
    the module in MODULE_MODE, its PARAMETERS, its envs and ENV_FILES over the IDE's own environment."""
    import shlex
    import xml.etree.ElementTree as ET

    from dotenv import dotenv_values

    found = {}
    for path in sorted((root / ".run").glob("*.run.xml")):
        config = ET.parse(path).getroot().find("configuration")
        assert config is not None
        options = {o.get("name"): o.get("value") for o in config.findall("option")}
        assert options["SDK_HOME"] == "" and options["MODULE_MODE"] == "true", options
        assert options["WORKING_DIRECTORY"] == "$PROJECT_DIR$", options
        env = {e.get("name") or "": e.get("value") or "" for e in config.iter("env")}
        for env_file in (options.get("ENV_FILES") or "").split(";"):
            if env_file:
                env.update({k: v or "" for k, v in dotenv_values(env_file.replace("$PROJECT_DIR$", str(root))).items()})
        argv = [sys.executable, "-m", options["SCRIPT_NAME"] or "", *shlex.split(options["PARAMETERS"] or "")]
        found[config.get("name") or path.name] = (argv, env)
    return found


def test_the_ide_configurations_match_between_pycharm_and_vscode(project: Project) -> None:
    """The three configurations the docs name exist for both IDEs, with the same command lines (the test
    below runs PyCharm's)."""
    _ide_project(project)
    pycharm = {name: argv[2:] for name, (argv, _env) in _pycharm_commands(project.root).items()}
    launch = json.loads((project.root / ".vscode" / "launch.json").read_text())
    vscode = {c["name"]: [c["module"], *c["args"]] for c in launch["configurations"]}
    assert pycharm == vscode and sorted(pycharm) == ["tlrun dev", "tlrun dev (debug)", "tlrun dev (reload)"]


@pytest.mark.parametrize("config", ["tlrun dev", "tlrun dev (reload)", "tlrun dev (debug)"])
def test_an_ide_configuration_runs_the_whole_stack_without_an_activated_venv(project: Project, config: str) -> None:
    """Run from the generated file: the release line ran once with the project's python, web answers, beat
    holds the cluster lease (debug mode too), `ps` shows the worker alive, `ps` and `doctor` print no
    traceback into the run's console, and the IDE's Stop (SIGINT) leaves nothing."""
    import urllib.request

    ide_env = _ide_project(project)
    argv, config_env = _pycharm_commands(project.root)[config]
    launched = Launched(argv, project.root, {**ide_env, **config_env}, project.base / "ide-run.txt")
    project.started.append(launched)
    port = launched.wait_output(r"web ready on http://127\.0\.0\.1:(\d+)", 60).group(1)
    launched.wait_output(r"beat lease taken", 60)
    launched.wait_output(r"1 worker ready", 60)
    assert (project.root / "released").read_text().startswith("5."), launched.output()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as answer:
        assert answer.status == 200
    rows = json.loads(project.run("ps", "--json", env=ide_env).stdout)
    workers = [r for r in rows if r.get("kind") == "worker"]
    assert len(workers) == 1 and workers[0]["state"] != "gone" and workers[0]["rss_bytes"] > 0, rows
    assert {r["kind"] for r in rows} >= {"worker", "beat", "process"}, rows
    doctor = project.run("doctor", env=ide_env)
    assert "BEAT_WITHOUT_LEASE" not in doctor.stdout and "BEAT_LEASE" in doctor.stdout, doctor.stdout
    launched.send(signal.SIGINT)  # the IDE's Stop
    assert launched.wait(60) in (0, 130), launched.output()
    out = launched.output()
    assert "Traceback" not in out and "KeyError" not in out and "crashed" not in out, out
    assert out.count("release: done") == 1


def test_a_failing_release_line_stops_the_start(project: Project) -> None:
    """Heroku's release phase: a `release` line that fails ends `tlrun dev` with exit 21 before any process
    starts or any worker connects; nothing is left running."""
    (project.root / "Procfile").write_text("release: echo migrating && exit 3\nweb: sleep 600\n")
    launched = project.launch(command="dev")
    assert launched.wait(60) == 21, launched.output()
    out = launched.output()
    assert "[release] migrating" in out and "the release command failed (status 3)" in out, out
    assert "starting web" not in out and "ready" not in out, out
    assert ping_replies(project.broker_url) == []


# -- exported services, run the way their comments say ----------------------------------------------------------
def test_exported_supervisor_programs_take_the_signal_their_comment_names(project: Project) -> None:
    """`tlrun export supervisor` for two roles and beat under a real supervisord: each program is sent exactly
    the command its comment names (`supervisorctl signal HUP NAME`), and every program is RUNNING afterwards
    under the same pid: the workers swapped to new code, beat started again with a changed schedule (it used
    to exit 0, which `exitcodes=0,16` counts as expected, so that supervisord never restarted it)."""
    import shlex

    write_code(project, 1)
    write_roles(project, ["default", "slow"], beat=True)
    sv = Supervisord(project, "--grace", "20")
    conf, ctl = sv.conf.read_text(), sv.ctl
    said = dict(re.findall(r"^\[program:(\S+)\]\n(?:.*\n)*?; .*?: (supervisorctl signal HUP \S+)", conf, re.M))

    def status() -> dict[str, tuple[str, str]]:
        out = subprocess.run([*ctl, "status"], capture_output=True, text=True, timeout=30).stdout
        rows = [line.split() for line in out.splitlines() if line.strip()]
        return {r[0]: (r[1], r[3].rstrip(",") if len(r) > 3 else "") for r in rows}

    def beat_starts() -> int:
        return sum(
            p.read_text(errors="replace").count("beat: Starting") for p in project.root.glob("logs/celery_beat_*.log")
        )

    try:
        wait_for(lambda: len(status()) == 3 and {s for s, _p in status().values()} == {"RUNNING"}, 60, "3 RUNNING")
        wait_for(lambda: len(ping_replies(project.broker_url)) == 2 and beat_starts() == 1, 60, "workers and beat")
        before = status()
        assert len(said) == 3, conf
        write_code(project, 1, task_value=2)
        for command in said.values():  # exactly as the comment says, with this supervisord's configuration
            sent = subprocess.run([*ctl, *shlex.split(command)[1:]], capture_output=True, text=True, timeout=30)
            assert sent.returncode == 0 and "ERROR" not in sent.stdout, command + ": " + sent.stdout + sent.stderr
        wait_for(lambda: beat_starts() == 2, 60, "beat started again")
        wait_for(lambda: run_task(project, "task_value", queue="slow") == 2, 60, "the new code in role slow")
        # Each role is a program of its own, reloaded on its own signal: one may finish after the other.
        wait_for(lambda: run_task(project, "task_value") == 2, 60, "the new code in role default")
        wait_for(lambda: len(ping_replies(project.broker_url)) == 2, 60, "one worker per role again")
        assert status() == before, (before, status())  # RUNNING, same pids: nothing exited
    finally:
        sv.shutdown()


def test_exported_systemd_units_run_and_reload_as_written(project: Project) -> None:
    """Each exported unit's ExecStart run as written in its WorkingDirectory, then its ExecReload
    (`/bin/kill -HUP $MAINPID`) against that live launcher: the worker's next generation answers, beat
    starts again; both launchers keep running, and stop with 0 on systemd's SIGTERM."""
    import configparser
    import shlex

    out = project.base / "units"
    exported = project.run("export", "systemd", "-A", project.app, "--grace", "10", "--beat", "-o", str(out))
    assert exported.returncode == 0, exported.stderr
    started = {}
    for path in sorted(out.glob("*.service")):
        unit = configparser.ConfigParser(strict=False, interpolation=None)
        unit.read(path)
        service = unit["Service"]
        argv = shlex.split(service["ExecStart"])
        launched = Launched(argv, Path(service["WorkingDirectory"]), project.env(), project.base / f"{path.name}.txt")
        project.started.append(launched)
        started[path.name] = (launched, service["ExecReload"])
    worker, worker_reload = started[f"tlrun-{project.app}.service"]
    beat, beat_reload = started[f"tlrun-{project.app}-beat.service"]
    old = worker.wait_output(READY, 60).group(1)
    beat.wait_output(r"beat lease taken", 60)
    for launched, reload in ((worker, worker_reload), (beat, beat_reload)):
        command = shlex.split(reload.replace("$MAINPID", str(launched.pid)))
        assert command[:2] == ["/bin/kill", "-HUP"], reload
        subprocess.run(command, check=True, timeout=10)
    new = worker.wait_output(r"reloaded: .*?new worker (\S+)", 60).group(1)
    wait_for(lambda: ping_replies(project.broker_url) == [new], 30, f"only {new} answering (was {old})")
    wait_for(
        lambda: beat.output().count("beat: Starting") >= 2 or beat.output().count("starting beat") >= 2,
        30,
        "beat again",
    )
    assert worker.proc.poll() is None and beat.proc.poll() is None
    for launched in (worker, beat):
        launched.send(signal.SIGTERM)
        assert launched.wait(30) == 0, launched.output()


def test_tlrun_reload_restarts_a_running_tlrun_beat(project: Project) -> None:
    """`tlrun reload` reaches a `tlrun beat` launcher too (a changed beat_schedule is its new code)."""
    beat = project.launch(command="beat")
    beat.wait_output(r"beat lease taken", 60)
    done = project.run("reload")
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"role beat of launcher pid \d+ reloaded: beat \(pid \d+\) started again", done.stdout)
    wait_for(lambda: beat.output().count("starting beat") >= 2, 30, "beat started again")
    assert beat.proc.poll() is None
    beat.send(signal.SIGTERM)
    assert beat.wait(30) == 0, beat.output()
