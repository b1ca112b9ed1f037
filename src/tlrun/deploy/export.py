"""Service configuration that runs `tlrun worker` (and beat) for this project, with stop semantics that keep
running tasks: SIGTERM to the launcher only (it gives the worker a warm shutdown), SIGKILL to everything
only after a timeout longer than tlrun's grace period. Pure rendering; the CLI prints or writes it.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from tlrun.config import Role, Settings
from tlrun.errors import ConfigError, RestartGiveUpError
from tlrun.project.processes import ProcessSpec

STOP_MARGIN = 15  # seconds the service manager waits beyond tlrun's grace before it kills
PROCESS_BASE_PORT = 8000  # a process whose port is "auto" in dev gets 8000 + 100 per process in a service


APP_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*(:[A-Za-z_][A-Za-z0-9_]*)?$")
USER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")


@dataclass(frozen=True)
class Service:
    """One unit, program or Procfile line: a role's worker, beat, or a process of the stack."""

    name: str  # unit / program name
    procfile_type: str
    what: str  # for the description: "worker", "worker (role reports)", "beat", "process web"
    command: str
    process: ProcessSpec | None = None  # a stack's process: run as it is (no tlrun), stopped as a group
    port: int | None = None
    procfile_line: str | None = None  # its Procfile command (a Procfile's own line, or the command joined)


@dataclass(frozen=True)
class ServiceSpec:
    project_root: Path
    app: str
    python: str
    grace: float
    roles: tuple[Role, ...]
    log_dir: Path
    beat: bool = False
    user: str | None = None
    pass_log_dir: bool = False  # --log-dir was given to export: the services use it too
    watchdog_sec: int = 60  # systemd's WatchdogSec (tlrun pings its workers and sends WATCHDOG=1); 0: none
    processes: tuple[ProcessSpec, ...] = ()  # the stack's processes: one service or program each

    @property
    def name(self) -> str:
        return "tlrun-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in self.app)

    @property
    def stop_timeout(self) -> int:
        return int(self.grace) + STOP_MARGIN

    def command(self, what: str, *extra: str, relative: bool = False) -> str:
        """The service's command line; `relative` (a Procfile, run in the project root by its runner, in the
        project's environment): `python -m tlrun` and paths relative to the root."""
        python = "python" if relative else self.python
        argv = [python, "-m", "tlrun", what, "-A", self.app]
        if not relative:
            argv += ["--project-dir", str(self.project_root)]
        if self.pass_log_dir:
            log_dir = self.log_dir
            if relative and log_dir.is_relative_to(self.project_root):
                log_dir = log_dir.relative_to(self.project_root)
            argv += ["--log-dir", str(log_dir)]
        return shlex.join([*argv, "--grace", f"{self.grace:g}", *extra])

    def services(self, relative: bool = False) -> list[Service]:
        """One service per role (the implicit single role keeps the plain name), plus beat when asked."""
        out = []
        for role in self.roles:
            if role.declared:
                cmd = self.command("worker", "--role", role.name, "--restart", relative=relative)
                out.append(Service(f"{self.name}-{role.name}", role.name, f"worker (role {role.name})", cmd))
            else:
                cmd = self.command("worker", "--node-prefix", role.node_prefix, "--restart", relative=relative)
                out.append(Service(self.name, "worker", "worker", cmd))
        if self.beat:
            out.append(Service(f"{self.name}-beat", "beat", "beat", self.command("beat", relative=relative)))
        for i, proc in enumerate(self.processes):
            port = proc.port if proc.port is not None else (PROCESS_BASE_PORT + 100 * i if proc.auto_port else None)
            shell = proc.argv[2] if proc.argv[:2] == ("sh", "-c") and len(proc.argv) == 3 else None
            argv = proc.command(port)
            if not relative and argv[0] in ("python", "python3"):  # the project's interpreter, as tlrun's
                argv = [self.python, *argv[1:]]
            assign = [f"{k}={shlex.quote(v)}" for k, v in proc.env.items() if k != "PORT"]
            line = shell if shell is not None else " ".join([*assign, shlex.join(argv)])
            command = shlex.join(["/bin/sh", "-c", shell]) if shell is not None else shlex.join(argv)
            out.append(
                Service(f"{self.name}-{proc.name}", proc.name, f"{proc.kind} {proc.name}", command, proc, port, line)
            )
        return out


