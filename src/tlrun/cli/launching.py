"""The commands that run units: worker, dev, beat (each a composition in tlrun/compose.py)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

from tlrun.cli.base import (
    INIT_OPTION,
    F,
    Seconds,
    _settings,
    cli,
    handle_errors,
    project_options,
    worker_options,
)


def _launch(
    command: str,
    params: dict[str, Any],
    ping_window_default: float = 1.0,
    late: Callable[[], dict[str, Any]] | None = None,
    adjust: Callable[[Any, dict[str, Any]], Any] | None = None,
    **opts: Any,
) -> None:
    """Load the settings, start the workers early (held, see launch/early.py), then import the rest of the
    launch path and run the command's composition of it; exit with its status. `late()` builds options
    whose imports can wait until the workers import in parallel."""
    settings = _settings(params, ping_window_default)
    if command == "dev" and opts.get("beat") is None:  # dev without --beat/--no-beat: the project file's `beat`
        opts["beat"] = settings.beat
    if adjust is not None:
        settings = adjust(settings, opts)
    early = _early_start(command, settings, opts)
    try:
        from tlrun import compose
        from tlrun.render import ConsoleRenderer

        if late is not None:
            opts.update(late())
        if early is not None:
            opts["early"] = early
        status = getattr(compose, command)(settings, ConsoleRenderer(), **opts)
    except BaseException:
        if early is not None:
            early.discard()
        raise
    sys.exit(status)


def _early_start(command: str, settings: Any, opts: dict[str, Any]) -> Any:
    """The held workers started before the launcher's own checks, where that applies (early.py)."""
    import os

    if command not in ("worker", "dev") or opts.get("debug") or os.environ.get("TLRUN_EARLY_START") == "0":
        return None
    if opts.get("workers") is False:  # tlrun dev --only web: no worker to start
        return None
    from tlrun.errors import TlrunError
    from tlrun.launch.early import EarlyStart
    from tlrun.launch.rundir import runtime_dir

    init_duties = bool(opts.get("init")) or os.getpid() == 1  # pid1.is_pid1(), without its imports
    try:
        runtime = runtime_dir(os.environ)
    except (TlrunError, OSError):
        return None  # the launcher's own path says what is wrong with it
    return EarlyStart.begin(
        settings,
        dev_poll=command == "dev",
        log_dir=None if init_duties and not settings.log_dir_given else settings.log_dir,
        runtime=runtime,
    )


def metrics_options(func: F) -> F:
    """--metrics-port and --metrics-addr (worker, beat)."""
    func = click.option(
        "--metrics-addr",
        default="0.0.0.0",
        show_default=True,
        help="Address the metrics endpoint listens on (127.0.0.1: this host only).",
    )(func)
    return click.option(
        "--metrics-port",
        type=click.IntRange(min=1, max=65535),
        help="Serve Prometheus metrics on this port (/metrics): celery-exporter's names plus tlrun's own.",
    )(func)


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
@metrics_options
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

    def policy() -> dict[str, Any]:
        from tlrun.deploy.restart import RestartSettings

        if not restart:
            return {"restart": None}
        return {
            "restart": RestartSettings(restart_delay, restart_max_delay, give_up_crashes, give_up_window, max_restarts)
        }

    _launch(
        "worker",
        params,
        late=policy,
        beat=with_beat,
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
@click.option(
    "--flower/--no-flower",
    default=None,
    help="Also run Flower on a free port of 127.0.0.1 (default: the project file's `flower`).",
)
@click.option("--only", metavar="NAMES", help="Run only these units (comma-separated: roles, processes, beat, flower).")
@click.option("--skip", metavar="NAMES", help="Run every unit but these (comma-separated).")
@handle_errors
def dev(
    debug: bool | None,
    reload: bool,
    beat: bool | None,
    no_broker: bool,
    chatter: bool,
    fast_stop: bool,
    flower: bool | None,
    only: str | None,
    skip: str | None,
    **params: Any,
) -> None:
    """The daily launcher: every role of the project (and beat), its processes and Flower, with development
    defaults.

    Faster start (no mingle, no gossip), readable coloured output, a private redis-server when no broker
    answers at a local Redis URL, and optional --debug, --reload and --beat. The project file's
    [tool.tlrun.processes.NAME] (else a Procfile.dev or Procfile) run beside the workers, each supervised
    like them; --only and --skip pick units by name.

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
        adjust=lambda settings, opts: _select_units(settings, opts, flower, only, skip),
    )


def _names(raw: str | None, option: str) -> list[str]:
    names = [n.strip() for n in (raw or "").split(",") if n.strip()]
    if raw is not None and not names:
        raise click.UsageError(f"{option} needs one or more names, comma-separated")
    return names


def _select_units(settings: Any, opts: dict[str, Any], flower: bool | None, only: str | None, skip: str | None) -> Any:
    """The units `tlrun dev` runs: every role, beat when asked, the project's processes, Flower when asked;
    narrowed by --only / --skip (unknown names are a usage error, exit 2)."""
    import dataclasses
    import sys

    from tlrun.project.processes import flower_spec

    wanted, unwanted = _names(only, "--only"), _names(skip, "--skip")
    processes = list(settings.processes)
    with_flower = settings.flower if flower is None else flower
    known = [r.name for r in settings.roles] + [p.name for p in processes] + ["beat", "flower"]
    for name in wanted + unwanted:
        if name not in known:
            raise click.UsageError(f"no unit named {name!r} in this project (units: {', '.join(known)})")
    if wanted and "flower" in wanted:
        with_flower = True

    def chosen(name: str) -> bool:
        return (not wanted or name in wanted) and name not in unwanted

    if with_flower and chosen("flower"):
        processes.append(flower_spec(settings.app, sys.executable))
        _flower_auth_warning(settings.environ)
    processes = [p for p in processes if chosen(p.name)]
    opts["beat"] = bool(opts.get("beat") or (wanted and "beat" in wanted)) and chosen("beat")
    roles = tuple(r for r in settings.roles if chosen(r.name))
    opts["workers"] = bool(roles)
    if roles and roles != settings.roles:
        settings = dataclasses.replace(settings, roles=roles, expected_workers=sum(r.expected for r in roles))
    return dataclasses.replace(settings, processes=tuple(processes))


def _flower_auth_warning(environ: Any) -> None:
    """Flower on 127.0.0.1 without FLOWER_BASIC_AUTH shows every task's arguments and can revoke and shut down
    workers: any local user can reach it. Said when this host has other login users."""
    from tlrun.launch.owner import other_login_users

    users = [] if environ.get("FLOWER_BASIC_AUTH") else other_login_users()
    if users:
        click.echo(
            f"tlrun: warning: Flower runs without FLOWER_BASIC_AUTH and this host has other login users "
            f"({', '.join(users[:3])}): they can read every task's arguments in it and shut your workers down "
            "(set FLOWER_BASIC_AUTH=user:password in .env)",
            err=True,
        )


@cli.command()
@project_options
@click.option("--replace", is_flag=True, default=None, help="Stop this project's beat launcher and take over.")
@click.option(
    "-l", "--loglevel", type=click.Choice(["debug", "info", "warning", "error", "critical"], case_sensitive=False)
)
@INIT_OPTION
@metrics_options
@handle_errors
def beat(init_mode: bool, metrics_port: int | None, metrics_addr: str, **params: Any) -> None:
    """Run Celery beat alone, supervised, one per project (two beats run every periodic task twice).

    The schedule file lives in tlrun's state directory, not in the project.
    """
    _launch("beat", params, init=init_mode, metrics_port=metrics_port, metrics_addr=metrics_addr)
