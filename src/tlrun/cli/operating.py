"""The everyday controls: sweep, doctor, ps, stop, logs, health."""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

import click

from tlrun.cli.base import (
    ROLE_OPTION,
    Seconds,
    _emit_json,
    _existing_parent,
    _settings,
    cli,
    handle_errors,
    project_options,
)
from tlrun.cli.units import stop_one, unit_log_prefixes


@cli.command("sweep")
@project_options
@ROLE_OPTION
@click.option("--dry-run", is_flag=True, help="Show what would be stopped; stop nothing.")
@handle_errors
def sweep_cmd(dry_run: bool, **params: Any) -> None:
    """Stop this project's stray workers and beats (those no live launcher owns)."""
    from tlrun.errors import StopError
    from tlrun.events import StrayFound
    from tlrun.ops import control
    from tlrun.render import ConsoleRenderer

    settings = _settings(params)
    render = ConsoleRenderer()
    result = control.sweep_project(settings, dry_run=dry_run, on_found=lambda stray: render(StrayFound(stray, dry_run)))
    if not result.found:
        click.echo("tlrun: no stray workers or beats")
    if result.survivors:
        raise StopError(f"still alive after SIGKILL: {', '.join(map(str, result.survivors))}")


@cli.command()
@project_options
@click.option("--expected", "expected_workers", type=click.IntRange(min=1), help="Workers expected (1).")
@click.option("--ping-window", type=Seconds(min=0.1), help="Reply window of the census ping (1.0).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report (schema: tlrun doctor --schema).")
@click.option("--schema", is_flag=True, help="Print the JSON Schema of the --json report and exit.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["human", "json", "prometheus"]),
    default=None,
    help="Report format; prometheus prints metrics in the text exposition format.",
)
@click.option(
    "--textfile",
    type=click.Path(dir_okay=False, path_type=Path),
    callback=lambda _ctx, _param, value: _existing_parent(value),
    help="Write Prometheus metrics atomically to this file (node_exporter's textfile collector).",
)
@click.option("--fix", is_flag=True, help="Stop local strays and duplicates of this project (stop ladder).")
@click.option("--remote", is_flag=True, help="With --fix: also ask remote duplicate nodes to shut down.")
@click.option(
    "--cluster",
    is_flag=True,
    help="Every node of the app on every host (from the broker), grouped by host, with duplicates, roles and "
    "the beat lease's holder. Exit 9 when a node name answers twice.",
)
@handle_errors
def doctor(
    as_json: bool,
    schema: bool,
    fmt: str | None,
    textfile: Path | None,
    fix: bool,
    remote: bool,
    cluster: bool,
    **params: Any,
) -> None:
    """Find duplicates, strays and risky settings, locally and on the broker.

    Exit codes: 0 healthy, 13 warnings only, 9 duplicates or strays, 5 broker unreachable, 4 app does not
    import. For CI:  tlrun doctor --json > doctor.json || exit $?
    """
    from tlrun.ops import control
    from tlrun.ops import doctor as doctor_mod
    from tlrun.render import doctor_report

    if schema:
        from importlib.resources import files

        click.echo(files("tlrun.ops").joinpath("doctor.schema.json").read_text(encoding="utf-8"), nl=False)
        return
    if remote and not fix:
        raise click.UsageError("--remote goes with --fix")
    if textfile is not None:
        from tlrun.ops.metrics import check_textfile

        check_textfile(textfile)  # before anything is asked or fixed
    if cluster and (fix or textfile is not None or fmt == "prometheus"):
        raise click.UsageError("--cluster goes with --json only")
    settings = _settings(params)
    if cluster:
        from tlrun.cluster.view import cluster_view
        from tlrun.render import cluster_report

        view = cluster_view(settings)
        if as_json or fmt == "json":
            _emit_json(view.as_dict())
        else:
            for line in cluster_report(view):
                click.echo(line)
        sys.exit(view.exit_code)
    report = doctor_mod.diagnose(settings)
    if fix:
        stopped = control.sweep_project(settings)
        remote_nodes = [n.name for n in report.nodes if n.replies > 1 and not n.this_host]
        if remote and remote_nodes:
            control.shutdown_remote(settings, remote_nodes)
        if not as_json:
            for stray in stopped.found:
                click.echo(f"tlrun: stopped stray {stray.describe()}")
            for name in remote_nodes if remote else []:
                click.echo(f"tlrun: asked remote node {name} to shut down")
        report = doctor_mod.diagnose(settings)
    fmt = fmt or ("json" if as_json else "human")
    if textfile is not None:
        from tlrun.ops.metrics import prometheus, write_textfile

        write_textfile(textfile, prometheus(report))
    if fmt == "json":
        _emit_json(report.as_dict())
    elif fmt == "prometheus":
        from tlrun.ops.metrics import prometheus

        click.echo(prometheus(report), nl=False)
    elif textfile is None:
        for line in doctor_report(report):
            click.echo(line)
    sys.exit(report.exit_code)


