"""The shim every child of a launcher runs behind:
`python -m tlrun.launch._child <launcher pid> <lifeline fd> <grace> -- <argv...>`.

Parent death, on every POSIX system: the launcher holds the only write end of a pipe (the lifeline) and
each child holds its read end, so the read returns EOF exactly when the launcher is gone, however it died
(SIGKILL, a crash, an IDE's second Stop). Two ways to act on it:

- a Python module (`python -m celery ...`, tlrun's worker entry): this process becomes the worker; it
  does not exec but runs the module's command line in place (runpy), with a daemon thread blocked reading
  the lifeline. On EOF the thread stops the console copy of the output (the child writes its log file
  itself from its start: relay.py), sends this process SIGTERM (Celery's warm shutdown: running tasks
  finish), and after the grace period SIGKILLs its own process group. When the worker then exits by
  itself, whatever is left in its group (a task's subprocess) is killed with it.
- anything else (the private redis-server, a process of the dev stack): this process stays a small
  watchdog parent (`_watchdog.py`) that holds the read end and stops its child on EOF.

On Linux PR_SET_PDEATHSIG=SIGTERM is kept as a backstop (a thread cannot run while a C extension holds
the GIL); TLRUN_NO_PDEATHSIG=1 turns it off, so that tests on Linux exercise the lifeline alone, as on
macOS. The kernel fires that signal when the *thread* that forked us exits: tlrun spawns from its main
thread. This module imports only the standard library (the output relay its few tlrun modules, lazily): it
runs before every worker start.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import types
from collections.abc import Callable, Mapping, Sequence

EXIT_PARENT_GONE = 125
NO_PDEATHSIG_ENV = "TLRUN_NO_PDEATHSIG"
# "1": use only what macOS has, on Linux too (tests): no PR_SET_PDEATHSIG, no os.waitid (absent from
# CPython on macOS before 3.13), no PR_SET_CHILD_SUBREAPER.
PORTABLE_ENV = "TLRUN_PORTABLE"
LOG_ENV = "TLRUN_LOG_FILE"  # the child's own log file: it writes it itself (relay.py)
RELAY_FDS_ENV = "TLRUN_RELAY_FDS"  # "read,write": the output pipe the launcher made for relay.py, and keeps
# Modules a step asks to run inside the child before its program starts (the beat lease's fence): each has
# `install()`, and may have `exit_status(status) -> status`, called once the program has ended.
HOOKS_ENV = "TLRUN_CHILD_HOOKS"
# A stack's process (not Celery): run it under a watchdog that stops its whole group with this signal.
GROUP_ENV = "TLRUN_GROUP_STOP"
HEARTBEAT_ENV = "TLRUN_HEARTBEAT"  # where a worker writes its liveness heartbeat (heartbeat.py)
TASK_STATS_ENV = "TLRUN_TASK_STATS"  # the prefix of the file a worker writes its task counts to (taskstats.py)
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)
# "Requeue if busy": sent by the launcher to a stopping worker shortly before the grace period ends. The
# worker turns it into SIGQUIT (Celery's cold shutdown: running late-acked tasks go back to the queue) only
# when it runs a task; an idle worker whose warm shutdown is merely slow goes on and exits 0. A realtime
# signal where there is one: no library of the worker uses it; SIGUSR2 (Celery's rdb, only when asked) else.
REQUEUE_SIGNAL: int = signal.SIGRTMIN + 2 if hasattr(signal, "SIGRTMIN") else signal.SIGUSR2
# The parent-death signal of a Python child (Linux's backstop): its handler runs the same steps as the
# lifeline's end-of-file (a worker that holds no task goes at once, see fastexit.py), where a SIGTERM would
# start Celery's warm shutdown before the shim could look. A non-Python child (the watchdog) keeps SIGTERM.
PARENT_GONE_SIGNAL: int = signal.SIGRTMIN + 3 if hasattr(signal, "SIGRTMIN") else signal.SIGTERM


def in_process_module(argv: Sequence[str], python: str = sys.executable) -> str | None:
    """The module that `argv` runs when it is exactly `<this python> -m <module> ...` (run in place),
    else None (run under a watchdog)."""
    if len(argv) >= 3 and argv[0] == python and argv[1] == "-m" and not argv[2].startswith("-"):
        return argv[2]
    return None


def portable(environ: Mapping[str, str] = os.environ) -> bool:
    """Run the code paths macOS runs, even on Linux (TLRUN_PORTABLE=1)."""
    return environ.get(PORTABLE_ENV) == "1"


def set_pdeathsig(environ: Mapping[str, str] = os.environ, sig: int = signal.SIGTERM) -> bool:
    """The Linux backstop: `sig` when the launcher's thread that forked us exits. False when off or absent."""
    if not sys.platform.startswith("linux") or environ.get(NO_PDEATHSIG_ENV) == "1" or portable(environ):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    if libc.prctl(pr_set_pdeathsig, int(sig), 0, 0, 0) != 0:
        sys.stderr.write(f"tlrun: prctl(PR_SET_PDEATHSIG) failed: errno {ctypes.get_errno()}\n")
        return False
    return True


