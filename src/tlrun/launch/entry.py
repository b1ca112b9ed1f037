"""`python -m tlrun.launch.entry <celery arguments>`: Celery's own command line for held workers (tlrun dev,
`tlrun worker --fast-stop`).

Three things differ from `python -m celery`, and nothing else:
- with TLRUN_DEV_POLL=1 (tlrun dev), on Redis the transport's poll interval (`polling_interval`, the BRPOP
  timeout) is 0.1 s unless the app sets its own, so that a stop or a consumer cancel is seen within 0.1 s
  instead of 1 s;
- with TLRUN_HOLD_FD (a socket to the launcher), the app is imported first, and with it everything a worker
  imports at start (`app.loader.import_default_modules()`: the modules of `include`/`imports`, Django's
  `autodiscover_tasks()` and `django.setup()`); a failure there is printed as a traceback and ends this
  process with status 2, unconnected (Celery itself would find it only in the new worker, after the old
  one is gone). Then the worker says
  `ready <poll interval>`, builds its worker and starts its pool, and waits for `go` before its consumer
  connects: on a reload the next worker imports the new code and forks its pool children while the old one
  still serves, and the two never consume at the same time. EOF instead of `go` (the
  launcher gave up on this worker, or died) ends it before it ever connects. Once it consumes, it says
  `consuming` (the launcher's cue to ping it) and closes the socket.
- with TLRUN_SPARE as well, it first imports Celery itself (most of a worker's start-up) and its role's base
  (base.py: what the last worker imported from outside the project), says `spare` and waits for `load` before
  it imports the app: tlrun dev --reload keeps one such spare per role, so that a save costs only the import
  of the project's own code. A base gone stale or impure says `unusable <why>` instead and exits.
"""

from __future__ import annotations

import gc
import os
import socket
import sys
import traceback
from typing import Any

DEV_POLL_INTERVAL = 0.1
KOMBU_POLL_INTERVAL = 1.0  # the Redis transport's BRPOP timeout when the app sets none
HOLD_FD_ENV = "TLRUN_HOLD_FD"
DEV_POLL_ENV = "TLRUN_DEV_POLL"  # "1": shorten the poll interval (tlrun dev); otherwise only report it
SPARE_ENV = "TLRUN_SPARE"  # import Celery, say `spare`, and wait for `load` before importing the app
SPARE_WITH_BASE = "1"  # SPARE_ENV's value for a spare that also imports its role's base (base.py)
SPARE_PLAIN = "plain"  # ... and for one that imports Celery only
BASE_ENV = "TLRUN_BASE_FILE"  # base.py's: where a worker writes its installed modules, and a spare reads them


