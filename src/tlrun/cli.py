"""The command line: parse, call one core function, render, map errors to exit codes.

The only module that imports click. Celery is never imported here.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from tlrun import __version__
from tlrun.errors import EXIT_CODES, INTERRUPTED_EXIT_CODE, TlrunError

F = TypeVar("F", bound=Callable[..., Any])


class Seconds(click.FloatRange):
    """A FloatRange that refuses NaN and infinities: `--grace nan` would never send SIGKILL."""

    name = "seconds"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        result = super().convert(value, param, ctx)
        if isinstance(result, float) and not math.isfinite(result):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return result


LOGLEVEL = click.Choice(["debug", "info", "warning", "error", "critical"], case_sensitive=False)


def _fail(message: str, hint: str | None, code: int) -> None:
    click.echo(f"tlrun: error: {message}", err=True)
    if hint:
        click.echo(f"tlrun: hint: {hint}", err=True)
    sys.exit(code)


def handle_errors(func: F) -> F:
    """TlrunError -> one line and its exit code; anything else -> one line, exit 1 (traceback with -v)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        verbose = bool(click.get_current_context().find_root().params.get("verbose"))
        try:
            return func(*args, **kwargs)
        except TlrunError as exc:
            if verbose:
                for line in exc.details:
                    click.echo(f"  {line}", err=True)
                logging.getLogger("tlrun").exception("error")
            _fail(str(exc), exc.hint, exc.exit_code)
        except KeyboardInterrupt:
            click.echo("tlrun: interrupted", err=True)
            sys.exit(INTERRUPTED_EXIT_CODE)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:
            if verbose:
                raise
            _fail(f"internal error: {type(exc).__name__}: {exc}", "run again with -v for the traceback", 1)

    return wrapper  # type: ignore[return-value]


def _exit_codes_epilog() -> str:
    return "Exit codes:\n\n" + "\n\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tlrun")
