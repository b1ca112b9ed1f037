"""Every signal tlrun sends goes through this module, so one screen shows them all.

Two kinds of target:
- processes found in the process table (strays, a lock holder): held as psutil.Process objects, whose
  identity (pid plus create time) is re-checked right before each signal, so a reused pid is never hit;
- the child this launcher spawned and has not reaped yet: its pid cannot be reused while it is unreaped,
  so its process group is safe to signal until we reap it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import psutil

from tlrun.launch._child import portable
from tlrun.launch.procs import Identity, protected_pids

log = logging.getLogger(__name__)

POLL = 0.05
KILL_WAIT = 5.0  # after SIGKILL, how long until we call a process a survivor


def signal_name(sig: int) -> str:
    """SIGTERM, or SIGRTMIN+2 for a realtime signal (not a member of signal.Signals)."""
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def process_for(identity: Identity, init_ok: bool = False) -> psutil.Process | None:
    """The live process with exactly this identity and owner, else None (gone, reused pid, other user).
    Pid 1 only with `init_ok` (a launcher that is its container's PID 1, named by its lock record)."""
    if identity.pid in protected_pids() - ({1} if init_ok else set()):
        return None
    try:
        proc = psutil.Process(identity.pid)
        if abs(proc.create_time() - identity.create_time) > 0.01 or proc.uids().real != os.getuid():
            return None
        return proc
    except (psutil.Error, OSError):
        return None


def launcher_for(identity: Identity) -> psutil.Process | None:
    """The live tlrun launcher with exactly this identity, else None: a record naming an unrelated
    process (the host's init, a reused pid, anything whose command line is not tlrun's) is never signalled.
    Pid 1 is a launcher when it is tlrun with this very create time: tlrun as a container's PID 1, which
    the kernel lets its namespace signal only with the signals it handles (tlrun's stop and request
    signals)."""
    proc = process_for(identity, init_ok=True)
    return proc if proc is not None and _is_tlrun(proc) else None


def _is_tlrun(proc: psutil.Process) -> bool:
    try:
        return "tlrun" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def is_alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (psutil's is_running() is True for zombies; for us they are gone)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def send(proc: psutil.Process, sig: int) -> bool:
    """Signal a process found in the process table. False when it is gone, reused, or protected."""
    if proc.pid in protected_pids() and not (proc.pid == 1 and _is_tlrun(proc)):
        log.warning("refusing to signal protected pid %d", proc.pid)
        return False
    try:
        # is_running() compares the create time recorded when `proc` was made: identity check.
        if not proc.is_running():
            return False
        proc.send_signal(sig)  # psutil checks the identity once more
        log.debug("sent %s to pid %d", signal_name(sig), proc.pid)
        return True
    except (psutil.NoSuchProcess, ProcessLookupError):
        return False
    except psutil.AccessDenied:
        log.warning("no permission to signal pid %d", proc.pid)
        return False


def _pool_child(main_pid: int | None, pid: int) -> psutil.Process | None:
    """`pid` when it is a live child of our worker `main_pid` right now (never the main process itself)."""
    if main_pid is None or pid == main_pid:
        return None
    try:
        proc = psutil.Process(pid)
        return proc if proc.ppid() == main_pid else None
    except psutil.Error:
        return None


def kill_pool_child(main_pid: int | None, pid: int, also: Sequence[psutil.Process] = ()) -> bool:
    """SIGKILL one pool child of our worker (a hung or runaway task) and every process its task started (its
    descendants, listed before the kill: an ffmpeg the task waits on would outlive it, orphaned; `also`: those
    that left the tree, as the memory guard followed them), never the worker's main process: only when `pid`
    is a live child of `main_pid` right now. False otherwise."""
    proc = _pool_child(main_pid, pid)
    if proc is None:
        return False
    try:
        descendants = proc.children(recursive=True)
    except psutil.Error:
        return False
    descendants += [p for p in also if p.pid not in {d.pid for d in descendants} and p.pid != main_pid]
    killed = send(proc, signal.SIGKILL)
    for sub in descendants:
        send(sub, signal.SIGKILL)  # psutil checks each one's create time: never a reused pid
    return killed


def pause_pool_child(main_pid: int | None, pid: int) -> bool:
    """SIGSTOP one pool child of our worker (the memory guard freezes a runaway task while it revokes it, then
    kills it): only when `pid` is a live child of `main_pid` right now."""
    proc = _pool_child(main_pid, pid)
    if proc is None or not send(proc, signal.SIGSTOP):
        return False
    # The signal is delivered asynchronously: frozen means the kernel says so (a busy machine may take a
    # moment to schedule it), so that nothing the caller asks next races a child still running.
    deadline = time.monotonic() + 0.2
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_STOPPED:
                return True
        except psutil.Error:
            return False
        time.sleep(0.001)
    return True


def child_exited(child: subprocess.Popen[bytes]) -> bool:
    """Has our child exited? Does not reap it: its pid stays ours until Popen.wait()."""
    if child.returncode is not None:
        return True
    if hasattr(os, "waitid") and not portable():
        try:
            return os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True
    # CPython on macOS has os.waitid only from 3.13: an exited, unreaped child is a zombie (its pid cannot
    # be reused until we reap it, so asking about the pid is safe).
    try:
        return psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def signal_child(child: subprocess.Popen[bytes], sig: int) -> bool:
    """Signal our own unreaped child's main process only (never its group: see stop semantics).

    os.kill rather than Popen.send_signal: the latter may reap the child from inside a signal handler."""
    if child_exited(child):
        return False
    try:
        os.kill(child.pid, sig)
        log.debug("sent %s to worker pid %d", signal_name(sig), child.pid)
        return True
    except ProcessLookupError:
        return False


def catches(pid: int, sig: int) -> bool:
    """Does the process have a handler for `sig` now (Linux: its SigCgt mask in /proc)? A signal whose
    default action ends the process (a realtime request) must never reach one that has none: one that has
    not installed it yet, or one in Python's finalization, which puts every Python handler back to the
    default. True where the mask cannot be read (no /proc: the handler's own guards have to do)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return True


def request_child(child: subprocess.Popen[bytes], sig: int) -> bool:
    """A request signal (one whose default action would end it) to our own child's main process, only while
    it has a handler for it; False when not sent."""
    if child_exited(child) or not catches(child.pid, sig):
        return False
    return signal_child(child, sig)


def kill_child_group(child: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group of our own child, which leads its group (start_new_session=True).

    Safe only while the child is unreaped: until then no other process can get its pid as a group id.
    """
    if child.returncode is not None:
        return
    try:
        os.killpg(child.pid, signal.SIGKILL)
        log.debug("sent SIGKILL to process group %d", child.pid)
    except (ProcessLookupError, PermissionError):
        pass


def family(proc: psutil.Process) -> list[psutil.Process]:
    """A process's descendants plus the other members of the group it leads."""
    members: dict[int, psutil.Process] = {}
    try:
        for child in proc.children(recursive=True):
            members[child.pid] = child
        if os.getpgid(proc.pid) == proc.pid:
            for other in psutil.process_iter():
                try:
                    if other.pid != proc.pid and os.getpgid(other.pid) == proc.pid:
                        members.setdefault(other.pid, other)
                except (ProcessLookupError, PermissionError):
                    continue
    except (psutil.Error, OSError):
        pass
    protected = protected_pids()
    return [p for p in members.values() if p.pid not in protected]


def wait_gone(procs: Sequence[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Poll until every process is gone or the timeout passes; returns those still alive."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if is_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(POLL)
        alive = [p for p in alive if is_alive(p)]
    return alive


@dataclass(frozen=True)
class StopResult:
    stopped: tuple[int, ...]  # ended within the grace period
    killed: tuple[int, ...]  # needed SIGKILL
    survivors: tuple[int, ...]  # still alive after SIGKILL (should never happen)


def stop_ladder(
    mains: Sequence[psutil.Process],
    grace: float,
    *,
    first_signal: int = signal.SIGTERM,
    on_step: Callable[[str], None] | None = None,
) -> StopResult:
    """systemd's KillMode=mixed for processes we did not spawn.

    SIGTERM to each main process only (a warm shutdown: prefork children would die mid-task if they got it),
    wait the grace period, then SIGKILL whatever is left of each main, its descendants and its group.
    """
    step = on_step or (lambda _msg: None)
    tree = {p.pid: p for p in mains}
    for main in mains:
        for member in family(main):
            tree.setdefault(member.pid, member)
    for main in mains:
        if send(main, first_signal):
            step(f"sent {signal.Signals(first_signal).name} to pid {main.pid}")
    alive = wait_gone(list(tree.values()), grace)
    # Children forked during the grace period belong to the tree too.
    for proc in list(alive):
        for member in family(proc):
            if member.pid not in tree:
                tree[member.pid] = member
                alive.append(member)
    killed = []
    for proc in alive:
        if send(proc, signal.SIGKILL):
            killed.append(proc.pid)
    if killed:
        step(f"grace period over: sent SIGKILL to {len(killed)} process(es)")
    survivors = wait_gone(alive, KILL_WAIT)
    gone_main = tuple(p.pid for p in mains if p.pid not in killed and p not in survivors)
    return StopResult(stopped=gone_main, killed=tuple(killed), survivors=tuple(p.pid for p in survivors))
