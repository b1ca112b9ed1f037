"""One error hierarchy; each class carries the exit code the CLI uses for it.

The table in docs/configuration.md ("Exit codes") is generated from EXIT_CODES below; keep them together.
"""

from __future__ import annotations


class TlrunError(Exception):
    """Base class: a failure tlrun explains in one message, without a traceback."""

    exit_code = 1
    hint: str | None = None
    details: tuple[str, ...] = ()  # shown with -v: e.g. the worker's own output before it failed

    def __init__(self, message: str, *, hint: str | None = None, details: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint
        self.details = details


class ConfigError(TlrunError):
    """A bad option value, a malformed .env, a missing app."""

    exit_code = 3


class UsageError(TlrunError):
    """A bad value on the command line that click's own types cannot catch (a malformed URL, an empty -b)."""

    exit_code = 2


class AppImportError(TlrunError):
    """The Celery app could not be loaded (the worker said so, or tlrun tried to import it)."""

    exit_code = 4


class BrokerError(TlrunError):
    """The broker did not answer, refused the credentials, or has an unknown scheme."""

    exit_code = 5


class LockHeldError(TlrunError):
    """Another live launcher holds this project's lock."""

    exit_code = 6


class NestedLaunchError(TlrunError):
    """tlrun was started from inside a worker that tlrun launched."""

    exit_code = 7


class WorkerStartError(TlrunError):
    """The worker exited or stayed silent before it answered its first ping."""

    exit_code = 8


class DuplicateNodeError(TlrunError):
    """More than one worker answers with our node name, or --strict saw the wrong count."""

    exit_code = 9


class StopError(TlrunError):
    """A process we had to stop is still alive after the whole stop ladder."""

    exit_code = 10


class UnsafeStateError(TlrunError):
    """The runtime directory or lock file is not what tlrun created (a symlink, another owner)."""

    exit_code = 11


class LogError(TlrunError):
    """The log directory or file cannot be written."""

    exit_code = 12


class RestartGiveUpError(TlrunError):
    """worker --restart: the worker crashed too often (the give-up rule or --max-restarts)."""

    exit_code = 16


class ReloadError(TlrunError):
    """tlrun reload: the new code did not start (the old workers keep serving), or a launcher did not answer."""

    exit_code = 18


class NothingRunningError(TlrunError):
    """tlrun reload, restart NAME, stop NAME: no launcher of this project runs it here."""

    exit_code = 19


class ReleaseError(TlrunError):
    """tlrun dev: the Procfile's release command failed; nothing else was started."""

    exit_code = 21


DOCTOR_WARNINGS_EXIT_CODE = 13  # doctor found warnings only
HEALTH_UNKNOWN_EXIT_CODE = 14  # health: the node's process exists here but does not answer (stopped, busy)
HEALTH_DEAD_EXIT_CODE = 15  # health: no answer and no such process here
NOT_CONSUMING_EXIT_CODE = 17  # health, doctor: a worker answers pings but does not consume its queue
USAGE_EXIT_CODE = 2  # click's own code for unknown options and bad values on the command line
HUNG_TASK_EXIT_CODE = 20  # doctor, health: a task runs past its hard time limit (or hung_after)
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, when the launcher is interrupted before the worker runs
READER_GONE_EXIT_CODE = 141  # 128 + SIGPIPE: the reader of tlrun's output went away (`tlrun doctor | head`)

EXIT_CODES: dict[int, str] = {
    0: "success (the worker stopped cleanly, or the command did what it was asked)",
    1: "unexpected internal error (run with -v for the traceback)",
    USAGE_EXIT_CODE: "bad command line: unknown option or invalid value",
    ConfigError.exit_code: "bad configuration: no app found, bad value in the environment, .env or project file",
    AppImportError.exit_code: "the Celery app does not import",
    BrokerError.exit_code: "broker unreachable, wrong credentials, or unsupported URL",
    LockHeldError.exit_code: "another tlrun launcher runs this project and role (use --replace to take over)",
    NestedLaunchError.exit_code: "tlrun was started from inside a worker it launched",
    WorkerStartError.exit_code: "the worker exited or did not answer before the readiness timeout",
    DuplicateNodeError.exit_code: "duplicate node name, or --strict and the worker count is not the expected one",
    StopError.exit_code: "a process survived the stop ladder",
    UnsafeStateError.exit_code: "the lock path or runtime directory is unsafe (symlink, wrong owner)",
    LogError.exit_code: "the log directory or file cannot be written, or another user could plant files in it",
    DOCTOR_WARNINGS_EXIT_CODE: "doctor: warnings only (configuration risks, unexpected worker count)",
    HEALTH_UNKNOWN_EXIT_CODE: "health: the node's process exists here but does not answer (stopped or busy)",
    HEALTH_DEAD_EXIT_CODE: "health: the node does not answer and no such process runs here",
    RestartGiveUpError.exit_code: "worker --restart gave up: too many crashes (give-up rule or --max-restarts)",
    NOT_CONSUMING_EXIT_CODE: "health, doctor: a worker answers pings but does not consume its queue (messages wait)",
    ReloadError.exit_code: "reload, restart NAME: the new code or the unit did not start (the old workers keep "
    "serving), or no answer in time",
    NothingRunningError.exit_code: "reload, restart NAME, stop NAME: nothing of that name of this project runs here",
    HUNG_TASK_EXIT_CODE: "doctor, health: a task runs past its hard time limit, or past hung_after without one",
    ReleaseError.exit_code: "dev: the Procfile's release command failed (nothing else was started)",
    READER_GONE_EXIT_CODE: "the reader of the output went away (`tlrun doctor` piped into `head -1`): ended quietly",
}
