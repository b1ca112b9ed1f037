"""What may pass through to `celery worker` (after `--`, a role's extra_args, -Q): nothing that defeats tlrun."""

from __future__ import annotations

from tlrun.errors import ConfigError, TlrunError

# Options of `celery worker` that tlrun owns, or that would defeat what it guarantees: refused after `--` and in
# a role's extra_args (docs/commands.md, "Passthrough"). Short forms take their value attached too (`-nname`).
OWNED_OPTIONS: dict[tuple[str, ...], str] = {
    ("-D", "--detach"): "tlrun supervises the worker in the foreground: a detached worker runs unsupervised",
    ("--pidfile",): "tlrun holds a lock per role instead (a pidfile goes stale when its worker dies)",
    ("-n", "--hostname"): "tlrun names each worker uniquely (use --node-prefix or the role's node_prefix)",
    ("-f", "--logfile"): "tlrun writes each worker's log file (use --log-dir)",
    ("-B", "--beat"): "beat is a unit of its own (tlrun dev --beat, tlrun beat): an embedded one escapes the lease",
}
ROLE_OWNED_OPTIONS: dict[tuple[str, ...], str] = {
    ("-Q", "--queues"): "the project file declares each role's queues (use --role NAME -Q ... for one role)",
}


def _owned(arg: str, names: tuple[str, ...]) -> str | None:
    """The option of `names` that `arg` is (`--hostname=x`, `-nx` included), else None."""
    for name in names:
        if arg == name or arg.startswith(name + "="):
            return name
        if len(name) == 2 and arg.startswith(name) and not arg.startswith("--"):
            return name  # -nvalue
    return None


def refuse_owned_options(args: tuple[str, ...], where: str, declared: bool, error: type[TlrunError]) -> None:
    """Refuse, before anything is swept or started, a passthrough option that tlrun owns."""
    table = {**OWNED_OPTIONS, **(ROLE_OWNED_OPTIONS if declared else {})}
    for arg in args:
        if "\n" in arg or "\r" in arg:
            raise error(f"{where}: {arg!r} has a line break")
        for names, why in table.items():
            option = _owned(arg, names)
            if option is not None:
                raise error(f"{where}: {option} is tlrun's to set: {why}")


def check_queues(queues: str, source: str) -> None:
    names = [q.strip() for q in queues.split(",")]
    if not any(names):
        raise ConfigError(f"{source}={queues!r}: no queue name (a worker would consume nothing it should)")
    bad = next((q for q in names if any(c.isspace() for c in q)), None)
    if bad is not None or "" in names:
        raise ConfigError(f"{source}={queues!r}: queue names are comma-separated, without spaces or line breaks")


def excluded_queues(args: tuple[str, ...]) -> set[str]:
    """The queues `-X`/`--exclude-queues` in passthrough arguments name (`-X a,b`, `-Xa`, `--exclude-queues=a`)."""
    found: set[str] = set()
    for i, arg in enumerate(args):
        value = None
        if arg in ("-X", "--exclude-queues") and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--exclude-queues="):
            value = arg.split("=", 1)[1]
        elif arg.startswith("-X") and not arg.startswith("--") and len(arg) > 2:
            value = arg[2:]
        if value is not None:
            found.update(q.strip() for q in value.split(",") if q.strip())
    return found


def refuse_excluding_every_queue(queues: str | None, args: tuple[str, ...], role: str, error: type[TlrunError]) -> None:
    """A role whose every queue the passthrough's -X excludes would run and consume nothing, silently."""
    if not queues:
        return
    mine = {q.strip() for q in queues.split(",") if q.strip()}
    if mine and mine <= excluded_queues(args):
        raise error(
            f"role {role}: -X/--exclude-queues {','.join(sorted(mine))} excludes every queue it consumes: "
            "its worker would take no task",
            hint=f"exclude queues for one role only (--role NAME ... -- -X ...), or change role {role}'s queues",
        )
