"""Processes the host started and may find again after a restart (its tracker, its workers), known by
pid and start time so that a recycled pid is never signalled."""
from __future__ import annotations

import os

import psutil

from tunefarm.core import procs

STOP_GRACE_S = 15.0  # SIGTERM, then SIGKILL


def process_alive(pid: int | None, started: float | None) -> psutil.Process | None:
    """The process ``pid`` if it still runs and is the one started at ``started`` (not a recycled pid)."""
    if not pid:
        return None
    try:
        proc = psutil.Process(pid)
        if started is not None and abs(proc.create_time() - started) > 1.0:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.Error:
        return None


def stop_group(pid: int, started: float | None, timeout: float = STOP_GRACE_S) -> None:
    """SIGTERM the process group led by ``pid`` (a tunefarm process in its own session), then SIGKILL."""
    proc = process_alive(pid, started)
    if proc is None:
        return

    def wait(grace: float) -> bool:
        try:
            proc.wait(grace)
        except psutil.TimeoutExpired:
            return False
        except psutil.Error:
            return True  # gone, or no longer ours to wait for: stop signalling
        return True

    procs.stop_group(pid, wait, timeout)


LEFTOVER_WINDOW_S = 60.0


def kill_group_leftovers(pgid: int, started: float) -> list[int]:
    """SIGKILL what is left of the process group of a dead leader ``pgid`` (started at ``started``): the
    processes of that group started within a minute after it, i.e. the children it started as it came up.
    (A group id is not reused while a member lives; should it be reused after all, by a new process with
    the same pid, that one's group would be younger than this window.) Returns their pids."""
    killed = []
    for proc in psutil.process_iter(["pid", "create_time"]):
        try:
            if os.getpgid(proc.pid) != pgid:
                continue
            if not started - 1.0 <= proc.info["create_time"] <= started + LEFTOVER_WINDOW_S:
                continue
            proc.kill()
            proc.wait(10)
            killed.append(proc.pid)
        except (OSError, psutil.Error):
            continue
    return killed