@cli.command()
@project_options
@click.option("--all", "everything", is_flag=True, help="Every Celery worker and beat of the current user.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per process, in a list.")
@handle_errors
def ps(everything: bool, as_json: bool, **params: Any) -> None:
    """This project's units: workers, beats and tlrun dev's processes (kind, name, node and port, state,
    uptime, memory, CPU, pool, launcher)."""
    from tlrun.ops import inventory
    from tlrun.render import ps_table

    settings = _settings(params, app_required=not everything, code_free=True)
    rows = inventory.local_processes(settings if settings.app else None, everything=everything)
    if as_json:
        _emit_json([row.as_dict() for row in rows])
    else:
        for line in ps_table(rows):
            click.echo(line)


@cli.command()
@project_options
@ROLE_OPTION
@click.argument("name", required=False)
@click.option("--timeout", type=Seconds(min=0), help="Grace period before SIGKILL (default: --grace, 30).")
@handle_errors
def stop(name: str | None, timeout: float | None, **params: Any) -> None:
    """Stop this project's workers, beats and processes: through their launcher, or (strays) with the stop ladder.

    NAME stops one unit (a role, beat, flower or a process of the project file or Procfile) and leaves the
    rest of its launcher running. Exits non-zero (10) if anything survived, 19 if NAME does not run here.
    """
    from tlrun.errors import StopError
    from tlrun.ops import control

    if name is not None and params.get("role"):
        raise click.UsageError("give NAME or --role, not both")
    settings = _settings(params, code_free=True)
    if name is not None:
        from tlrun.errors import NothingRunningError

        is_role = name in {r.name for r in settings.all_roles}
        try:
            stop_one(settings, name, settings.stop_grace if timeout is None else timeout)
            return
        except NothingRunningError:
            if not is_role:
                raise
        params["role"] = name  # a role no launcher runs here: its strays, as `--role NAME` does
        settings = _settings(params, code_free=True)
    report = control.stop_project(settings, settings.stop_grace if timeout is None else timeout)
    for unit in report.units:
        click.echo(f"tlrun: stopped {unit.node} ({unit.kind}) of launcher pid {unit.launcher}, which runs on")
    for pid in report.launchers:
        how = "it did not stop within the grace period: SIGKILL" if pid in report.killed else "it stopped its workers"
        click.echo(f"tlrun: stopped launcher pid {pid} ({how})")
    for stray in report.strays:
        click.echo(f"tlrun: stopped stray {stray.describe()}")
    if report.killed:
        click.echo(f"tlrun: needed SIGKILL after the grace period: {', '.join(map(str, report.killed))}")
    if not report.launchers and not report.strays and not report.units:
        click.echo("tlrun: nothing of this project was running")
    if report.survivors:
        raise StopError(f"still alive after SIGKILL: {', '.join(map(str, report.survivors))}")


