"""What every command shares: the group, error handling and exit codes, the project and worker options.

The cli package is the only one that imports click; Celery is never imported here. Each command module
(launching, operating, setup) parses, calls one core function, renders, and maps errors to exit codes.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from tlrun import __version__
from tlrun.errors import EXIT_CODES, INTERRUPTED_EXIT_CODE, READER_GONE_EXIT_CODE, TlrunError
from tlrun.limits import MAX_SECONDS

F = TypeVar("F", bound=Callable[..., Any])


class Seconds(click.FloatRange):
    """A FloatRange that refuses NaN, infinities and more than a week (`--grace 1e308` overflowed the
    worker's own timer): `--grace nan` would never send SIGKILL."""

    name = "seconds"

    def __init__(self, min: float | None = None, max: float | None = MAX_SECONDS, **kwargs: Any) -> None:
        super().__init__(min=min, max=max, **kwargs)

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
        except BrokenPipeError:
            # The reader went away (`tlrun doctor | head -1`): end quietly, as a program killed by SIGPIPE
            # would, and let no later flush of stdout raise again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            sys.exit(READER_GONE_EXIT_CODE)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:
            if verbose:
                raise
            _fail(f"internal error: {type(exc).__name__}: {exc}", "run again with -v for the traceback", 1)

    return wrapper  # type: ignore[return-value]


def _exit_codes_epilog() -> str:
    return "Exit codes:\n\n" + "\n\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items())


# Each command's module, imported only when that command runs (or when the help lists them all): `tlrun dev`
# spawns its early workers sooner for every module it does not import first (launching.py, early.py).
COMMAND_MODULES = {
    **dict.fromkeys(("worker", "dev", "beat"), "tlrun.cli.launching"),
    **dict.fromkeys(("sweep", "doctor", "ps", "stop", "reload", "logs", "health"), "tlrun.cli.operating"),
    **dict.fromkeys(("init", "ide", "export"), "tlrun.cli.setup"),
    "restart": "tlrun.cli.units",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(COMMAND_MODULES) | set(self.commands))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMAND_MODULES:
            importlib.import_module(COMMAND_MODULES[cmd_name])  # its decorators register it on this group
            accept_verbose_everywhere()
        return super().get_command(ctx, cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tlrun")
@click.option("-v", "--verbose", is_flag=True, help="Log every step; show tracebacks.")
def cli(verbose: bool) -> None:
    """tlrun: exactly one worker of your Celery app, running your current code."""
    _logging(verbose)


def _logging(verbose: bool) -> None:
    """-v: tlrun's own steps at DEBUG; libraries (redis-py, kombu, amqp) stay at WARNING, so that their
    debug chatter (redis-py's MAINT_NOTIFICATIONS lines) never reaches the terminal."""
    logging.basicConfig(level=logging.WARNING, format="tlrun: %(levelname)s %(name)s: %(message)s")
    logging.getLogger("tlrun").setLevel(logging.DEBUG if verbose else logging.WARNING)


def _verbose_anywhere(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """`tlrun ps -v` means `tlrun -v ps`: -v is accepted after every command too."""
    if value:
        ctx.find_root().params["verbose"] = True
        _logging(True)


VERBOSE_OPTION = click.Option(
    ["-v", "--verbose"],
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_verbose_anywhere,
    help="Log every step; show tracebacks (as tlrun -v).",
)


def accept_verbose_everywhere() -> None:
    """Give every command the -v of the group (called whenever commands were added)."""
    for command in cli.commands.values():
        if not any("-v" in p.opts for p in command.params if isinstance(p, click.Option)):
            command.params.append(VERBOSE_OPTION)


def project_options(func: F) -> F:
    """Options every project-scoped command shares."""
    options = [
        click.option("-A", "--app", help="Celery app, e.g. proj.celery (env CELERY_APP)."),
        click.option("-b", "--broker", help="Broker URL (env CELERY_BROKER_URL, then REDIS_URL)."),
        click.option(
            "--project-dir",
            type=click.Path(file_okay=False, path_type=Path),
            help="Project root (default: the nearest folder up from here with pyproject.toml, tlrun.toml, "
            "manage.py or .git); its .env is read.",
        ),
        click.option(
            "--grace", "stop_grace", type=Seconds(min=0), show_default="30", help="Stop grace period, seconds."
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _settings(
    params: dict[str, Any], ping_window_default: float = 1.0, app_required: bool = True, code_free: bool = False
) -> Any:
    """Load the settings and show their notes once, on stderr (stdout stays clean for --json). `code_free`:
    a command that never imports the project's code (ps, stop, logs) also runs from a tlrun outside the
    project's environment when that environment has none."""
    from tlrun.config import load_settings

    project_dir = params.pop("project_dir", None)
    in_project_env(project_dir, required=not code_free)
    settings = load_settings(params, project_dir, ping_window_default, app_required=app_required)
    from tlrun.launch.owner import TRUST_ENV, trust

    trust(settings.environ.get(TRUST_ENV))  # .env's as well as the shell's
    for level, message in settings.notes:
        click.echo(f"tlrun: {'warning: ' if level == 'warning' else ''}{message}", err=True)
    return settings


def in_project_env(project_dir: Path | None, required: bool = True) -> None:
    """Hand over to the tlrun of the project's own environment when this one runs elsewhere (pipx, another
    venv), before anything is read or started; or (`required`) exit 3 saying how to install it there."""
    from tlrun.project.interpreter import hand_over
    from tlrun.project.layout import find_root, read_pyproject

    root = project_dir.resolve() if project_dir is not None else find_root(Path.cwd())
    hand_over(
        root,
        sys.argv[1:],
        pyproject=read_pyproject(root),
        say=lambda line: click.echo(line, err=True),
        required=required,
    )


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
        click.option(
            "--memory-limit",
            help="tlrun's memory guard: the worker tree's limit (PSS), e.g. 200MB, 1.5GiB (default: the cgroup's).",
        ),
        click.option("--prefetch-multiplier", type=click.IntRange(min=0)),
        click.option("--time-limit", type=Seconds(min=0, min_open=True)),
        click.option("--soft-time-limit", type=Seconds(min=0, min_open=True)),
        click.option("-E", "--events", is_flag=True, default=None, help="Send task events (for Flower)."),
        click.argument("extra", nargs=-1, type=click.UNPROCESSED),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _existing_parent(path: Path | None) -> Path | None:
    if path is not None and not path.absolute().parent.is_dir():
        raise click.BadParameter(f"the directory {path.absolute().parent} does not exist")
    return path


def _emit_json(data: Any) -> None:
    import json

    click.echo(json.dumps(data, indent=2, sort_keys=True))


def main() -> None:
    from tlrun.redact import MaskingStream

    # Every line tlrun prints, from click, logging or the renderer, passes the registered passwords' mask.
    sys.stdout = MaskingStream(sys.stdout)
    sys.stderr = MaskingStream(sys.stderr)
    cli(prog_name="tlrun")


main.__doc__ = _exit_codes_epilog()
