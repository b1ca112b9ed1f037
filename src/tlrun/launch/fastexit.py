"""A worker whose launcher is gone, and which holds no task, goes at once instead of a warm shutdown.

Runs inside the worker (`_child.py` calls `try_fast_exit` from its lifeline thread). The worker's own state
says whether it holds anything: a request active, reserved or waiting for its ETA in the timer, a job in the
pool. Holding anything, it takes the warm shutdown as before (a running task finishes). Holding nothing, it
stops the way dev's fast stop does (drain.py), from inside:

- AMQP: the broker gives back every unacknowledged message when the connection dies, so a SIGKILL of the
  process group loses nothing.
- Redis: a BRPOP in flight can pop a message after the check, and only a live worker puts it back. So, on
  the worker's own event loop (a safe point of its main thread): cancel every task queue (no new BRPOP
  starts), wake the BRPOP in flight with `CLIENT UNBLOCK` from a second connection (it returns empty, or
  with a message that kombu, finding no consumer, puts back), look again, and only then SIGKILL the group.

Anything unexpected (no event loop, a gevent pool, an error, no answer within the wait) falls back to the
warm shutdown: this path may only make the stop faster, never lose a message.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

LOOP_WAIT = 3.0  # seconds the lifeline thread waits for the event loop to act before the warm path
RECHECK = 0.01  # between two looks, on the event loop, for the BRPOP in flight to come back


def holds_tasks(worker: Any) -> bool:
    """Any request active, reserved or scheduled (ETA/countdown), or any job out in the pool."""
    from celery.worker import state
    from celery.worker.request import Request

    from tlrun.launch._celery_fix import running_tasks

    if state.active_requests or state.reserved_requests or running_tasks():
        return True
    timer = getattr(getattr(worker, "consumer", None), "timer", None)
    for waiting in list(getattr(getattr(timer, "schedule", None), "queue", ()) or ()):
        args = getattr(getattr(waiting, "entry", None), "args", None) or ()
        if args and isinstance(args[0], Request):
            return True
    return False


def try_fast_exit(worker: Any, say: Callable[[str], None], finish: Callable[[], None]) -> None:
    """Kill this worker's group when it holds nothing (see above). Returns only when it did not: the caller
    then takes the warm path."""
    try:
        consumer = worker.consumer
        transport = consumer.connection.transport
        driver = getattr(transport, "driver_type", "")
        if holds_tasks(worker):
            return
        if driver == "amqp":
            _stop_now(say, finish)
        hub = getattr(worker, "hub", None)
        if driver != "redis" or hub is None:
            return
    except Exception:  # Celery not started yet, or changed: the warm path, as before
        return
    _on_the_loop(worker, consumer, transport, hub, say, finish)


def _stop_now(say: Callable[[str], None], finish: Callable[[], None]) -> None:
    say("tlrun: the launcher is gone and this worker holds no task: stopping at once")
    finish()
    os.killpg(os.getpgrp(), signal.SIGKILL)


def _on_the_loop(worker: Any, consumer: Any, transport: Any, hub: Any, say: Callable[[str], None], finish: Any) -> None:
    """Returns only when the fast exit did not happen (the event loop found a task, failed, or did not act in
    time): the caller then takes the warm path. Otherwise the event loop kills the group, this thread too."""
    canceled = threading.Event()
    refused = threading.Event()  # busy after all, or an error: the warm path

    def in_poll() -> list[Any]:
        return [ch for ch in list(transport.channels) if getattr(ch, "_in_poll", None)]

    def cancel() -> None:
        try:
            if holds_tasks(worker):
                refused.set()
                return
            for queue in list(consumer.task_consumer.queues):
                consumer.cancel_task_queue(queue.name)
            canceled.set()
            hub.call_later(RECHECK, settle)
        except Exception:
            refused.set()

    def settle() -> None:
        try:
            if in_poll():
                hub.call_later(RECHECK, settle)  # the BRPOP in flight comes back within its timeout
                return
            if holds_tasks(worker):  # a message that BRPOP brought became a request: finish it warm
                refused.set()
                return
            _stop_now(say, finish)
        except Exception:
            refused.set()

    try:
        hub.call_soon(cancel)
        _unblock(in_poll())  # wakes the event loop, so that it runs `cancel` now
        if canceled.wait(LOOP_WAIT):
            _unblock(in_poll())  # the BRPOP started before the cancel: back now, not at its timeout
            refused.wait(LOOP_WAIT)
    except Exception:
        pass


def _unblock(channels: list[Any]) -> None:
    """`CLIENT UNBLOCK` each channel's blocked BRPOP connection, found by its local address in CLIENT LIST."""
    for channel in channels:
        try:
            sock = channel._in_poll._sock
            local = sock.getsockname()
            if not isinstance(local, tuple):
                continue  # a unix socket: every client has the same address; the BRPOP times out instead
            addr = f"{local[0]}:{local[1]}" if ":" not in local[0] else f"[{local[0]}]:{local[1]}"
            client = channel._create_client(asynchronous=False)
            try:
                for entry in client.client_list():
                    if entry.get("addr") == addr:
                        client.client_unblock(int(entry["id"]))
            finally:
                client.close()
        except Exception:
            continue  # the BRPOP then returns at its own timeout