@click.option("-v", "--verbose", is_flag=True, help="Log every step; show tracebacks.")
def cli(verbose: bool) -> None:
    """tlrun: exactly one worker of your Celery app, running your current code."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="tlrun: %(levelname)s %(name)s: %(message)s",
    )


def project_options(func: F) -> F:
    """Options every project-scoped command shares."""
    options = [
        click.option("-A", "--app", help="Celery app, e.g. proj.celery (env CELERY_APP)."),
        click.option("-b", "--broker", help="Broker URL (env CELERY_BROKER_URL, then REDIS_URL)."),
        click.option(
            "--project-dir",
            type=click.Path(file_okay=False, path_type=Path),
            help="Project root (default: the current directory); its .env is read.",
        ),
        click.option(
            "--grace", "stop_grace", type=Seconds(min=0), show_default="30", help="Stop grace period, seconds."
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _settings(params: dict[str, Any], ping_window_default: float = 1.0, app_required: bool = True) -> Any:
    """Load the settings and show their notes once, on stderr (stdout stays clean for --json)."""
    from tlrun.config import load_settings

    project_dir = params.pop("project_dir", None)
    settings = load_settings(params, project_dir, ping_window_default, app_required=app_required)
    for level, message in settings.notes:
        click.echo(f"tlrun: {'warning: ' if level == 'warning' else ''}{message}", err=True)
    return settings


MAX_CONCURRENCY = 10_000  # Celery accepts more and then fails to start the pool

ROLE_OPTION = click.option("--role", help="Only this worker role of the project file (default: every role).")
INIT_OPTION = click.option(
    "--init",
    "init_mode",
    is_flag=True,
    help="Do what a container's init does (automatic when tlrun is PID 1): reap orphans, and on Linux "
    "become a subreaper so that a dead worker's pool children come back to tlrun.",
)


def worker_options(func: F) -> F:
    """The options of every command that starts a worker (worker, dev)."""
    options = [
        ROLE_OPTION,
        click.option(
            "--node-prefix", show_default="api, or the role's name", help="Node name prefix: <prefix><pid>@<host>."
        ),
        click.option("--log-dir", type=click.Path(file_okay=False), show_default="logs", help="Worker log directory."),
        click.option(
            "--expected",
            "expected_workers",
            type=click.IntRange(min=1),
            show_default="1 per role",
            help="Workers expected to answer on the broker.",
        ),
        click.option(
            "--ready-timeout", type=Seconds(min=0.5), show_default="30", help="Seconds to wait for the first pong."
        ),
        click.option(
            "--ping-window",
            type=Seconds(min=0.1),
            show_default="1.0; dev 0.5",
            help="Reply window of the census ping, seconds.",
        ),
        click.option("--strict", is_flag=True, default=None, help="Fail unless exactly the expected workers answer."),
        click.option("--no-sweep", "sweep", flag_value=False, default=None, help="Do not stop stray workers first."),
        click.option("--replace", is_flag=True, default=None, help="Stop this project's launcher and take over."),
        click.option("-c", "--concurrency", type=click.IntRange(min=1, max=MAX_CONCURRENCY), help="Pool size."),
        click.option("-Q", "--queues", help="Comma-separated queues to consume."),
        click.option("-P", "--pool", type=click.Choice(["prefork", "solo", "threads", "gevent", "eventlet"])),
        click.option(
            "-l",
            "--loglevel",
            type=click.Choice(["debug", "info", "warning", "error", "critical"], case_sensitive=False),
        ),
        click.option("--max-tasks-per-child", type=click.IntRange(min=1)),
        click.option("--max-memory-per-child", type=click.IntRange(min=1), help="KiB."),
        click.option("--prefetch-multiplier", type=click.IntRange(min=0)),
        click.option("--time-limit", type=Seconds(min=0, min_open=True)),
        click.option("--soft-time-limit", type=Seconds(min=0, min_open=True)),
        click.option("-E", "--events", is_flag=True, default=None, help="Send task events (for Flower)."),
        click.argument("extra", nargs=-1, type=click.UNPROCESSED),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _launch(command: str, params: dict[str, Any], ping_window_default: float = 1.0, **opts: Any) -> None:
    """Load the settings, run the command's composition of the launch path, exit with its status."""
    from tlrun import compose
    from tlrun.render import ConsoleRenderer

    settings = _settings(params, ping_window_default)
    if command == "dev" and opts.get("beat") is None:  # dev without --beat/--no-beat: the project file's `beat`
        opts["beat"] = settings.beat
    sys.exit(getattr(compose, command)(settings, ConsoleRenderer(), **opts))


