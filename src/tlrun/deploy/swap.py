"""Reload: each role's next worker imports the new code while the old one serves; only then do they swap.

One path for tlrun dev --reload (a save), `tlrun reload [--role R]` (a request from another shell, to dev or
to tlrun worker) and SIGHUP to `tlrun worker` (systemd's ExecReload, `supervisorctl signal HUP`). A new
worker that does not import its app and task modules never connects: the old one keeps serving and the
request is answered with the error.

Two ways to swap after that same preparation:
- in place (tlrun dev): the old worker stops (on Redis it stops fetching at the save, drain.pause; an idle one
  is drained and killed at once, a busy one finishes its tasks) and the successor takes its node name;
- beside (tlrun worker, `overlap`): the successor runs under its generation's node name (`api4242-2@host`,
  claimed on the broker like every node name) and answers its own ping while the old one still serves; only
  then does the old one stop fetching (`cancel_consumer` on each queue) and finish its running tasks with the
  warm stop ladder, while what it had prefetched and not started goes back to the queue (Redis: the live
  worker restores its unacked messages as it shuts down; RabbitMQ: its channel's close). There is no moment
  without a consumer, and no name answers twice.
"""

from __future__ import annotations

import functools
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from tlrun.deploy import beat_reload
from tlrun.deploy.spares import Spares
from tlrun.events import Notice, Reloaded, Reloading, Saved
from tlrun.launch import checks, drain, unitstop, verify
from tlrun.launch.broker import Broker
from tlrun.launch.hold import Hold
from tlrun.launch.steps import Step
from tlrun.launch.units import READY, STARTING, STOPPING, WAITING, Unit, WorkerUnit

if TYPE_CHECKING:
    from tlrun.dev.reload import Watcher
    from tlrun.launch.launcher import Launcher

MAX_GENERATION_TRIES = 100