@cli.command()
@project_options
@ROLE_OPTION
@click.option(
    "--timeout",
    type=Seconds(min=0.1),
    help="How long to wait for each role's new worker (default: twice --ready-timeout, plus 10 s).",
)
@handle_errors
def reload(timeout: float | None, **params: Any) -> None:
    """New code without downtime: each role's next worker imports it beside the running one.

    The running launcher (tlrun worker or tlrun dev) starts each role's new worker; only once it imported the
    app and its task modules and answered its ping does the old worker stop fetching and finish its running
    tasks. If the new code does not import, the old worker keeps serving and this exits non-zero (18) with
    the error. SIGHUP to tlrun worker does the same (systemctl reload).
    """
    from tlrun.errors import ReloadError
    from tlrun.ops.reloadctl import reload_project

    settings = _settings(params)
    wait = timeout if timeout is not None else 2 * settings.ready_timeout + 10
    answers = reload_project(settings, wait)
    for a in answers:
        how = "reloaded" if a.ok else "NOT reloaded"
        click.echo(f"tlrun: role {a.role} of launcher pid {a.launcher} {how}: {a.message}", err=not a.ok)
    failed = [a for a in answers if not a.ok]
    if failed:
        raise ReloadError(f"{len(failed)} of {len(answers)} role(s) kept their previous worker")


@cli.command()
@project_options
@ROLE_OPTION
@click.argument("name", required=False)
@click.option("--log-dir", type=click.Path(file_okay=False), help="Log directory (default logs/).")
@click.option("--list", "list_only", is_flag=True, help="List the log files, newest first.")
@click.option("--rotated", is_flag=True, help="Include rotated files (.log.1 ...).")
@click.option("-n", "--lines", type=click.IntRange(min=0), default=50, show_default=True, help="Lines to show.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines (survives rotation).")
@handle_errors
def logs(name: str | None, list_only: bool, rotated: bool, lines: int, follow: bool, **params: Any) -> None:
    """Show or follow a log file: with several roles (or beat), the newest file of each, each under its name;
    `--role R` (or `--role beat`) one role's; NAME one unit's (a role, beat, flower, broker, a process) or
    one file (see --list)."""
    from tlrun.errors import LogError
    from tlrun.launch import logfiles

    role = params.get("role")
    if role == "beat":  # beat is no worker role, but it has its log files: celery_beat_<pid>.log
        params["role"] = None
    settings = _settings(params, app_required=False, code_free=True)
    stems = ["beat"] if role == "beat" else [r.log_stem for r in settings.roles] if role else None
    prefixes = unit_log_prefixes(settings, name) if name else None
    if prefixes is not None:
        name, role = None, name
    files = logfiles.log_files(settings.log_dir, rotated=rotated or list_only, stems=stems, prefixes=prefixes)
    if list_only:
        for path in files:
            click.echo(f"{path.lstat().st_size:>10}  {path}")
        return
    if name:
        chosen = [
            p for p in files + logfiles.log_files(settings.log_dir, rotated=True) if p.name == name or str(p) == name
        ]
        if not chosen:
            raise LogError(f"no log file named {name} in {settings.log_dir}", hint="tlrun logs --list")
        shown = chosen[:1]
    elif not files:
        what = f"of {'beat' if role == 'beat' else f'role {role}'} " if role else ""
        click.echo(f"tlrun: no log files {what}in {settings.log_dir} yet (tlrun dev or tlrun worker writes them)")
        return
    else:
        shown = _newest_of_each(files) if not follow else files[:1]
    try:
        for path in shown:
            if len(shown) > 1 or not (name or role):
                click.echo(f"==> {path} <==", err=len(shown) == 1)  # the file's name, as tail prints it
            for line in logfiles.tail_lines(path, lines):
                click.echo(line)
        if follow:
            try:
                for line in logfiles.follow(shown[0]):
                    click.echo(line)
            except KeyboardInterrupt:
                pass
    except OSError as exc:  # replaced since it was listed (by a link, a FIFO): never read through it
        raise LogError(f"cannot read {path}: {exc.strerror or exc}") from None