@cli.command()
@project_options
@worker_options
@click.option("--restart", is_flag=True, help="Restart the worker when it crashes, with exponential backoff.")
@click.option(
    "--fast-stop",
    is_flag=True,
    help="Stop an idle worker by draining it through the broker, then killing it (skips worker_shutdown hooks).",
)
@click.option(
    "--restart-delay",
    type=Seconds(min=0),
    default=1.0,
    show_default=True,
    help="First backoff delay, seconds.",
)
@click.option(
    "--restart-max-delay",
    type=Seconds(min=0),
    default=60.0,
    show_default=True,
    help="Longest backoff delay, seconds.",
)
@click.option(
    "--give-up-crashes",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Give up after this many crashes ...",
)
@click.option(
    "--give-up-window",
    type=Seconds(min=1),
    default=300.0,
    show_default=True,
    help="... within this many seconds.",
)
@click.option(
    "--max-restarts",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Give up after this many restarts in total (0: no limit).",
)
@click.option(
    "--beat",
    "with_beat",
    is_flag=True,
    help="Also run beat under this launcher (never implied: the project file's `beat` is for dev and export).",
)
@INIT_OPTION
@click.option(
    "--metrics-port",
    type=click.IntRange(min=1, max=65535),
    help="Serve Prometheus metrics on this port (/metrics): celery-exporter's names plus tlrun's own.",
)
@click.option(
    "--metrics-addr",
    default="0.0.0.0",
    show_default=True,
    help="Address the metrics endpoint listens on (127.0.0.1: this host only).",
)
@handle_errors
def worker(
    with_beat: bool,
    metrics_port: int | None,
    metrics_addr: str,
    init_mode: bool,
    fast_stop: bool,
    restart: bool,
    restart_delay: float,
    restart_max_delay: float,
    give_up_crashes: int,
    give_up_window: float,
    max_restarts: int,
    **params: Any,
) -> None:
    """Run supervised workers, one per role: guard, sweep strays, spawn, verify, supervise.

    With a project file that declares roles ([tool.tlrun.workers.NAME]), every role runs under this
    launcher unless --role NAME picks one (production: one service per role).

    Anything after `--` is passed to `celery worker` verbatim, e.g.

        tlrun worker -A proj.celery --concurrency=2 -- --without-heartbeat

    With --restart, a worker that exits abnormally is started again (guard, sweep, spawn, verify) after a
    delay that doubles with each crash, plus up to 25 % jitter; a clean exit or a stop request is never
    restarted. Exit 16 when the give-up rule or --max-restarts ends it.

    Beat runs here only with --beat: production runs it as a service of its own (`tlrun beat`, as
    `tlrun export` writes it), so that one worker service per role never races for the beat.
    """
    from tlrun.deploy.restart import RestartSettings

    policy = None
    if restart:
        policy = RestartSettings(restart_delay, restart_max_delay, give_up_crashes, give_up_window, max_restarts)
    _launch(
        "worker",
        params,
        beat=with_beat,
        restart=policy,
        fast_stop=fast_stop,
        init=init_mode,
        metrics_port=metrics_port,
        metrics_addr=metrics_addr,
    )


@cli.command()
@project_options
@worker_options
@click.option(
    "--debug",
    is_flag=True,
    default=None,
    help="Run the worker in this process (solo pool), for an IDE's debugger. Also DEBUG_MODE=1.",
)
@click.option("--reload", is_flag=True, help="Restart the worker when the project's Python files change.")
@click.option(
    "--beat/--no-beat",
    default=None,
    help="Also run Celery beat, as a supervised child (default: the project file's `beat`).",
)
@click.option("--no-broker", is_flag=True, help="Never start a private redis-server.")
@click.option("--chatter", is_flag=True, help="Keep Celery's mingle and gossip (off in dev for a faster start).")
@click.option(
    "--fast-stop/--no-fast-stop",
    default=True,
    show_default=True,
    help="Stop (and reload) an idle worker by draining it through the broker, then killing it.",
)
@handle_errors
def dev(
    debug: bool | None,
    reload: bool,
    beat: bool | None,
    no_broker: bool,
    chatter: bool,
    fast_stop: bool,
    **params: Any,
) -> None:
    """The daily launcher: every role of the project (and beat) with development defaults.

    Faster start (no mingle, no gossip), readable coloured output, a private redis-server when no broker
    answers at a local Redis URL, and optional --debug, --reload and --beat.

        tlrun dev -A examples.app --reload --beat
    """
    import os

    from tlrun.config import dev_extra

    if debug is None:
        debug = os.environ.get("DEBUG_MODE", "").lower() in ("1", "true", "yes", "on")
    if debug and reload:
        raise click.UsageError("--debug and --reload do not go together: the debugger owns the process")
    params["extra"] = dev_extra(params.get("extra") or (), chatter)
    # One developer, a local broker: replies come within milliseconds, so a half-second census will do.
    _launch(
        "dev",
        params,
        0.5,
        reload=reload,
        beat=beat,
        managed_broker=not no_broker,
        debug=bool(debug),
        fast_stop=fast_stop and not debug,
    )


