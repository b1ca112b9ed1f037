"""Setting a project up: init, ide, export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from tlrun.cli.base import (
    ROLE_OPTION,
    _settings,
    cli,
    handle_errors,
    project_options,
)


@cli.command()
@click.option("-A", "--app", help="Celery app (default: found in the project, as every command finds it).")
@click.option(
    "--project-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Project root (default: the nearest folder up from here with pyproject.toml, manage.py or .git).",
)
@click.option("--force", is_flag=True, help="Replace an existing [tool.tlrun] table.")
@handle_errors
def init(app: str | None, project_dir: Path | None, force: bool) -> None:
    """Write [tool.tlrun] into pyproject.toml: the app, and one worker role per queue the app routes to.

    Other tables and comments are kept. Creates .env from .env.example when there is none. Afterwards
    `tlrun dev`, `tlrun ps`, `tlrun stop` and `tlrun doctor` need no arguments.
    """
    from tlrun.cli.base import in_project_env
    from tlrun.project.init import init_project
    from tlrun.project.layout import find_root

    in_project_env(project_dir)
    root = project_dir.resolve() if project_dir is not None else find_root(Path.cwd())
    result = init_project(root, app, force, Path.cwd().resolve())
    if result.found:
        click.echo(f"tlrun: using app {result.app} ({result.found})")
    for warning in result.warnings:
        click.echo(f"tlrun: warning: {warning}", err=True)
    if result.source:
        click.echo(f"tlrun: the code lives in {result.source}/ (source = {result.source!r})")
    if result.beat_why:
        click.echo(f"tlrun: beat = true: {result.beat_why}")
    if result.note:
        click.echo(f"tlrun: warning: {result.note}", err=True)
    roles = ", ".join(f"{name} ({', '.join(queues)})" for name, queues in result.roles)
    verb = "created" if result.created else "wrote [tool.tlrun] into"
    click.echo(f"tlrun: {verb} {result.pyproject}: app {result.app}, beat {str(result.beat).lower()}, roles {roles}")
    if result.dotenv is not None:
        click.echo(f"tlrun: created {result.dotenv} from .env.example")


@cli.command()
@click.argument("editor", type=click.Choice(["pycharm", "vscode"]))
@project_options
@click.option("--force", is_flag=True, help="Overwrite configurations you have edited.")
@handle_errors
def ide(editor: str, force: bool, **params: Any) -> None:
    """Write run configurations: PyCharm's .run/*.run.xml or VS Code's .vscode/launch.json.

    Three entries, "tlrun dev", "tlrun dev (reload)" and "tlrun dev (debug)", run the module tlrun in the
    project root with the .env loaded. They name the app (-A) only when it was given here and the project
    file does not say it. Files you edited are kept unless --force.
    """
    from tlrun.dev import ide as ide_mod
    from tlrun.project import file as project_file

    given = params.get("app")
    settings = _settings(params)
    in_file = "app" in project_file.load(settings.project_root).values
    writer = ide_mod.write_pycharm if editor == "pycharm" else ide_mod.write_vscode
    for written in writer(settings.project_root, given if given and not in_file else None, force):
        click.echo(f"tlrun: {written.path.relative_to(settings.project_root)}: {written.action}")


def _kube_options(func: Any) -> Any:
    """The options of `tlrun export kubernetes` (an error with any other kind)."""
    options = [
        click.option("--image", help="kubernetes: the image the pods run (the project and tlrun installed)."),
        click.option("--namespace", help="kubernetes: the namespace of every resource."),
        click.option("--workdir", default="/app", show_default=True, help="kubernetes: the project in the image."),
        click.option(
            "--broker-secret", help="kubernetes: NAME/KEY of the Secret with the broker URL [<name>-broker/url]."
        ),
        click.option(
            "--replicas", type=click.IntRange(min=0), default=1, show_default=True, help="kubernetes: pods per role."
        ),
        click.option(
            "--metrics-port",
            type=click.IntRange(1, 65535),
            help="kubernetes: serve metrics on this port in every pod, with a Service and a ServiceMonitor.",
        ),
        click.option(
            "--keda", is_flag=True, help="kubernetes: a KEDA ScaledObject per role (queued + active per worker)."
        ),
        click.option(
            "--min-replicas", type=click.IntRange(min=0), default=0, show_default=True, help="kubernetes, --keda."
        ),
        click.option(
            "--max-replicas", type=click.IntRange(min=1), default=10, show_default=True, help="kubernetes, --keda."
        ),
        click.option("--prometheus-url", help="kubernetes, --keda: the Prometheus KEDA queries."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


_KUBE_DEFAULTS = {"workdir": "/app", "replicas": 1, "keda": False, "min_replicas": 0, "max_replicas": 10}


@cli.command("export")
@click.argument("kind", type=click.Choice(["systemd", "supervisor", "procfile", "kubernetes"]))
@project_options
@ROLE_OPTION
@click.option("--node-prefix", help="Node name prefix (default api).")
@click.option("--log-dir", type=click.Path(file_okay=False), help="Where supervisord writes tlrun's output.")
@click.option(
    "--beat/--no-beat", default=None, help="Also run beat (a unit or program of its own; default: the project file)."
)
@click.option("--user", help="Run as this user (systemd User=, supervisor user=).")
@click.option(
    "--watchdog-sec",
    type=click.IntRange(min=0),
    default=60,
    show_default=True,
    help="systemd WatchdogSec: tlrun sends WATCHDOG=1 only while every worker answers its ping (0: none).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write the file(s) into this directory instead of printing.",
)
@_kube_options
@handle_errors
def export_cmd(
    kind: str, beat: bool | None, user: str | None, watchdog_sec: int, output: Path | None, **params: Any
) -> None:
    """Service configuration that runs tlrun for this project and stops Celery the right way: one
    service per worker role, plus beat.

    systemd: Type=notify (READY once the workers answer, WATCHDOG=1 while they do, ExecReload for new code
    without downtime), KillMode=mixed with TimeoutStopSec above the grace period; supervisor: stopasgroup=false,
    killasgroup=true, stopwaitsecs above the grace period; procfile: one line per process; kubernetes: a
    Deployment and a PodDisruptionBudget per role and for beat, tlrun as PID 1 with its probes, optionally
    metrics (Service, ServiceMonitor) and KEDA autoscaling (a kustomization.yaml with -o).
    """
    from tlrun.deploy import export

    kube = {
        k: params.pop(k)
        for k in (*_KUBE_DEFAULTS, "image", "namespace", "broker_secret", "metrics_port", "prometheus_url")
    }
    if kind != "kubernetes":
        given = [k for k, v in kube.items() if v is not None and v != _KUBE_DEFAULTS.get(k)]
        if given:
            from tlrun.errors import UsageError

            raise UsageError(f"--{given[0].replace('_', '-')} is an option of `tlrun export kubernetes` only")

    log_dir = params.get("log_dir")
    settings = _settings(params)
    spec = export.spec_for(
        settings,
        beat=settings.beat if beat is None else beat,
        user=user,
        pass_log_dir=log_dir is not None,
        watchdog_sec=watchdog_sec,
    )
    if kind == "kubernetes":
        _export_kubernetes(spec, kube, output)
        return
    if kind in ("systemd", "supervisor") and user is None:
        # As Celery warns when it runs as root: a task, or a message on the broker, can do anything there.
        click.echo(
            f"tlrun: warning: the {'units' if kind == 'systemd' else 'programs'} run as root (no --user): "
            "a task can do anything to this machine; pass --user NAME",
            err=True,
        )
    if kind == "supervisor":  # supervisord refuses a program whose stdout_logfile's directory is missing
        from tlrun.launch.logfiles import check_log_dir

        check_log_dir(settings.log_dir)
    files = export.RENDERERS[kind](spec)
    for name, text in files.items():
        if output is None:
            click.echo(text, nl=False)
        else:
            from tlrun import safefile

            safefile.write_atomic(output / name, text)
            click.echo(f"tlrun: wrote {output / name}")


def _export_kubernetes(spec: Any, kube: dict[str, Any], output: Path | None) -> None:
    from tlrun.deploy import kubernetes
    from tlrun.errors import UsageError

    if not kube["image"]:
        raise UsageError("tlrun export kubernetes needs --image (the image with the project and tlrun installed)")
    metrics_port = kube["metrics_port"] or (kubernetes.METRICS_PORT if kube["keda"] else None)
    opts = kubernetes.KubeOptions(
        image=kube["image"],
        namespace=kube["namespace"],
        workdir=kube["workdir"],
        broker_secret=kube["broker_secret"] or "",
        replicas=kube["replicas"],
        metrics_port=metrics_port,
        keda=kube["keda"],
        min_replicas=kube["min_replicas"],
        max_replicas=kube["max_replicas"],
        prometheus_url=kube["prometheus_url"] or kubernetes.PROMETHEUS_URL,
    )
    files = kubernetes.render(spec, opts)
    for note in kubernetes.notes(spec, opts):
        click.echo(f"tlrun: note: {note}", err=True)
    if output is None:
        click.echo(next(iter(files.values())), nl=False)
        return
    from tlrun import safefile

    for name, text in files.items():
        safefile.write_atomic(output / name, text)
        click.echo(f"tlrun: wrote {output / name}")