def quiet_thread() -> None:
    """Block every signal in the calling helper thread. The kernel delivers a process-directed signal to any
    thread that does not block it, and Python runs handlers only in the main thread, at its next bytecode:
    a signal taken by a helper thread never interrupts the main thread's blocking call (a watchdog's
    waitpid, Celery's pool shutdown waiting on SIGCHLD). Blocked here, every signal goes to the main thread."""
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())


def watch(fd: int, launcher: int, on_gone: Callable[[], None]) -> threading.Thread:
    """A daemon thread that calls `on_gone` once the launcher is gone: at once when our parent is no longer
    `launcher` (it died before the thread ran), else when the lifeline reads EOF."""

    def run() -> None:
        quiet_thread()
        if os.getppid() == launcher:
            try:
                while os.read(fd, 512):  # the launcher never writes: only EOF ends this
                    pass
            except OSError:
                pass
        on_gone()

    thread = threading.Thread(target=run, name="tlrun-lifeline", daemon=True)
    thread.start()
    return thread


def redirect_output(path: str | None, secrets: list[str]) -> Callable[[], None]:
    """Point fds 1 and 2 at the log file (appending, never through a symlink), else at /dev/null: the pipe to
    the launcher has no reader any more, and a write to it would fail inside Celery's signal handler.

    Lines go through a pipe and a thread that masks `secrets`, as the launcher's copy did. Returns the
    function that closes our ends and lets the thread write the last lines (call it before exiting)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        out = os.open(path, flags) if path else os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        out = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    read_end, write_end = os.pipe()
    for target in (1, 2):
        os.dup2(write_end, target)
    os.close(write_end)

    def copy() -> None:
        quiet_thread()
        from tlrun.redact import Redactor

        redact = Redactor(secrets)
        with os.fdopen(read_end, "rb") as lines:
            for raw in lines:
                os.write(out, redact(raw.decode("utf-8", errors="replace")).encode())
        os.close(out)

    thread = threading.Thread(target=copy, name="tlrun-orphan-output", daemon=True)
    thread.start()

    def finish() -> None:
        close_outputs()
        thread.join(1.0)  # a task's subprocess may hold a copy of the pipe: do not wait for it

    return finish


def close_outputs() -> None:
    """Flush and close this process's stdout and stderr: the thread that copies them sees EOF once every
    other holder (a pool child, a task's subprocess) has closed its copy too."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    for target in (1, 2):
        try:
            os.close(target)
        except OSError:
            pass


def _secrets(environ: Mapping[str, str]) -> list[str]:
    from tlrun.redact import secrets_of

    return [*secrets_of(environ.get("CELERY_BROKER_URL")), *secrets_of(environ.get("CELERY_RESULT_BACKEND"))]


class _Worker:
    """A Python child whose launcher may die: the steps it takes on its own."""

    def __init__(self, grace: float, log_path: str | None, relay: Callable[[], None] | None = None) -> None:
        self.grace = grace
        self.log_path = log_path
        self.orphaned = threading.Event()
        self._went = False
        self._went_lock = threading.Lock()
        self._relay = relay  # the output relay's finish (relay.py): it writes the log file already
        self._finish_output: Callable[[], None] = relay or (lambda: None)
        self.celery_worker: Callable[[], object] | None = None  # this process's Celery worker, once it runs

    def gone(self) -> None:
        """The launcher is gone (the lifeline's EOF, or the parent-death signal): act once."""
        with self._went_lock:
            if self._went:
                return
            self._went = True
        self.on_gone()

    def on_parent_death(self, _signum: int, _frame: object) -> None:
        """PARENT_GONE_SIGNAL's handler: the steps run on a thread of their own (a handler must not block)."""

        def run() -> None:
            quiet_thread()
            self.gone()

        threading.Thread(target=run, name="tlrun-parent-gone", daemon=True).start()

    def on_gone(self) -> None:
        if self._relay is None:  # no relay: the launcher's pipe has no reader now
            self._finish_output = redirect_output(self.log_path, _secrets(os.environ))
        self.orphaned.set()
        if self.celery_worker is not None:
            # Holding no task, it goes at once (fastexit.py); else the warm shutdown below.
            try:
                from tlrun.launch import fastexit

                worker = self.celery_worker()
            except (ImportError, LookupError):
                pass  # Celery has not started its worker: nothing to drain
            else:
                fastexit.try_fast_exit(worker, _say, self._finish_output)
        os.write(2, b"tlrun: the launcher is gone: warm shutdown (SIGTERM to this worker)\n")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(self.grace)  # a worker that finishes sooner ends this thread with it
        os.write(2, f"tlrun: still running {self.grace:g} s later: SIGKILL to the process group\n".encode())
        self._finish_output()
        kill_own_group()

    def on_exit(self) -> None:
        """The worker has finished. Without a launcher to empty our group, empty it ourselves."""
        if self.orphaned.is_set():
            self._finish_output()
            kill_own_group()
        elif self._relay is not None:
            self._relay()  # its last lines, into the log file and to the launcher


def _say(message: str) -> None:
    os.write(2, message.encode() + b"\n")


def kill_own_group() -> None:
    """SIGKILL this process's group, this process included (the child leads its own session)."""
    os.killpg(os.getpgrp(), signal.SIGKILL)


def requeue_if_busy(_signum: int, _frame: object) -> None:
    """REQUEUE_SIGNAL's handler in a worker: SIGQUIT to ourselves only when a task runs (see above). It
    writes with os.write: the main thread may be inside a write to the same stream."""
    from tlrun.launch import _celery_fix

    try:
        running = _celery_fix.running_tasks()
    except Exception:  # Celery not started yet, or changed: assume busy, as before this check existed
        running = -1
    if running:
        what = f"{running} task(s)" if running > 0 else "tasks"
        os.write(
            2,
            f"tlrun: {what} still running near the deadline: cold shutdown (SIGQUIT), late-acked tasks "
            "go back to the queue\n".encode(),
        )
        os.kill(os.getpid(), signal.SIGQUIT)
    else:
        try:
            stopped = _celery_fix.stop_idle_pool()
        except Exception:  # Celery changed: the warm shutdown goes on as it is
            stopped = 0
        more = f" ({stopped} idle pool process(es) stopped: nothing left to wait for)" if stopped else ""
        os.write(2, f"tlrun: no task running near the deadline: the warm shutdown goes on{more}\n".encode())


WORKER_MODULES = ("celery", "tlrun.launch.entry")


def stop_before_start(_signum: int, _frame: object) -> None:
    """SIGTERM before the program installed its own handler (Celery's worker and beat do, early in their
    start): nothing runs yet, so end cleanly, status 0, instead of dying by the signal (status 143, which a
    stop tlrun asked for would report as a failure)."""
    raise SystemExit(0)


def run_module(
    module: str,
    args: Sequence[str],
    fd: int,
    launcher: int,
    grace: float,
    log_path: str | None = None,
    relay: Callable[[], None] | None = None,
) -> None:
    import runpy

    signal.signal(signal.SIGTERM, stop_before_start)
    worker = _Worker(grace, log_path, relay)
    signal.signal(PARENT_GONE_SIGNAL, worker.on_parent_death)
    watch(fd, launcher, worker.gone)
    if module in WORKER_MODULES and "worker" in args:
        from tlrun.launch import _celery_fix

        _celery_fix.install()
        _celery_fix.register_ping()
        _celery_fix.register_active()
        _celery_fix.track_worker()
        worker.celery_worker = _celery_fix.tracked_worker
        if os.environ.get("TLRUN_FENCE_CHECK") == "1":  # opt-in: drop a replaced beat's late ticks
            from tlrun.launch import fencecheck

            fencecheck.install()
        beat_file = os.environ.pop(HEARTBEAT_ENV, None)
        if beat_file:
            from tlrun.launch import heartbeat

            heartbeat.install(beat_file)
        stats_prefix = os.environ.pop(TASK_STATS_ENV, None)
        if stats_prefix:
            from tlrun.launch import taskstats

            taskstats.install(stats_prefix)
        signal.signal(REQUEUE_SIGNAL, requeue_if_busy)
    elif module == "celery" and "beat" in args:  # beat's sends carry their publish time (queue wait metrics)
        from tlrun.launch import taskstats

        taskstats.stamp_publish_time()
    hooks = _hooks(os.environ.pop(HOOKS_ENV, ""))
    sys.argv = [module, *args]
    status: object = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        status = exc.code
    finally:
        # The program is done: a late request signal must not end us. Python's finalization puts every
        # signal with a Python handler back to its default action (for these: terminate, status 128+n);
        # an ignored one stays ignored.
        for late in (REQUEUE_SIGNAL, PARENT_GONE_SIGNAL):
            signal.signal(late, signal.SIG_IGN)
        worker.on_exit()
    code = status if isinstance(status, int) else (0 if status is None else 1)
    for hook in hooks:
        code = getattr(hook, "exit_status", lambda c: c)(code)
    if status is not None and not isinstance(status, int):
        sys.stderr.write(f"{status}\n")  # SystemExit("message"): Python prints it, as it would have
    sys.exit(code)


def _hooks(names: str) -> list[types.ModuleType]:
    import importlib

    hooks: list[types.ModuleType] = []
    for name in filter(None, names.split(",")):
        hook = importlib.import_module(name)
        hook.install()
        hooks.append(hook)
    return hooks


def main() -> None:
    launcher, fd, grace = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    argv = sys.argv[5:]
    group_stop = os.environ.pop(GROUP_ENV, None)
    module = None if group_stop else in_process_module(argv)
    set_pdeathsig(sig=signal.SIGTERM if module is None else PARENT_GONE_SIGNAL)
    # The launcher may have died between fork and prctl: then no signal will ever come. Stop here.
    if os.getppid() != launcher:
        sys.exit(EXIT_PARENT_GONE)
    # The child writes its own log file and relays to the console without ever waiting on the launcher.
    from tlrun.launch import relay as relay_module

    log_path = os.environ.pop(LOG_ENV, None)
    relay = relay_module.start(log_path, _secrets(os.environ))
    if module is None:  # a watchdog parent: its module is imported only here, never on a worker's start
        from tlrun.launch import _watchdog

        if group_stop:
            code = _watchdog.run_group(argv, fd, launcher, int(getattr(signal, group_stop, signal.SIGTERM)), grace)
        else:
            code = _watchdog.run_watchdog(argv, fd, launcher)
        if relay is not None:
            relay()
        sys.exit(code)
    os.set_inheritable(fd, False)  # the worker's pool children and a task's subprocesses never need it
    run_module(module, argv[3:], fd, launcher, grace, log_path, relay)


if __name__ == "__main__":
    main()