@cli.command()
@project_options
@click.option("--replace", is_flag=True, default=None, help="Stop this project's beat launcher and take over.")
@click.option(
    "-l", "--loglevel", type=click.Choice(["debug", "info", "warning", "error", "critical"], case_sensitive=False)
)
@INIT_OPTION
@handle_errors
def beat(init_mode: bool, **params: Any) -> None:
    """Run Celery beat alone, supervised, one per project (two beats run every periodic task twice).

    The schedule file lives in tlrun's state directory, not in the project.
    """
    _launch("beat", params, init=init_mode)


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
@click.option("-A", "--app", help="Celery app (default: found in the project, as every command finds it).")
@click.option(
    "--project-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Project root (default: the current directory).",
)
@click.option("--force", is_flag=True, help="Replace an existing [tool.tlrun] table.")
@handle_errors
def init(app: str | None, project_dir: Path | None, force: bool) -> None:
    """Write [tool.tlrun] into pyproject.toml: the app, and one worker role per queue the app routes to.

    Other tables and comments are kept. Creates .env from .env.example when there is none. Afterwards
    `tlrun dev`, `tlrun ps`, `tlrun stop` and `tlrun doctor` need no arguments.
    """
    from tlrun.project.init import init_project

    root = (project_dir or Path.cwd()).resolve()
    result = init_project(root, app, force)
    if result.found:
        click.echo(f"tlrun: using app {result.app} ({result.found})")
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

    Two entries, "tlrun dev" and "tlrun dev (debug)", run the module tlrun in the project root with
    the .env loaded. Files you edited are kept unless --force.
    """
    from tlrun.dev import ide as ide_mod

    settings = _settings(params)
    writer = ide_mod.write_pycharm if editor == "pycharm" else ide_mod.write_vscode
    for written in writer(settings.project_root, settings.app, force):
        click.echo(f"tlrun: {written.path.relative_to(settings.project_root)}: {written.action}")


def _existing_parent(path: Path | None) -> Path | None:
    if path is not None and not path.absolute().parent.is_dir():
        raise click.BadParameter(f"the directory {path.absolute().parent} does not exist")
    return path


def _emit_json(data: Any) -> None:
    import json

    click.echo(json.dumps(data, indent=2, sort_keys=True))


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
    """This project's workers and beats: pid, kind, role, node, state, uptime, memory, CPU, pool, launcher."""
    from tlrun.ops import inventory
    from tlrun.render import ps_table

    settings = _settings(params, app_required=not everything)
    rows = inventory.local_processes(settings if settings.app else None, everything=everything)
    if as_json:
        _emit_json([row.as_dict() for row in rows])
    else:
        for line in ps_table(rows):
            click.echo(line)


@cli.command()
@project_options
@ROLE_OPTION
@click.option("--timeout", type=Seconds(min=0), help="Grace period before SIGKILL (default: --grace, 30).")
@handle_errors
def stop(timeout: float | None, **params: Any) -> None:
    """Stop this project's workers and beats: through their launcher, or (strays) with the stop ladder.

    Exits non-zero (10) if anything survived.
    """
    from tlrun.errors import StopError
    from tlrun.ops import control

    settings = _settings(params)
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
@click.argument("name", required=False)
@click.option("--log-dir", type=click.Path(file_okay=False), help="Log directory (default logs/).")
@click.option("--list", "list_only", is_flag=True, help="List the log files, newest first.")
@click.option("--rotated", is_flag=True, help="Include rotated files (.log.1 ...).")
@click.option("-n", "--lines", type=click.IntRange(min=0), default=50, show_default=True, help="Lines to show.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines (survives rotation).")
@handle_errors
def logs(name: str | None, list_only: bool, rotated: bool, lines: int, follow: bool, **params: Any) -> None:
    """Show or follow a worker's log file (default: the newest)."""
    from tlrun.errors import LogError
    from tlrun.launch import logfiles

    role = params.get("role")
    settings = _settings(params, app_required=False)
    stems = [r.log_stem for r in settings.roles] if role else None
    files = logfiles.log_files(settings.log_dir, rotated=rotated or list_only, stems=stems)
    if list_only:
        for path in files:
            click.echo(f"{path.stat().st_size:>10}  {path}")
        return
    if name:
        chosen = [
            p for p in files + logfiles.log_files(settings.log_dir, rotated=True) if p.name == name or str(p) == name
        ]
        if not chosen:
            raise LogError(f"no log file named {name} in {settings.log_dir}", hint="tlrun logs --list")
        path = chosen[0]
    elif files:
        path = files[0]
    else:
        raise LogError(f"no log files in {settings.log_dir}", hint="start a worker with tlrun worker or tlrun dev")
    for line in logfiles.tail_lines(path, lines):
        click.echo(line)
    if follow:
        try:
            for line in logfiles.follow(path):
                click.echo(line)
        except KeyboardInterrupt:
            pass


