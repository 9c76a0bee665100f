"""Several "machines" on one Linux host: network namespaces joined by a bridge on a private subnet.

``Lab(["host", "laptop", "agent1"])`` makes one namespace per node plus a switch namespace holding a bridge;
each node has a veth (``eth0``) on the bridge with its own address on ``10.77.0.0/24`` and no other route:
nothing inside can reach the outside network, nor the root namespace (:meth:`Lab.check_isolated` proves it
before anything is sent). Processes run inside a node with ``ip netns exec``; :meth:`Lab.link` takes a node's
link down and up (a pulled cable); :meth:`Lab.close` kills every process in the namespaces and deletes them,
also after a failure. Needs root and ``ip netns`` (:func:`unavailable` says why not). Used by
tests/test_multihost.py and bench/; never by the farm itself.
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from tunefarm.core.procs import popen_waiter, start_process, stop_group

SUBNET = "10.77.0"
PREFIX_LEN = 24


def _ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = (["ip", "netns", "exec", ns, "ip"] if ns else ["ip"]) + list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {(proc.stderr or proc.stdout).strip()}")
    return proc


def unavailable() -> str | None:
    """Why network namespaces cannot be made here (None: they can)."""
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    probe = f"tfprobe{secrets.token_hex(3)}"
    try:
        made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"`ip netns` cannot run here ({err})"
    if made.returncode != 0:
        return f"`ip netns add` fails here ({made.stderr.strip()})"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30, check=False)
    return None


class Lab:
    """Namespaces ``<lab>-<node>`` on one bridge; ``addr(node)`` is the node's address."""

    def __init__(self, nodes: Sequence[str]):
        if len(set(nodes)) != len(nodes) or not nodes or len(nodes) > 200:
            raise ValueError("nodes must be 1-200 distinct names")
        self.id = secrets.token_hex(3)
        self.nodes = list(nodes)
        self.switch = f"tf{self.id}-sw"
        self.namespaces = {n: f"tf{self.id}-{n}" for n in self.nodes}
        self.addrs = {n: f"{SUBNET}.{10 + i}" for i, n in enumerate(self.nodes)}
        self.procs: list[subprocess.Popen] = []
        self._made: list[str] = []

    # ------------------------------------------------------------ setup and teardown

    def __enter__(self) -> "Lab":
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _make(self) -> None:
        _ip("netns", "add", self.switch)
        self._made.append(self.switch)
        _ip("link", "add", "br0", "type", "bridge", ns=self.switch)
        _ip("link", "set", "br0", "up", ns=self.switch)
        _ip("link", "set", "lo", "up", ns=self.switch)
        for i, node in enumerate(self.nodes):
            ns = self.namespaces[node]
            _ip("netns", "add", ns)
            self._made.append(ns)
            inner, outer = f"tv{self.id}{i}", f"tp{self.id}{i}"  # at most 15 characters
            _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "netns", self.switch)
            _ip("link", "set", outer, "master", "br0", ns=self.switch)
            _ip("link", "set", outer, "up", ns=self.switch)
            _ip("link", "set", inner, "name", "eth0", ns=ns)
            _ip("addr", "add", f"{self.addrs[node]}/{PREFIX_LEN}", "dev", "eth0", ns=ns)
            _ip("link", "set", "eth0", "up", ns=ns)
            _ip("link", "set", "lo", "up", ns=ns)

    def close(self) -> None:
        """Stop every process started in the lab (and any other process in its namespaces), delete them."""
        for proc in self.procs:
            self._kill_group(proc)
        for ns in reversed(self._made):
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30,
                                  check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)
        self._made.clear()
        self.procs.clear()

    @staticmethod
    def _kill_group(proc: subprocess.Popen) -> None:
        if proc.poll() is not None:
            return
        stop_group(proc.pid, popen_waiter(proc), 5)

    # ------------------------------------------------------------ using it

    def addr(self, node: str) -> str:
        return self.addrs[node]

    def exec_cmd(self, node: str, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[node], *map(str, cmd)]

    def run(self, node: str, cmd: Sequence[str], timeout: float = 120, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess:
        return subprocess.run(self.exec_cmd(node, cmd), capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL, check=False)

    def popen(self, node: str, cmd: Sequence[str], log_path: str | Path, env: dict[str, str] | None = None
              ) -> subprocess.Popen:
        """Start ``cmd`` inside ``node`` (its own process group), output appended to ``log_path``."""
        proc = start_process(self.exec_cmd(node, cmd), log_path=log_path,
                             env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.procs.append(proc)
        return proc

    def tunefarm(self, node: str, args: Sequence, log_path: str | Path, env: dict[str, str] | None = None
                 ) -> subprocess.Popen:
        """``tunefarm ARGS`` (this interpreter and package) inside ``node``."""
        return self.popen(node, [sys.executable, "-m", "tunefarm", *map(str, args)], log_path, env)

    def link(self, node: str, up: bool) -> None:
        """Pull (``up=False``) or plug back a node's cable."""
        _ip("link", "set", "eth0", "up" if up else "down", ns=self.namespaces[node])

    def check_isolated(self) -> None:
        """Every node's only routes are the lab's subnet; an outside address is unreachable from each, and the
        nodes reach each other. AssertionError otherwise (nothing is sent before this holds)."""
        for node, ns in self.namespaces.items():
            routes = [l for l in _ip("route", "show", ns=ns).stdout.splitlines() if l.strip()]
            assert routes == [f"{SUBNET}.0/{PREFIX_LEN} dev eth0 proto kernel scope link src {self.addrs[node]} "] or (
                len(routes) == 1 and routes[0].startswith(f"{SUBNET}.0/{PREFIX_LEN} dev eth0")), (node, routes)
            for outside in ("1.1.1.1", "8.8.8.8", "192.168.0.1"):
                got = _ip("route", "get", outside, ns=ns, check=False)
                assert got.returncode != 0 and "unreachable" in (got.stderr + got.stdout).lower(), (node, outside, got)
            links = [l.split(":")[1].strip().split("@")[0] for l in _ip("-o", "link", "show", ns=ns).stdout.splitlines()]
            assert sorted(links) == ["eth0", "lo"], (node, links)

    def wait_port(self, node: str, host: str, port: int, timeout: float = 60) -> None:
        """Until ``host:port`` accepts a TCP connection from inside ``node``."""
        code = ("import socket,sys\ns=socket.socket();s.settimeout(2)\n"
                f"sys.exit(0 if s.connect_ex(({host!r},{int(port)}))==0 else 1)")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.run(node, [sys.executable, "-c", code], timeout=30).returncode == 0:
                return
            time.sleep(0.5)
        raise TimeoutError(f"{host}:{port} not reachable from {node} within {timeout:.0f} s")