def spec_for(
    settings: Settings,
    beat: bool = False,
    user: str | None = None,
    python: str | None = None,
    pass_log_dir: bool = False,
    watchdog_sec: int = 60,
) -> ServiceSpec:
    """Validate every value that goes into a unit, a program or a Procfile line, then build the spec."""
    if not APP_RE.match(settings.app):
        raise ConfigError(
            f"app {settings.app[:80]!r} is not a dotted module path (with an optional :attribute)",
            hint="e.g. -A proj.celery or -A proj.celery:app",
        )
    if user is not None and not USER_RE.match(user):
        raise ConfigError(f"--user {user[:40]!r} is not a user name")
    for path in (settings.project_root, settings.log_dir):
        if any(ch in str(path) for ch in "\n\r\0%;"):
            raise ConfigError(f"{str(path)[:80]!r} has a character a unit or program line cannot hold")
    for proc in settings.processes:
        values = [*proc.argv, *proc.env, *proc.env.values(), proc.cwd or ""]
        if any(ch in value for value in values for ch in "\n\r\0"):
            raise ConfigError(f"process {proc.name}: a line break or NUL byte cannot go into a unit or program")
    return ServiceSpec(
        settings.project_root,
        settings.app,
        python or sys.executable,
        settings.stop_grace,
        settings.roles,
        settings.log_dir,
        beat,
        user,
        pass_log_dir,
        watchdog_sec,
        settings.processes,
    )


def _process_env(spec: ServiceSpec, service: Service) -> dict[str, str]:
    """Its own variables, PORT, and PATH with the project's environment first (`npm`, `python` in a shell line)."""
    assert service.process is not None
    env = {"PATH": f"{Path(spec.python).parent}:/usr/local/bin:/usr/bin:/bin", **service.process.env}
    if service.port is not None:
        env["PORT"] = str(service.port)
    return env


def _systemd_process(spec: ServiceSpec, service: Service) -> str:
    """A stack's process as a plain service: run as it is, stopped as a whole group with its stop signal."""
    proc = service.process
    assert proc is not None
    user = f"User={spec.user}\n" if spec.user else ""
    env = "".join(f"Environment={shlex.quote(f'{k}={v}')}\n" for k, v in _process_env(spec, service).items())
    workdir = spec.project_root / proc.cwd if proc.cwd else spec.project_root
    # systemd expands $VAR and %x in ExecStart: doubled, the command reaches the process (or its shell) as written.
    command = service.command.replace("%", "%%").replace("$", "$$")
    return f"""# {service.name}.service, generated by `tlrun export systemd` from {proc.source or "the project file"}.
[Unit]
Description={service.what} of Celery app {spec.app} ({spec.project_root})
After=network-online.target
PartOf={spec.name}.target

[Service]
Type=simple
{user}WorkingDirectory={workdir}
{env}ExecStart={command}
# Stop: {proc.stop_signal} to every process of the service, SIGKILL after {proc.grace:g} s.
KillMode=control-group
KillSignal={proc.stop_signal}
TimeoutStopSec={int(proc.grace) + 1}
Restart=on-failure
RestartSec=2

[Install]
WantedBy=multi-user.target {spec.name}.target
"""


def _systemd_unit(spec: ServiceSpec, service: Service) -> str:
    if service.process is not None:
        return _systemd_process(spec, service)
    user = f"User={spec.user}\n" if spec.user else ""
    watchdog = f"WatchdogSec={spec.watchdog_sec}\n" if spec.watchdog_sec > 0 else ""
    what = service.what
    if service.procfile_type == "beat":
        stop = (
            "# Stop: SIGTERM to tlrun only (it stops beat, which saves its schedule), SIGKILL to the whole cgroup\n"
            f"# only after TimeoutStopSec, which is longer than tlrun's grace period ({spec.grace:g} s).\n"
        )
        restart = (
            "# systemd restarts a beat that exited with an error; tlrun holds one beat per project and host.\n"
            "# systemctl reload: beat starts again with the beat_schedule now on disk (the old one saves its\n"
            "# schedule first); under the lease, never two beats. tlrun says RELOADING=1, then READY=1.\n"
            "ExecReload=/bin/kill -HUP $MAINPID\n"
        )
    else:
        stop = (
            "# Stop: SIGTERM to tlrun only (it gives the worker a warm shutdown: running tasks finish), SIGKILL\n"
            "# to the whole cgroup only after TimeoutStopSec, which is longer than tlrun's grace period "
            f"({spec.grace:g} s).\n"
        )
        restart = (
            "# tlrun restarts a crashed worker itself (--restart); systemd restarts tlrun, except when tlrun gave up.\n"
            "# systemctl reload: new code without downtime (each role's next worker imports it beside the old one,\n"
            "# which then stops fetching and finishes its tasks); tlrun says RELOADING=1, then READY=1.\n"
            "ExecReload=/bin/kill -HUP $MAINPID\n"
        )
    return f"""# {service.name}.service, generated by `tlrun export systemd`.
# tlrun reads {spec.project_root}/.env itself (python-dotenv rules); variables set here win over it.
[Unit]
Description=tlrun {what} for Celery app {spec.app} ({spec.project_root})
After=network-online.target redis-server.service rabbitmq-server.service
Wants=network-online.target
# {spec.name}.target starts and stops the project's services together.
PartOf={spec.name}.target

[Service]
# tlrun says READY=1 once its workers answered their own pings (not at fork), STOPPING=1 at a stop, and
# WATCHDOG=1 only while every worker answers: a wedged worker gets the service restarted.
Type=notify
NotifyAccess=main
{watchdog}{user}WorkingDirectory={spec.project_root}
ExecStart={service.command}
{stop}KillMode=mixed
KillSignal=SIGTERM
TimeoutStopSec={spec.stop_timeout}
SendSIGKILL=yes
{restart}Restart=on-failure
RestartSec=5
RestartPreventExitStatus={RestartGiveUpError.exit_code}

[Install]
WantedBy=multi-user.target {spec.name}.target
"""


