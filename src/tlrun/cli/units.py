"""One unit of the stack from another shell: `tlrun restart NAME`, `tlrun stop NAME`'s unit half, and the log
files of a unit (`tlrun logs NAME`)."""

from __future__ import annotations

from typing import Any

import click

from tlrun.cli.base import Seconds, _settings, cli, handle_errors, project_options


@cli.command()
@project_options
@click.argument("name")
@click.option(
    "--timeout",
    type=Seconds(min=0.1),
    help="How long to wait for the launcher's answer (default: twice --ready-timeout, plus 10 s).",
)
@handle_errors
def restart(name: str, timeout: float | None, **params: Any) -> None:
    """Restart one unit of the running launcher, from another shell; the others are not touched.

    A worker role gets the reload path (its new worker beside the old one); a process (or flower) its stop
    ladder, then a fresh start; a unit stopped with `tlrun stop NAME` starts again. Exit 18 when it did not
    restart, 19 when no launcher of this project runs NAME here.
    """
    from tlrun.errors import ReloadError
    from tlrun.ops import stackctl

    settings = _settings(params)
    wait = timeout if timeout is not None else 2 * settings.ready_timeout + 10
    answer = stackctl.restart_unit(settings, name, wait)
    click.echo(f"tlrun: {name} of launcher pid {answer.launcher}: {answer.message}", err=not answer.ok)
    if not answer.ok:
        raise ReloadError(f"{name} did not restart")


def stop_one(settings: Any, name: str, timeout: float) -> None:
    """`tlrun stop NAME` for a process, flower or beat: that unit alone (a role goes the --role way)."""
    from tlrun.errors import StopError
    from tlrun.ops import stackctl

    answer = stackctl.stop_unit(settings, name, timeout)
    click.echo(f"tlrun: {name} of launcher pid {answer.launcher}: {answer.message}")
    if not answer.ok:
        raise StopError(f"{name} survived the stop ladder")


def unit_log_prefixes(settings: Any, name: str) -> tuple[str, ...] | None:
    """The log files of the unit NAME (`tlrun logs web`), or None when NAME names no unit (then: a file)."""
    roles = {r.name: r.log_stem for r in settings.all_roles}
    if name in roles:
        return (f"celery_{roles[name]}_",)
    if name == "beat":
        return ("celery_beat_",)
    if name == "broker":
        return ("redis_",)
    if name == "flower" or name in {p.name for p in settings.processes}:
        return (f"proc_{name}_",)
    return None
