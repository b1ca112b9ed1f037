"""The beat process holds the cluster's beat lease itself, and fences every send with it.

Loaded by tlrun's shim into a beat it runs in place (`TLRUN_CHILD_HOOKS`), before Celery's beat starts:

- a thread takes the lease (standing by while another host holds it) and renews it (lease.py's BeatLease,
  on the beat's own connection: on RabbitMQ the exclusive queue's connection belongs to this process);
- Celery's `Scheduler.apply_entry` is wrapped: before each tick's send, the lease must be held and its last
  successful renewal younger than ttl minus the safety margin, on a clock that also runs while the machine
  sleeps (CLOCK_BOOTTIME on Linux). Otherwise nothing is sent. So a paused launcher does not matter (it
  holds nothing), a paused beat cannot send when it resumes (its renewal is too old), and a beat cut off from
  the broker stops sending before the broker could let the lease pass to another host;
- a beat that held the lease and lost it stops (status EXIT_LEASE_LOST: its launcher starts a standby);
- the state goes to a small JSON file the launcher reads (`held`, `standby`, `lost`, with a message).

A standby beat runs warm: Celery and the app imported, its scheduler running, every send fenced. When it
takes the lease the next due tick is sent, from its own schedule file (per host, as before).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from tlrun.cluster.backends import backend_for
from tlrun.cluster.lease import BeatLease, Holder
from tlrun.launch import brokerconf

CONFIG_ENV = "TLRUN_BEAT_FENCE"  # JSON: name, ttl, host, status (the status file's path)
EXIT_LEASE_LOST = 75  # EX_TEMPFAIL: the beat lost the lease and stopped; its launcher stands by
DEFER_MAX = 1.0  # a stop signal waits at most this long for the tick it landed in
TICK = 0.1  # how often the lease's thread looks whether a renewal or a retry is due


def clock() -> float:
    """Seconds on a clock that never goes back and keeps running while the machine is suspended."""
    boottime = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(boottime) if boottime is not None else time.monotonic()


class FenceClosed(Exception):
    """A send refused by the fence, at the last moment (raised inside the publish; Celery logs it)."""


class Fence:
    def __init__(self, lease: BeatLease, status_path: str | None, stuck_for: Callable[[], float] = lambda: 0.0) -> None:
        self.lease = lease
        self.status_path = status_path
        self.lost = False
        self._stop = threading.Event()
        self.stuck_for = stuck_for  # how long beat's scheduler has been inside one tick (0: between ticks)

    def may_send(self) -> bool:
        return self.lease.valid(clock())

    def write_status(self, state: str, message: str | None) -> None:
        if not self.status_path:
            return
        record = {"state": state, "message": message, "pid": os.getpid(), "holder": self.lease.me.encode()}
        tmp = f"{self.status_path}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(record, fh)
            os.replace(tmp, self.status_path)
        except OSError:
            pass

    def run(self) -> None:
        """The lease's thread: take it, renew it, and stop the beat when it is lost."""
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())  # signals go to beat's main thread
        while not self._stop.is_set():
            # The lease follows beat's progress: a tick stuck longer than a renewal interval (a blocked write, a
            # hung connection, a debugger) is not renewed for, so that a standby takes over within ttl plus one
            # renewal; the stuck beat stops once its lease is no longer valid.
            stuck = self.stuck_for()
            if self.lease.held and stuck > self.lease.renew_every:
                if not self.lease.valid(clock()):
                    # One look at the broker, to say why (its timeout is within the margin): a tick that waits
                    # on a broker that does not answer is the common case.
                    if self.lease.backend.confirm(self.lease.me) is None:
                        self.lose(
                            f"cannot renew the beat lease (the broker does not answer; beat has waited in one "
                            f"tick for {stuck:.1f} s): stopping beat before the lease can pass to another host"
                        )
                    else:
                        self.lose(
                            f"beat has been stuck in one tick for {stuck:.1f} s: its beat lease was not renewed "
                            "and may pass to another host; stopping beat"
                        )
                    return
                self._stop.wait(TICK)
                continue
            poll = getattr(self.lease.backend, "poll", None)  # RabbitMQ: what the broker sent, at once
            if poll is not None and self.lease.held:
                poll()
            change = self.lease.tick(clock())
            if change.action == "start":
                self.write_status("held", change.message)
            elif change.action == "standby" and change.message:
                self.write_status("standby", change.message)
            elif change.action == "stop":
                self.lose(change.message or "the beat lease is lost")
                return
            self._stop.wait(TICK)

    def lose(self, message: str) -> None:
        if self.lost:
            return
        self.lost = True
        self.write_status("lost", message)
        os.write(2, f"tlrun: {message}\n".encode())
        os.kill(os.getpid(), signal.SIGTERM)  # beat's own handler: it saves its schedule and exits

    def close(self) -> None:
        self._stop.set()
        self.lease.release()


def _guard(fence: Fence) -> None:
    from celery import beat

    original = beat.Scheduler.apply_entry

    def apply_entry(self: Any, entry: Any, producer: Any = None) -> Any:
        if fence.may_send():
            return original(self, entry, producer=producer)
        if fence.lease.held:  # held, but not renewed in time: another host may take it before we send
            fence.lose(
                f"the beat lease was last renewed {clock() - fence.lease.renewed_at:.1f} s ago (ttl "
                f"{fence.lease.ttl:g} s): not sending {entry.name}; stopping beat"
            )
        return None

    beat.Scheduler.apply_entry = apply_entry
    _guard_publish(fence)