def _systemd_target(spec: ServiceSpec, services: list[Service]) -> str:
    wants = " ".join(f"{s.name}.service" for s in services)
    return f"""# {spec.name}.target, generated by `tlrun export systemd`: every service of the project at once.
#   systemctl start {spec.name}.target    systemctl stop {spec.name}.target
[Unit]
Description=tlrun services for Celery app {spec.app} ({spec.project_root})
Wants={wants}

[Install]
WantedBy=multi-user.target
"""


def systemd(spec: ServiceSpec) -> dict[str, str]:
    """File name -> unit text: one unit per role's worker, beat's when asked, and a target for them all."""
    services = spec.services()
    units = {f"{service.name}.service": _systemd_unit(spec, service) for service in services}
    units[f"{spec.name}.target"] = _systemd_target(spec, services)
    return units


def _supervisor_process(spec: ServiceSpec, service: Service) -> str:
    proc = service.process
    assert proc is not None
    user = f"user={spec.user}\n" if spec.user else ""
    env = ",".join(f'{k}="{v}"' for k, v in _process_env(spec, service).items()).replace("%", "%%")
    workdir = spec.project_root / proc.cwd if proc.cwd else spec.project_root
    return f"""[program:{service.name}]
command={service.command.replace("%", "%%")}
directory={workdir}
{user}{f"environment={env}{chr(10)}" if env else ""}autostart=true
autorestart=unexpected
; a process of the stack (not Celery): its stop signal to the whole group, SIGKILL after its grace.
stopsignal={proc.stop_signal.removeprefix("SIG")}
stopasgroup=true
killasgroup=true
stopwaitsecs={int(proc.grace) + 1}
redirect_stderr=true
stdout_logfile={spec.log_dir}/supervisor-{service.name}.log
"""


def _supervisor_program(spec: ServiceSpec, service: Service) -> str:
    if service.process is not None:
        return _supervisor_process(spec, service)
    name = service.name
    user = f"user={spec.user}\n" if spec.user else ""
    # supervisord expands %(...)s in values: a literal % must be doubled.
    command = service.command.replace("%", "%%")
    reload = (
        "a changed beat_schedule: supervisorctl signal HUP {name} (beat starts again with it; it keeps running)"
        if service.procfile_type == "beat"
        else "new code without downtime: supervisorctl signal HUP {name}"
    ).format(name=f"{spec.name}:{name}")  # the program is in the project's group: supervisorctl names it so
    return f"""[program:{name}]
command={command}
; {reload}
directory={spec.project_root}
{user}autostart=true
; tlrun restarts a crashed worker itself; supervisord restarts tlrun, except when tlrun gave up (exit 16).
autorestart=unexpected
exitcodes=0,{RestartGiveUpError.exit_code}
; tlrun gives up (16) only after a worker was ready: longer than startsecs, so 16 is final, while
; an immediate failure (a configuration error) still counts as a failed start and is retried startretries times.
startsecs=1
; SIGTERM to tlrun only: stopasgroup=true would send it to the prefork pool children, which die mid-task
; (WorkerLostError). killasgroup=true: after stopwaitsecs, SIGKILL reaches the whole group.
stopsignal=TERM
stopasgroup=false
killasgroup=true
stopwaitsecs={spec.stop_timeout}
redirect_stderr=true
stdout_logfile={spec.log_dir}/supervisor-{name}.log
"""


def supervisor(spec: ServiceSpec) -> dict[str, str]:
    services = spec.services()
    programs = "\n".join(_supervisor_program(spec, service) for service in services)
    group = (
        f"\n; every program of the project at once: supervisorctl start|stop {spec.name}:*\n"
        f"[group:{spec.name}]\nprograms={','.join(s.name for s in services)}\n"
    )
    return {f"{spec.name}.conf": "; generated by `tlrun export supervisor`\n" + programs + group}


def procfile(spec: ServiceSpec) -> dict[str, str]:
    """Run by honcho, foreman or overmind in the project root, in the project's environment: relative paths."""
    lines = [
        f"{service.procfile_type}: {service.procfile_line or service.command}"
        for service in spec.services(relative=True)
    ]
    return {"Procfile": "\n".join(lines) + "\n"}


RENDERERS = {"systemd": systemd, "supervisor": supervisor, "procfile": procfile}