class ReloadStep(Step):
    """Reloads on a save (with a watcher), on `tlrun reload`, and on SIGHUP where the launcher takes it so.

    Spares (dev with a watcher): one held worker per role with Celery imported and the app not yet, so that a
    save costs only the import of the new code."""

    name = "reload"

    def __init__(self, watcher: Watcher | None = None, overlap: bool = False) -> None:
        self.watcher = watcher
        self.overlap = overlap
        self.spares = Spares(keep=watcher is not None and not overlap)
        self._next: dict[str, tuple[str, Hold]] = {}  # unit child -> prepared successor waiting for the old one
        self._changes: tuple[str, ...] = ()
        self._why = ""
        self._started = 0.0
        self._count = 0
        self._released: list[tuple[WorkerUnit, Hold]] = []  # successors released, verified on the next turn
        self._requests: dict[str, str] = {}  # unit child -> id of the `tlrun reload` request it answers
        self._generations: dict[str, int] = {}  # unit child -> generation of its prepared successor
        self._retiring: dict[str, str] = {}  # child of an old worker finishing its tasks -> its node name
        self._beat_pending = False  # beat restarts with the new code once the swap's successors answer

    # -- the step's hooks ------------------------------------------------------------------------------
    def prepare(self, launcher: Launcher) -> None:
        if self.watcher is not None:
            self.watcher.on_change = launcher.sup.wakeup.set
            self.watcher.start()  # before the first start: a save made while the workers start is seen

    def started(self, launcher: Launcher) -> None:
        for w in launcher.workers:
            launcher.record(w, reload_requests=True)  # `tlrun reload` may ask this launcher
        if launcher.beat is not None and not launcher.workers:
            launcher.record(launcher.beat, reload_requests=True)  # `tlrun beat`: reload restarts beat
        self.spares.spawn(launcher)

    def on_start_failed(self, launcher: Launcher, error: Exception) -> bool:
        if self.watcher is None:
            return False
        launcher.report(Notice(f"{error}; fix it and save: tlrun restarts the worker on the next change", "warning"))
        for w in launcher.workers:
            launcher.set_state(w, WAITING)
        return True

    def poll(self, launcher: Launcher) -> bool:
        return (
            bool(self._released)
            or (self.watcher is not None and self.watcher.pending())
            or launcher.sup.reload_pending
            or bool(launcher.unit_stops.reloads)
            or bool(self.spares.orphaned(launcher))
        )

    def act(self, launcher: Launcher) -> None:
        self.spares.prune(launcher)
        if self._released:
            self._verify_released(launcher)
        if self.watcher is not None and self.watcher.pending():
            changes = tuple(self.watcher.take())
            launcher.report(Saved(changes))  # the stack's processes that restart on a save (dev/stack.py)
            self.reload(launcher, changes=changes)
        if launcher.sup.take_reload():
            self.reload(launcher, why="SIGHUP")
        while launcher.unit_stops.reloads:
            request = launcher.unit_stops.reloads.pop(0)
            roles = request.get("roles")
            wanted = {str(r) for r in roles} if isinstance(roles, list) else None
            why = str(request.get("why") or "tlrun reload")
            self.reload(launcher, roles=wanted, why=why, request=str(request.get("id") or ""))

    def on_exit(self, launcher: Launcher, unit: Unit, status: int, tail: tuple[str, ...]) -> bool:
        if self.watcher is None:
            return False  # tlrun worker: the restart step, or the launcher's end
        launcher.set_state(unit, WAITING)
        launcher.report(Notice(f"waiting for a change to start the {unit.label} again"))
        return True

    def on_child_exit(self, launcher: Launcher, child: str, status: int) -> bool:
        """A spare, a prepared successor or a retiring old worker exited: forget it."""
        node = self._retiring.pop(child, None)
        if node is not None:
            if not launcher.sup.stop_requested:
                launcher.report(Notice(f"reload: the old worker {node} finished its tasks and stopped ({status})"))
            return True
        for table in (self.spares.table, self._next):
            for owner, (name, hold) in list(table.items()):
                if name == child:
                    hold.close()
                    del table[owner]
                    return True
        return "+spare" in child or "+next" in child

    def close(self, launcher: Launcher) -> None:
        if self.watcher is not None:
            self.watcher.close()
        for _name, hold in [*self.spares.table.values(), *self._next.values()]:
            hold.close()

    # -- a reload ------------------------------------------------------------------------------------
    def reload(
        self,
        launcher: Launcher,
        roles: set[str] | None = None,
        changes: tuple[str, ...] = (),
        why: str = "",
        request: str = "",
    ) -> None:
        """Reload every role's worker (or `roles`'): prepare each successor; when all import, swap."""
        self._changes, self._why = changes, why
        self._started = time.monotonic()
        workers = [w for w in launcher.workers if w.alive and (roles is None or w.role.name in roles)]
        if not workers:
            if not launcher.workers and launcher.beat is not None:  # `tlrun beat`: the schedule is its code
                beat_reload.reload_beat_alone(launcher, why, request)
            return
        for w in workers:
            if request:
                self._requests[w.child] = request
        launcher.report(Reloading(why or "a save"))
        prepared = {w.child: self._prepare(launcher, w) for w in workers}
        paused = None if self.overlap else unitstop.pause_for_swap(launcher, workers)
        deadline = time.monotonic() + launcher.s.ready_timeout
        for w in workers:
            name, hold = prepared[w.child]
            ready = hold.wait_prepared(deadline, functools.partial(launcher.alive, name))
            if not ready and hold.unusable:  # the spare's base is stale or impure: a fresh worker instead
                self.spares.unusable(launcher, name, hold.unusable)
                name, hold = prepared[w.child] = self._prepare(launcher, w)
                ready = hold.wait_prepared(deadline, functools.partial(launcher.alive, name))
            if not ready:
                unitstop.resume_paused(launcher, workers, paused)  # the old code serves on
                self._abandon(launcher, workers, prepared, failed=w)
                return
            launcher.keep_broker_options(hold.broker_options)  # the new code's broker settings verify it
        if self.overlap:
            beat_reload.restart_beat(launcher)
            self._swap_beside(launcher, workers, prepared)
            return
        # The new code imports: swap. A successor still waiting from an earlier save has older code.
        for w in workers:
            stale = self._next.pop(w.child, None)
            if stale is not None:
                stale[1].close()
                launcher.end_child(stale[0])
            self._next[w.child] = prepared[w.child]
        launcher.stop_units(
            [w for w in workers if w.state != STOPPING], "reload", then=lambda unit: self._release(launcher, unit)
        )
        self._beat_pending = True  # beat again once the successors released now answer: its stop delays no task
        if not self._released:  # else after their verification: a spare's start would slow theirs
            self._restart_beat(launcher)
            self.spares.spawn(launcher)

    def _restart_beat(self, launcher: Launcher) -> None:
        if self._beat_pending:
            self._beat_pending = False
            beat_reload.restart_beat(launcher)

    def _prepare(self, launcher: Launcher, w: WorkerUnit) -> tuple[str, Hold]:
        """The role's spare, told to import the app now; else a new held worker. Either is named
        `<unit>+next.N` until it takes the unit's name (a new spare may start meanwhile). Beside the old
        one, it runs under its own generation's node name."""
        self._count += 1
        name = f"{w.child}+next.{self._count}"
        spare = self.spares.take(launcher, w, name)
        if spare is not None:
            return name, spare
        hold = Hold()
        node = None
        if self.overlap:
            self._generations[w.child], node = self._next_generation(launcher, w)
            w.next_node = node
        w.spawn(launcher, name, hold, announce=False, node=node)
        return name, hold

    def _next_generation(self, launcher: Launcher, w: WorkerUnit) -> tuple[int, str]:
        """The next generation's node name no worker of ours uses and nobody else claimed on the broker."""
        ours = {u.node for u in launcher.workers} | set(self._retiring.values())
        generation = w.generation + 1
        while generation < w.generation + MAX_GENERATION_TRIES:
            node = w.generation_node(generation)
            if node not in ours and all(step.claim(launcher, node) for step in launcher.steps):
                break
            generation += 1  # claimed by another launcher (same host name and pid: clones)
        return generation, w.generation_node(generation)

    # -- in place (dev) ------------------------------------------------------------------------------
    def _release(self, launcher: Launcher, unit: Unit) -> None:
        """The old worker is gone: its successor takes its name and connects. It is verified on the loop's
        next turn, together with every successor released meanwhile (their starts overlap)."""
        assert isinstance(unit, WorkerUnit)
        successor = self._next.pop(unit.child, None)
        if successor is None:
            return
        name, hold = successor
        if launcher.sup.stop_requested or not launcher.sup.running(name):
            hold.close()
            launcher.end_child(name)
            self._answer(launcher, unit, False, "the new worker ended before it connected")
            return
        launcher.sup.rename(name, unit.child)
        launcher.outputs.rename(name, unit.child)
        unit.poll_interval = hold.poll_interval
        unit.hold = hold
        launcher.set_state(unit, STARTING)
        hold.release()
        self._released.append((unit, hold))

    def _verify_released(self, launcher: Launcher) -> None:
        released, self._released = self._released, []
        deadline = time.monotonic() + launcher.s.ready_timeout
        for unit, hold in released:
            if launcher.wait_ready([unit], deadline, {unit.child: hold}) is not None:
                if not launcher.sup.stop_requested:
                    message = f"reload: {unit.node} did not answer after its release"
                    launcher.report(Notice(message, "warning"))
                    self._answer(launcher, unit, False, message)
                continue
            self._done(launcher, [unit])
        self._restart_beat(launcher)
        self.spares.spawn(launcher)

    # -- beside (production) ---------------------------------------------------------------------------
    def _swap_beside(
        self, launcher: Launcher, workers: list[WorkerUnit], prepared: dict[str, tuple[str, Hold]]
    ) -> None:
        """Release every successor under its own name, see each answer its own ping, then let each take its
        unit over while the old one stops fetching and finishes what it runs."""
        for w in workers:
            prepared[w.child][1].release()
        deadline = time.monotonic() + launcher.s.ready_timeout
        answered: list[WorkerUnit] = []
        with Broker(launcher.broker_url) as broker:
            for w in workers:
                name = prepared[w.child][0]
                alive = functools.partial(launcher.alive, name)
                assert w.next_node is not None
                said = functools.partial(prepared[w.child][1].wait_consuming, alive=alive)
                pid = launcher.sup.pid(name)
                if verify.wait_ready(broker, w.next_node, deadline, alive, launcher.stop_asked, pid, said=said):
                    answered.append(w)
        if launcher.sup.stop_requested:
            return
        retiring: dict[str, tuple[str, float | None]] = {}
        for w in workers:
            name, hold = prepared[w.child]
            if w not in answered:
                message = f"reload: the new worker {w.next_node} did not answer; {w.node} keeps serving"
                w.next_node = None
                launcher.report(Notice(message, "warning"))
                self._answer(launcher, w, False, message)
                launcher.sup.begin_stop([name])  # it may have taken a task: the warm ladder; on_child_exit forgets it
                self._next[w.child] = (name, hold)
                continue
            old = self._take_over(launcher, w, name, hold)
            if old is not None:
                retiring[old[0]] = (old[1], old[2])
        # The old ones stop fetching before the reload is said done: a task sent after that runs the new code.
        self._retire(launcher, retiring)
        if answered:
            self._done(launcher, answered, retiring=tuple(node for node, _poll in retiring.values()))

    def _take_over(
        self, launcher: Launcher, w: WorkerUnit, name: str, hold: Hold
    ) -> tuple[str, str, float | None] | None:
        """The successor becomes the unit's worker; the old one's child name, node and poll interval (None
        when it was not running)."""
        old: tuple[str, str, float | None] | None = None
        if launcher.sup.running(w.child):
            old_name = f"{w.child}+old.{self._count}"
            launcher.sup.rename(w.child, old_name)
            launcher.outputs.rename(w.child, old_name)
            old = (old_name, w.node, w.poll_interval)
        launcher.sup.rename(name, w.child)
        launcher.outputs.rename(name, w.child)
        launcher.outputs.release(w.child)
        assert w.next_node is not None
        w.node, w.next_node, w.renamed_from = w.next_node, None, None
        w.generation = self._generations.pop(w.child, w.generation + 1)
        w.poll_interval = hold.poll_interval
        w.hold = hold
        w.since = datetime.now().strftime("%H:%M:%S")
        pid = launcher.sup.pid(w.child)
        w.heartbeat = w.next_heartbeat
        launcher.set_state(w, READY, node=w.node, worker_pid=pid, heartbeat=w.heartbeat, serving_since=time.time())
        return old

    def _retire(self, launcher: Launcher, retiring: dict[str, tuple[str, float | None]]) -> None:
        """The old workers stop fetching (their queues cancelled, all at once); an idle one that holds nothing
        stops at once where the launcher stops fast, any other finishes its tasks with the warm stop ladder."""
        if not retiring:
            return
        verdicts = drain.drain_many(launcher.broker_url, {node: poll for node, poll in retiring.values()})
        for name, (node, _poll) in retiring.items():
            self._retiring[name] = node
            verdict = verdicts.get(node)
            if verdict is not None and verdict.ok and launcher.opts.fast_stop:
                launcher.sup.kill(name)
                launcher.outputs.detach(name)
                del self._retiring[name]
                launcher.report(Notice(f"reload: the old worker {node} was idle: drained and stopped"))
                continue
            reason = verdict.why if verdict is not None and not verdict.ok else "it holds nothing"
            launcher.report(Notice(f"reload: the old worker {node} stopped fetching and finishes its tasks ({reason})"))
            launcher.sup.begin_stop([name])

    # -- the outcome -----------------------------------------------------------------------------------
    def _done(self, launcher: Launcher, units: list[WorkerUnit], retiring: tuple[str, ...] = ()) -> None:
        seconds = time.monotonic() - self._started
        report = launcher.ready_report(units, seconds)
        base = sum(w.hold.base_modules for w in units if w.hold is not None)
        launcher.report(Reloaded(self._changes, seconds, report, self._why, retiring, base))
        launcher.report(Reloading(self._why, done=True))
        for w in units:
            pid = launcher.sup.pid(w.child)
            self._answer(launcher, w, True, f"{w.node} (pid {pid}) ready in {seconds:.2f} s")

    def _answer(self, launcher: Launcher, w: WorkerUnit, ok: bool, message: str) -> None:
        """Answer the `tlrun reload` request this unit's reload came from, in the unit's lock record."""
        if not ok:
            launcher.report(Reloading(self._why, done=True, ok=False))
        request = self._requests.pop(w.child, None)
        if request:
            answer: dict[str, Any] = {"id": request, "ok": ok, "message": message}
            launcher.record(w, reload=answer)

    def _abandon(
        self,
        launcher: Launcher,
        workers: list[WorkerUnit],
        prepared: dict[str, tuple[str, Hold]],
        failed: WorkerUnit,
    ) -> None:
        """A prepared worker did not import: end every prepared one unconnected; the old ones keep serving."""
        status: int | None = None
        tail: list[str] = []
        for child, (name, hold) in prepared.items():
            hold.close()
            code, lines = launcher.end_child(name, settle=5.0 if child == failed.child else 0.0)
            if child == failed.child:
                status, tail = code, list(lines)
        for w in workers:
            w.next_node = None
            self._generations.pop(w.child, None)
        if launcher.sup.stop_requested:
            return
        error = checks.start_failure(launcher.s.app, launcher.s.ready_timeout, status, tail, status is None)
        old = [w for w in launcher.workers if w.state == READY]
        keeps = (
            f"the worker of {old[0].since} keeps running the previous code"
            if len(old) == 1
            else f"{len(old)} workers keep running the previous code"
            if old
            else "no worker runs until the next good save"
        )
        launcher.report(Notice(f"reload failed: {error}; {keeps}", "warning"))
        for w in workers:
            self._answer(launcher, w, False, f"{error}; {keeps}")
        self.spares.spawn(launcher)
