"""The journeys the README and the docs document, walked exactly as written: the container's command with tlrun
itself as PID 1 and its probes run inside that PID namespace, and the controls from a shell whose environment
is not the launcher's. Each test runs what the docs say, with real processes, on its own Redis."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from helpers import Launched, Project, ping_replies, send_task, wait_for
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


# -- the quick start, from a fresh clone -------------------------------------------------------------------------
@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs the repository under test as a git checkout")
@pytest.mark.timeout(420)
def test_quick_start_from_a_fresh_clone(project: Project) -> None:
    """The README's "Two commands", run as written in a fresh `git clone` of this repository: the install,
    `scripts/example.sh` (terminal 1), `scripts/example.sh send` (terminal 2) printing the task's result,
    then `.venv/bin/tlrun logs`, `ps` and `stop` without -A. The broker is this test's own Redis, given in
    the environment (which wins over .env, as the README says); everything else is the clone's."""
    clone = project.base / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=120)
    env = project.env()
    for key in ("VIRTUAL_ENV", "PYTHONPATH", "TEST_RESULT_BACKEND"):
        env.pop(key, None)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if not p.startswith(str(BIN)))
    terminal1 = Launched(["bash", "scripts/example.sh"], clone, env, project.base / "terminal1.txt")
    project.started.append(terminal1)
    terminal1.wait_output(READY, 300)  # the install, then tlrun dev
    assert "created .env from .env.example" in terminal1.output()

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, cwd=clone, env=env, capture_output=True, text=True, timeout=120)

    sent = run("bash", "scripts/example.sh", "send")
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