def _guard_publish(fence: Fence) -> None:
    """The last check, right before a task message leaves (after Celery's before_task_publish receivers,
    which may have blocked): the lease still valid on this beat's clock, and still its own on the broker
    (Redis: its key holds this beat's value; RabbitMQ: its connection is alive). A key that vanished early
    (eviction, a failover, FLUSHDB) stops the old holder before its next send. The message carries who sent
    it and the fencing token of the lease (Redis: one more at each takeover), for consumers that check it."""
    import importlib

    messaging: Any = importlib.import_module("kombu.messaging")  # untyped: its names as Any
    original = messaging.Producer.publish

    def publish(self: Any, body: Any, *args: Any, **kwargs: Any) -> Any:
        headers = kwargs.get("headers")
        if isinstance(headers, dict) and headers.get("task"):
            lease = fence.lease
            if not lease.held:
                raise FenceClosed("this beat does not hold the beat lease: not sending")
            if not fence.may_send() or lease.backend.confirm(lease.me) is False:
                message = (
                    f"the beat lease is no longer this beat's on the broker: not sending {headers.get('task')}; "
                    "stopping beat"
                )
                fence.lose(message)
                raise FenceClosed(message)
            headers["tlrun_beat"] = lease.me.encode()
            token = getattr(lease.backend, "fence", None)
            if token is not None:
                headers["tlrun_fence"] = token
        return original(self, body, *args, **kwargs)

    messaging.Producer.publish = publish


class _TickGuard:
    """Celery beat's SIGTERM/SIGINT handler (`Beat.install_sync_handler`) saves the schedule from inside the
    handler: landing during a tick's send it closes the schedule's shelf under the tick, which then fails
    (`I/O operation on closed file`, `invalid operation on closed shelf`) and beat exits 1. A signal that
    lands during a tick is kept until the tick returns; then beat stops the way it always does (SystemExit
    out of the loop, whose `finally` saves the schedule). Between ticks, Celery's own handler runs as before.
    Never at the lease's expense: a beat that lost the lease stops at once, and a tick still running
    DEFER_MAX seconds after the signal (a send retrying against a broker that is gone) is stopped then."""

    def __init__(self, urgent: Callable[[], bool]) -> None:
        self.depth = 0
        self.pending = False
        self.urgent = urgent
        self.entered = 0.0  # when the tick in progress began (clock())

    def stuck_for(self) -> float:
        return clock() - self.entered if self.depth else 0.0

    def install(self) -> None:
        from celery import beat
        from celery.apps import beat as beat_app

        guard = self
        original_tick = beat.Scheduler.tick

        def tick(scheduler: Any, *args: Any, **kwargs: Any) -> Any:
            if not guard.depth:
                guard.entered = clock()
            guard.depth += 1
            try:
                return original_tick(scheduler, *args, **kwargs)
            finally:
                guard.depth -= 1
                if guard.pending and guard.depth == 0:
                    guard.pending = False
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    raise SystemExit()

        def install_sync_handler(self: Any, service: Any) -> None:
            from celery import platforms

            def _stop() -> None:
                guard.pending = False
                service.sync()
                raise SystemExit()

            def _sync(signum: int, frame: Any) -> None:
                if guard.depth and not guard.urgent():
                    guard.pending = True  # the tick ends first, or DEFER_MAX passes
                    signal.setitimer(signal.ITIMER_REAL, DEFER_MAX)
                    return
                _stop()

            def _late(signum: int, frame: Any) -> None:
                if guard.pending:
                    _stop()

            platforms.signals.update(SIGTERM=_sync, SIGINT=_sync, SIGALRM=_late)

        beat.Scheduler.tick = tick
        beat_app.Beat.install_sync_handler = install_sync_handler


_fence: Fence | None = None


def install() -> None:
    """Called by the shim in a beat process when CONFIG_ENV is set."""
    global _fence
    config = json.loads(os.environ.pop(CONFIG_ENV))
    url = os.environ.get("CELERY_BROKER_URL") or ""
    ttl = float(config["ttl"])
    brokerconf.register(url, config.get("broker_options") or {}, "launcher")  # the app's, as its launcher knew them
    lease = BeatLease(backend_for(url, str(config["name"]), ttl), Holder.new(os.getpid(), config["host"]), ttl)
    tick_guard = _TickGuard(lambda: _fence is not None and _fence.lost)
    _fence = Fence(lease, config.get("status"), tick_guard.stuck_for)
    _fence.write_status("standby", None)
    _guard(_fence)
    tick_guard.install()
    threading.Thread(target=_fence.run, name="tlrun-beat-lease", daemon=True).start()


def exit_status(status: int) -> int:
    """The beat's exit status, once Celery's beat has stopped: EXIT_LEASE_LOST when it stopped because the
    lease was lost. The lease is released on the way out (a stopped beat's lease passes at once)."""
    if _fence is None:
        return status
    _fence.close()
    return EXIT_LEASE_LOST if _fence.lost else status