def app_name(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg in ("-A", "--app") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--app="):
            return arg.split("=", 1)[1]
    return None


def tune(app: Any, shorten: bool) -> float | None:
    """With `shorten`, set the dev poll interval where the user set none. Returns the interval in force on
    Redis (None for other transports)."""
    url = str(app.conf.broker_url or "")
    if not url.startswith(("redis://", "rediss://", "redis+socket://")):
        return None
    options = dict(app.conf.broker_transport_options or {})
    if shorten:
        options.setdefault("polling_interval", DEV_POLL_INTERVAL)
        app.conf.broker_transport_options = options
    return float(options.get("polling_interval") or KOMBU_POLL_INTERVAL)


def _broker_options(app: Any) -> str:
    """The app's connection settings, for the launcher's own connections (brokerconf.py): one JSON line over
    the hold socket, secrets and all, never on disk. Empty when they cannot be read."""
    try:
        from tlrun.launch import brokerconf

        return brokerconf.encode(brokerconf.options_from_conf(app.conf))
    except Exception:
        return ""


def _wait_for(sock: socket.socket, word: bytes) -> None:
    if sock.recv(16).strip() != word:
        os._exit(0)  # not released (EOF: the launcher gave up on us, or died): never connect


def _can_hold_in_worker(app: Any, argv: list[str]) -> bool:
    """A spare may build its worker and start its pool before `go` (they touch no broker) beside the old
    worker, unless that runs code of the user's or shares a file with the old one: a receiver of the signals
    Celery sends meanwhile (worker_init, worker_process_init... may bind a port the old worker holds), or a
    `--statedb` (Celery opens it as it builds the worker)."""
    import weakref

    from celery import signals

    flags = any(a in ("-S", "--statedb") or a.startswith("--statedb=") for a in argv)
    if app.conf.worker_state_db or flags:
        return False
    hooks = (
        signals.celeryd_init,
        signals.celeryd_after_setup,
        signals.worker_init,
        signals.worker_before_create_process,
        signals.worker_process_init,
    )
    for hook in hooks:
        for _key, receiver in list(hook.receivers or []):
            fn = receiver() if isinstance(receiver, weakref.ReferenceType) else receiver
            if fn is not None and not str(getattr(fn, "__module__", "")).startswith(("celery.", "kombu.", "tlrun.")):
                return False
    return True


def _hold_after_pool(app: Any, sock: socket.socket) -> None:
    """Wait for `go` inside the worker's start, once its pool runs and before its consumer connects (Celery
    orders the `last` Consumer step after every other): on a reload the spare builds its worker and forks its
    pool children while the old one drains, and after `go` only connects. Not released (EOF), it kills its own
    group, pool children included: they never connected either. Spares only: a first start's worker waits for
    the launcher's sweep before it has pool children (they would look like a stray's)."""
    from celery import bootsteps

    class TlrunHold(bootsteps.StartStopStep):  # type: ignore[misc]
        label = "tlrun hold"
        requires = ("celery.worker.components:Pool",)

        def start(self, parent: Any) -> None:
            if sock.recv(16).strip() != b"go":
                _flush_output()
                if os.getpgrp() == os.getpid():
                    from tlrun.launch._child import kill_own_group

                    kill_own_group()
                os._exit(0)

    app.steps["worker"].add(TlrunHold)


def _say_when_consuming(sock: socket.socket, base_file: str | None = None) -> None:
    """Once the worker consumes (Celery's worker_ready), say `consuming` on the hold socket and close it: the
    launcher pings the node only then, instead of every 25 ms while the worker connects (most of its CPU at
    start). Never blocks: a launcher that is gone or not reading loses the word, never the worker's time.
    With `base_file` (tlrun dev), first write there what the role's next spare imports (base.py)."""
    from celery import signals

    def consuming(**_: Any) -> None:
        if base_file:
            from tlrun.launch import base

            base.record(base_file)
        try:
            sock.send(b"consuming\n", socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except OSError:
            pass
        sock.close()

    main = os.getpid()

    def in_pool_child(**_: Any) -> None:
        if os.getpid() != main:  # the solo pool sends this signal in the worker's own process
            sock.close()  # a pool child's copy of the socket (forked before worker_ready): not its to use

    signals.worker_ready.connect(consuming, weak=False)
    signals.worker_process_init.connect(in_pool_child, weak=False)


def _warm_up() -> None:
    """A spare imports what every worker of any app needs, before it knows the new code: Celery's command
    line, the worker, the prefork pool, the Redis transport."""
    import celery.apps.worker
    import celery.bin.celery
    import celery.concurrency.prefork
    import celery.worker.consumer  # noqa: F401
    import kombu.transport.redis  # noqa: F401


def load_task_modules(app: Any, sock: socket.socket) -> None:
    """Import what the worker would import at start. A module that does not import ends us here, before we
    ever connect: the traceback names the file and line, and the launcher keeps the old worker serving."""
    try:
        app.loader.import_default_modules()
    except Exception:
        sock.close()
        traceback.print_exc()
        sys.stderr.flush()
        _flush_output()
        os._exit(2)


def _flush_output() -> None:
    """Before os._exit: the output relay (relay.py, in this process behind the shim) writes what it holds
    to the log file and the launcher (the traceback the launcher shows for a failed reload)."""
    relay = sys.modules.get("tlrun.launch.relay")
    if relay is not None:
        relay.finish_current()


def main() -> None:
    argv = sys.argv[1:]
    hold = os.environ.pop(HOLD_FD_ENV, None)
    shorten = os.environ.pop(DEV_POLL_ENV, "") == "1"
    spare = os.environ.pop(SPARE_ENV, "")
    base_file = os.environ.pop(BASE_ENV, None)
    sock = socket.socket(fileno=int(hold)) if hold is not None else None
    if sock is not None and spare:
        _warm_up()
        from tlrun.launch.base import Base

        built = Base(base_file if spare == SPARE_WITH_BASE else None).build()
        # What it imported lives as long as the worker: out of the collector's sight, so that the full
        # collection Celery runs before each pool child's fork (gc.collect(), 50 ms with Django) scans only
        # what the save's import adds, and pool children share those pages (Python's gc.freeze advice).
        gc.collect()
        gc.freeze()
        sock.sendall(f"spare {built.imported}\n".encode())
        _wait_for(sock, b"load")
        why = built.unusable()
        if why:
            sock.sendall(f"unusable {why}\n".encode())
            os._exit(0)
    name = app_name(argv)
    interval = None
    options = ""
    app = None
    if name is not None:
        from celery.app.utils import find_app  # before the project's folder can shadow it

        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())

        try:
            app = find_app(name)
        except Exception:
            if sock is not None:
                sock.close()  # never release a worker whose app does not import
                sock = None
            # Celery's command line below fails the same way and says why, as it would without tlrun.
        else:
            if sock is not None:
                load_task_modules(app, sock)
            interval = tune(app, shorten)
            options = _broker_options(app)
    if sock is not None:
        sock.sendall(f"ready {interval if interval is not None else ''} {options}\n".encode())
        if spare and app is not None and _can_hold_in_worker(app, argv):
            _say_when_consuming(sock, base_file)  # before the pool forks: its children close their copy
            _hold_after_pool(app, sock)
        else:
            _wait_for(sock, b"go")
            _say_when_consuming(sock, base_file)
    from celery.__main__ import main as celery_main

    sys.argv = ["celery", *argv]
    celery_main()


if __name__ == "__main__":
    main()