def _newest_of_each(files: list[Path]) -> list[Path]:
    """The newest file of each kind (`celery_<role>_`, `celery_beat_`, `redis_`), newest kind first."""
    import re

    seen: dict[str, Path] = {}
    for path in files:  # newest first
        kind = re.sub(r"_\d+\.log(\.\d+)?$", "", path.name)
        seen.setdefault(kind, path)
    return list(seen.values())


@cli.command()
@project_options
@ROLE_OPTION
@click.option("--node", help="Node name to probe (default: this host's tlrun node of each role).")
@click.option("--timeout", type=Seconds(min=0.1), default=2.0, show_default=True, help="Per attempt.")
@click.option("--retries", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--readiness", "liveness", flag_value=False, default=False, help="Ping and consumption (default).")
@click.option("--liveness", "liveness", flag_value=True, help="Local evidence only: no broker, no Celery.")
@click.option(
    "--window", type=Seconds(min=1), default=30.0, show_default=True, help="Liveness: the heartbeat's age limit."
)
@handle_errors
def health(node: str | None, timeout: float, retries: int, liveness: bool, window: float, **params: Any) -> None:
    """Readiness (default, or --readiness): exit 0 if and only if the node answers a ping (every role's
    node, by default: all must answer) and consumes. Liveness (--liveness): from local evidence only.

    Readiness: exit 14 ("unknown") when a node's process exists here but does not answer (stopped, busy, in
    a debugger), 15 ("dead") when nothing answers and no such process runs here (or "waiting": its `tlrun
    dev --reload` waits for a save that imports), 17 ("not_consuming") when it answers but messages wait on
    its queue while it holds no task and does not consume that queue (or has not for TLRUN_STUCK_AFTER
    seconds, as its launcher saw), 20 ("hung") when it runs a task past its hard time limit (or past
    TLRUN_HUNG_AFTER without one), 5 when the broker cannot be reached; the worst one counts.

    Liveness: no broker, no Celery: the worker's main process exists, is not stopped, and its own event
    loop wrote its heartbeat within --window seconds (a task running in the main process, as on the solo
    pool, counts while within its time limit). 0 alive, 14 a process that shows no progress, 15 none.
    """
    if liveness:
        from tlrun.ops.liveness import check_roles, report

        lines, code = report(check_roles(_settings(params), window))
        for line in lines:
            click.echo(line)
        sys.exit(code)
    from tlrun.errors import (
        HEALTH_DEAD_EXIT_CODE,
        HEALTH_UNKNOWN_EXIT_CODE,
        HUNG_TASK_EXIT_CODE,
        NOT_CONSUMING_EXIT_CODE,
        BrokerError,
    )
    from tlrun.ops import control

    settings = _settings(params)
    codes = {
        "alive": 0,
        "unknown": HEALTH_UNKNOWN_EXIT_CODE,
        "dead": HEALTH_DEAD_EXIT_CODE,
        "waiting": HEALTH_DEAD_EXIT_CODE,  # nothing serves until the next good save
        "not_consuming": NOT_CONSUMING_EXIT_CODE,
        "hung": HUNG_TASK_EXIT_CODE,
        "unreachable": BrokerError.exit_code,  # not ready; liveness does not depend on the broker
    }
    worst = 0
    for role, name in [("", node)] if node else control.default_nodes(settings):
        if name is None:  # no launcher of this role runs here: nothing to ask the broker about
            which = f"role {role} of app {settings.app}" if settings.declared_roles else f"app {settings.app}"
            click.echo(f"tlrun: {which}: dead (no tlrun worker runs on this host, {socket.gethostname()})")
            worst = max(worst, codes["dead"])
            continue
        result = control.probe(settings, name, timeout, retries)
        click.echo(f"tlrun: {result.node}: {result.state} ({result.detail}, {result.seconds:.1f} s)")
        worst = max(worst, codes[result.state])
    sys.exit(worst)
