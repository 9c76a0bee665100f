"""The one place that starts and stops tunefarm's own processes (tracker, agents) and finds ports.

Used by ``tunefarm quickstart``, the benchmarks and the tests, so that every caller starts the real
commands the same way a user would, in their own process groups, and stops them cleanly.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from tunefarm.core.threads import THREADS_ENV, keep_tvm_threads_inside


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


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
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        out = open(log_path, "ab")  # pylint: disable=consider-using-with
    else:
        out = subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        if log_path is not None:
            out.close()
    if cpus:
        os.sched_setaffinity(proc.pid, set(cpus))
    return proc


def stop_process(proc: subprocess.Popen, timeout: float = 15.0, sig: int = signal.SIGTERM) -> int | None:
    """Signal a process group started by :func:`start_tunefarm`; SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return proc.poll()
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return proc.wait(timeout)


def kill_hard(proc: subprocess.Popen) -> None:
    """kill -9 the whole process group (used to simulate a machine that dies)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
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
