"""The one place that starts and stops tunefarm's own processes (tracker, agents, job workers, an agent's RPC
server, the test labs' helpers) and finds ports.

Used by ``tunefarm quickstart``, the host service, the agents, the benchmarks and the tests, so that every
caller starts the real commands the same way a user would, in their own process groups, and stops them cleanly.

Process starts that stay elsewhere, each for a reason (tests/test_layout.py lists them):
 - core/torchless.py: TVM's PopenWorker protocol (inherited pipe fds, TVM's own kill), pinned to TVM 0.27.
 - device_agents/build_service.py: forked build children (multiprocessing "fork") that inherit loaded TVM.
 - device_agents/{opencl,onednn}_runtime.py: parallel compiler runs, waited for inside one call.
 - host/tuning/builder.py: kills a TVM PopenWorker's process (not a group; TVM started it).
 - device_agents/rpc_server.py: re-raises a signal to itself (no other process).
 - testing/netns.py close(): kills every process left in a namespace by pid (found with ``ip netns pids``).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from tunefarm.core.threads import THREADS_ENV, keep_tvm_threads_inside


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def start_process(cmd: Sequence[str], log_path: str | os.PathLike | None = None, env: dict[str, str] | None = None,
                  new_session: bool = True, inherit_output: bool = False) -> subprocess.Popen:
    """Start ``cmd`` with stdin closed, by default in a new session (its own process group, which
    :func:`stop_group` and :func:`signal_group` stop as a whole).

    Output goes to ``log_path`` (appended), or stays this process's (``inherit_output``), or is discarded.
    ``env`` is the child's whole environment (None: this process's).
    """
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        out = open(log_path, "ab")  # pylint: disable=consider-using-with
        err = subprocess.STDOUT
    elif inherit_output:
        out = err = None
    else:
        out, err = subprocess.DEVNULL, subprocess.DEVNULL
    try:
        return subprocess.Popen(list(cmd), stdout=out, stderr=err, env=env, stdin=subprocess.DEVNULL,
                                start_new_session=new_session)
    finally:
        if log_path is not None:
            out.close()


def signal_group(pid: int, sig: int) -> bool:
    """Send ``sig`` to the process group led by ``pid``; False when that group is gone."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        return False
    return True


def stop_group(pid: int, wait: Callable[[float], bool], grace: float,
               signals: Sequence[int] = (signal.SIGTERM, signal.SIGKILL), wake: bool = False) -> bool:
    """Send each of ``signals`` in turn to the process group led by ``pid``, each followed by ``wait(grace)``
    (True once the leader has exited), until it has exited or the group is gone. ``wake``: follow each
    signal with SIGCONT, since a stopped (SIGSTOP) process handles SIGTERM only once it runs again.
    True when the leader was seen to exit or the group was gone."""
    for sig in signals:
        try:
            os.killpg(pid, sig)
            if wake:
                os.killpg(pid, signal.SIGCONT)
        except ProcessLookupError:
            return True
        if wait(grace):
            return True
    return False


def popen_waiter(proc: subprocess.Popen) -> Callable[[float], bool]:
    """``wait`` for :func:`stop_group` of a child: True once it has exited within the timeout."""
    def wait(timeout: float) -> bool:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
    return wait


def start_tunefarm(args: Sequence[str], log_path: str | os.PathLike | None = None,
                   env: dict[str, str] | None = None,
                   cpus: Sequence[int] | None = None) -> subprocess.Popen:
    """Start ``tunefarm ARGS...`` (this interpreter, this package) in a new process group.

    Output goes to ``log_path`` (appended) or is discarded. ``cpus`` pins the process (taskset) and, unless
    ``env`` says otherwise, sizes its TVM thread pool to them (``TVM_NUM_THREADS``): a count inherited from
    this process (a benchmark on 16 cores sets 16) would run 16 threads on the 2 cores a measuring agent has.
    """
    cmd = [sys.executable, "-m", "tunefarm", *map(str, args)]
    full_env = dict(os.environ)
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    if cpus:
        full_env[THREADS_ENV] = str(len(set(cpus)))
    if env:
        full_env.update(env)
    keep_tvm_threads_inside(full_env, cpus)  # else TVM binds its threads outside the pinned CPUs
    proc = start_process(cmd, log_path=log_path, env=full_env)
    if cpus:
        os.sched_setaffinity(proc.pid, set(cpus))
    return proc


def stop_process(proc: subprocess.Popen, timeout: float = 15.0, sig: int = signal.SIGTERM) -> int | None:
    """Signal a process group started by :func:`start_tunefarm`; SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return proc.returncode
    if not signal_group(proc.pid, sig):
        return proc.poll()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        signal_group(proc.pid, signal.SIGKILL)
        return proc.wait(timeout)


def kill_hard(proc: subprocess.Popen) -> None:
    """kill -9 the whole process group (used to simulate a machine that dies)."""
    signal_group(proc.pid, signal.SIGKILL)
    proc.wait(30)


def wait_until(predicate, timeout: float, interval: float = 0.25, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; TimeoutError names ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
