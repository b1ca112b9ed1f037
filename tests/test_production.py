"""Production: restart with backoff, service units with the right stop semantics, metrics, Kubernetes."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from helpers import Project, Supervisord, send_task, wait_for

pytestmark = pytest.mark.timeout(120)
HOST = socket.gethostname()
READY = r"tlrun: \d+ workers? ready: (\S+) \(pid (\d+)\)"
ROOT = Path(__file__).resolve().parent.parent


def test_crashed_worker_is_restarted_with_growing_delays_then_given_up(project: Project) -> None:
    launched = project.launch(
        "--pool", "solo", "--restart", "--restart-delay", "0.3", "--give-up-crashes", "3", "--give-up-window", "120"
    )
    delays = []
    for crash in range(3):
        worker_pid = int(
            wait_for(lambda c=crash: re.findall(READY, launched.output())[c:], 40, f"worker start {crash + 1}")[0][1]
        )
        os.kill(worker_pid, signal.SIGKILL)
        if crash < 2:
            match = launched.wait_output(rf"status 137: restart {crash + 1} in ([\d.]+) s", 20)
            delays.append(float(match.group(1)))
    assert launched.wait(40) == 16
    assert "giving up on the worker after 3 crashes within 120 s" in launched.output()
    assert delays[0] >= 0.3 and delays[1] >= 2 * 0.3 and delays[1] > delays[0]
    # Same log file naming across restarts: one file, three starts.
    log = (project.root / "logs" / f"celery_worker_{launched.pid}.log").read_text()
    assert log.count(" ready.") == 3


def test_clean_stop_and_clean_exit_are_not_restarted(project: Project) -> None:
    launched = project.launch("--restart", "--restart-delay", "0.2")
    launched.wait_output(READY, 30)
    launched.send(signal.SIGINT)
    assert launched.wait(30) == 0
    assert "restart 1" not in launched.output()

    again = project.launch("--restart", "--restart-delay", "0.2")
    node = again.wait_output(READY, 30).group(1)
    from helpers import client

    client(project.broker_url).control.broadcast("shutdown", destination=[node])  # a clean exit of its own
    assert again.wait(30) == 0
    assert "restart 1" not in again.output()


def _export(project: Project, kind: str, *args: str) -> str:
    result = project.run("export", kind, "-A", project.app, "--grace", "40", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_exported_systemd_unit_stops_celery_correctly(project: Project) -> None:
    out = project.base / "units"
    result = project.run("export", "systemd", "-A", project.app, "--grace", "40", "--beat", "-o", str(out))
    assert result.returncode == 0, result.stderr
    units = sorted(out.iterdir())
    name = f"tlrun-{project.app}"
    assert [u.name for u in units] == [f"{name}-beat.service", f"{name}.service", f"{name}.target"]
    assert "warning: the units run as root (no --user)" in result.stderr
    # The target starts and stops the project's services together; each service is part of it.
    target = configparser.ConfigParser(strict=False, interpolation=None)
    target.read(out / f"{name}.target")
    assert target["Unit"]["Wants"] == f"{name}.service {name}-beat.service"
    beat_unit = (out / f"{name}-beat.service").read_text()
    assert "warm shutdown" not in beat_unit and "crashed worker" not in beat_unit  # the worker's comments
    assert f"PartOf={name}.target" in beat_unit
    with_user = project.run("export", "systemd", "-A", project.app, "--user", "nobody")
    assert with_user.returncode == 0 and "warning" not in with_user.stderr
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(out / f"tlrun-{project.app}.service")
    service = unit["Service"]
    assert service["KillMode"] == "mixed" and service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) > 40
    assert service["WorkingDirectory"] == str(project.root)
    # shlex.join quotes only what needs it: the interpreter path and the app name come out as they are.
    assert service["ExecStart"].startswith(f"{sys.executable} -m tlrun worker -A {project.app} ")
    assert "--restart" in service["ExecStart"] and "--grace 40" in service["ExecStart"]
    assert service["RestartPreventExitStatus"] == "16"
    # systemd learns readiness, reloads, stops and a wedged worker from tlrun itself (sd_notify).
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main" and service["WatchdogSec"] == "60"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert "ExecReload=/bin/kill -HUP $MAINPID" in beat_unit and "Type=notify" in beat_unit  # beat restarts
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    verify = subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True, timeout=60)
    problems = [line for line in verify.stderr.splitlines() if "tlrun-" in line]
    assert verify.returncode == 0 and not problems, verify.stderr


def test_exported_supervisor_program_and_procfile(project: Project) -> None:
    conf = configparser.ConfigParser(interpolation=None)
    conf.read_string(_export(project, "supervisor", "--beat"))
    program = conf[f"program:tlrun-{project.app}"]
    assert program["stopasgroup"] == "false" and program["killasgroup"] == "true"
    assert program["stopsignal"] == "TERM" and int(program["stopwaitsecs"]) > 40
    assert program["directory"] == str(project.root)
    assert f"program:tlrun-{project.app}-beat" in conf
    group = conf[f"group:tlrun-{project.app}"]
    assert group["programs"] == f"tlrun-{project.app},tlrun-{project.app}-beat"
    procfile = _export(project, "procfile", "--beat").splitlines()
    # Run in the project root, in the project's environment, by honcho or foreman: nothing absolute.
    assert procfile[0].startswith(f"worker: python -m tlrun worker -A {project.app} --grace 40 ")
    assert procfile[1] == f"beat: python -m tlrun beat -A {project.app} --grace 40"
    assert str(project.root) not in "\n".join(procfile) and sys.executable not in "\n".join(procfile)


def _metrics(text: str) -> dict[str, float]:
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


def test_prometheus_metrics_parse_and_report_a_duplicate(project: Project) -> None:
    other = project.other_project("elsewhere")
    try:
        twins = [other.hand_worker(f"twin@{HOST}", cwd=other.root) for _ in range(2)]
        for twin in twins:
            twin.wait_output("ready", 30)
        result = project.run("doctor", "-A", project.app, "--format", "prometheus", timeout=60)
        assert result.returncode == 9
        metrics = _metrics(result.stdout)
        assert metrics["tlrun_duplicate_node_names"] == 1
        assert metrics["tlrun_workers_answering"] == 2
        assert metrics["tlrun_workers_expected"] == 1
        assert metrics["tlrun_broker_up"] == 1 and metrics["tlrun_broker_connect_seconds"] >= 0
        assert metrics["tlrun_doctor_exit_code"] == 9
        textfile = project.base / "tlrun.prom"
        quiet = project.run("doctor", "-A", project.app, "--textfile", str(textfile), timeout=60)
        assert quiet.stdout == "" and _metrics(textfile.read_text())["tlrun_duplicate_node_names"] == 1
    finally:
        other.cleanup()


def test_kubernetes_example_is_valid_yaml() -> None:
    text = (ROOT / "docs" / "kubernetes.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    assert blocks
    for block in blocks:
        for doc in yaml.safe_load_all(block):
            assert doc["kind"] == "Deployment"
            container = doc["spec"]["template"]["spec"]["containers"][0]
            assert container["command"][:2] == ["tlrun", "worker"]  # tlrun as the container's PID 1
            assert container["readinessProbe"]["exec"]["command"][1] == "health"
            grace = int(container["command"][container["command"].index("--grace") + 1])
            assert doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > grace


def test_exported_supervisor_program_runs_under_a_real_supervisord(project: Project) -> None:
    """supervisord accepts the export of a fresh project, `supervisorctl stop` stops the worker warm while a
    task runs (the task finishes), and a launcher that gave up (exit 16) is not restarted."""
    sv = Supervisord(project, "-A", project.app, "--grace", "20")
    conf, ctl = sv.conf, sv.ctl
    program = f"tlrun-{project.app}"
    log = project.root / "logs" / f"supervisor-{program}.log"
    try:
        wait_for(lambda: log.exists() and "worker ready" in log.read_text(), 60, "the worker under supervisord")
        result = send_task(project.broker_url, f"{project.app}.sleep", 3)
        wait_for(lambda: "sleep[" in log.read_text(), 20, "the task to start")
        stop = subprocess.run([*ctl, "stop", program], capture_output=True, text=True, timeout=60)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert result.get(timeout=10) == 3  # finished during the warm stop, not killed
        assert "WorkerLostError" not in log.read_text()
        # A launcher that gives up (exit 16) stays down: --give-up-crashes 1, then crash the worker.
        conf.write_text(conf.read_text().replace(" --restart", " --restart --give-up-crashes 1"))
        subprocess.run([*ctl, "update"], capture_output=True, timeout=60, check=True)
        subprocess.run([*ctl, "start", program], capture_output=True, timeout=60)
        wait_for(lambda: log.read_text().count("worker ready") >= 2, 60, "the worker again")
        worker = int(re.findall(READY, log.read_text())[-1][1])
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: "giving up" in log.read_text(), 30, "tlrun to give up")

        def status() -> str:
            return subprocess.run([*ctl, "status", program], capture_output=True, text=True, timeout=30).stdout

        wait_for(lambda: "EXITED" in status(), 30, "supervisord to see the exit")
        assert "exit status 16" in status() or "EXITED" in status()
        assert log.read_text().count("worker ready") == 2  # not restarted
    finally:
        sv.shutdown()