@cli.command()
@project_options
@ROLE_OPTION
@click.option("--node", help="Node name to probe (default: this host's tlrun node of each role).")
@click.option("--timeout", type=Seconds(min=0.1), default=2.0, show_default=True, help="Per attempt.")
@click.option("--retries", type=click.IntRange(min=0), default=2, show_default=True)
@handle_errors
def health(node: str | None, timeout: float, retries: int, **params: Any) -> None:
    """Liveness/readiness probe: exit 0 if and only if the node answers a ping (every role's node, by
    default: all must answer).

    Exit 14 ("unknown") when a node's process exists here but does not answer (stopped, busy, in a
    debugger), 15 ("dead") when nothing answers and no such process runs here (or "waiting": its `tlrun
    dev --reload` waits for a save that imports), 17 ("not_consuming") when it
    answers but messages wait on its queue while it holds no task and does not consume that queue (or has
    not for TLRUN_STUCK_AFTER seconds, as its launcher saw); the worst one counts.
    """
    from tlrun.errors import HEALTH_DEAD_EXIT_CODE, HEALTH_UNKNOWN_EXIT_CODE, NOT_CONSUMING_EXIT_CODE
    from tlrun.ops import control

    settings = _settings(params)
    codes = {
        "alive": 0,
        "unknown": HEALTH_UNKNOWN_EXIT_CODE,
        "dead": HEALTH_DEAD_EXIT_CODE,
        "waiting": HEALTH_DEAD_EXIT_CODE,  # nothing serves until the next good save
        "not_consuming": NOT_CONSUMING_EXIT_CODE,
    }
    worst = 0
    for name in [node] if node else control.default_nodes(settings):
        result = control.probe(settings, name, timeout, retries)
        click.echo(f"tlrun: {result.node}: {result.state} ({result.detail}, {result.seconds:.1f} s)")
        worst = max(worst, codes[result.state])
    sys.exit(worst)


@cli.command("export")
@click.argument("kind", type=click.Choice(["systemd", "supervisor", "procfile"]))
@project_options
@ROLE_OPTION
@click.option("--node-prefix", help="Node name prefix (default api).")
@click.option("--log-dir", type=click.Path(file_okay=False), help="Where supervisord writes tlrun's output.")
@click.option(
    "--beat/--no-beat", default=None, help="Also run beat (a unit or program of its own; default: the project file)."
)
@click.option("--user", help="Run as this user (systemd User=, supervisor user=).")
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write the file(s) into this directory instead of printing.",
)
@handle_errors
def export_cmd(kind: str, beat: bool | None, user: str | None, output: Path | None, **params: Any) -> None:
    """Service configuration that runs tlrun for this project and stops Celery the right way: one
    service per worker role, plus beat.

    systemd: KillMode=mixed with TimeoutStopSec above the grace period; supervisor: stopasgroup=false,
    killasgroup=true, stopwaitsecs above the grace period; procfile: one line per process.
    """
    from tlrun.deploy import export

    log_dir = params.get("log_dir")
    settings = _settings(params)
    spec = export.spec_for(
        settings, beat=settings.beat if beat is None else beat, user=user, pass_log_dir=log_dir is not None
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


def main() -> None:
    from tlrun.redact import MaskingStream

    # Every line tlrun prints, from click, logging or the renderer, passes the registered passwords' mask.
    sys.stdout = MaskingStream(sys.stdout)
    sys.stderr = MaskingStream(sys.stderr)
    cli(prog_name="tlrun")


main.__doc__ = _exit_codes_epilog()
