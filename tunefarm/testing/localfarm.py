"""A whole farm on this machine: a real tracker and real agents on free loopback ports.

``tunefarm quickstart`` and the benchmarks start their farms through this one helper, with the same
commands a user types (``tunefarm tracker``, ``tunefarm agent``), each in its own process group with
its log beside the caller's other files. A process that exits at start or never registers is a
one-line :class:`TunefarmError` naming its log.

    with LocalFarm(logs_dir) as farm:
        farm.add_agent("cpu")                      # waits until the tracker lists it
        farm.add_agent("build", cpus=[2, 3])       # pinned to cores 2 and 3 (taskset)
        run_job(..., tracker=farm.addr)
"""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Sequence

from tunefarm.core.errors import TunefarmError
from tunefarm.core.procs import free_port, start_tunefarm, stop_process, wait_until

HOST = "127.0.0.1"


class LocalFarm:
    """Tracker (started on ``__enter__``) plus any number of agents; everything stops on ``__exit__``."""

    def __init__(self, logs_dir: str | Path, tracker_wait_s: float = 60.0, agent_wait_s: float = 180.0):
        self.logs_dir = Path(logs_dir)
        self.tracker_wait_s = tracker_wait_s
        self.agent_wait_s = agent_wait_s
        self.port = 0
        self.tracker: subprocess.Popen | None = None
        self.agents: list[tuple[str, subprocess.Popen]] = []  # (key, process)
        self.client = None

    @property
    def addr(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def tracker_addr(self) -> tuple[str, int]:
        return HOST, self.port

    def __enter__(self) -> "LocalFarm":
        # pylint: disable=import-outside-toplevel
        from tunefarm.tracker.client import TrackerClient, check_tracker

        self.port = free_port(HOST)
        log = self.logs_dir / "tracker.log"
        self.tracker = start_tunefarm(["tracker", "--host", HOST, "--port", self.port], log)

        def answers() -> bool:
            try:
                check_tracker(HOST, self.port, timeout=2.0)
                return True
            except TunefarmError:
                return False

        try:
            wait_until(lambda: self.tracker.poll() is not None or answers(), self.tracker_wait_s, what="the tracker")
        except TimeoutError:
            self.close()
            raise TunefarmError(f"the tracker did not start within {self.tracker_wait_s:.0f} s; see {log}") from None
        if self.tracker.poll() is not None:
            self.close()
            raise TunefarmError(f"the tracker exited at start; see {log}")
        self.client = TrackerClient(HOST, self.port)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add_agent(self, key: str, *extra_args: str, cpus: Sequence[int] | None = None, name: str = "",
                  wait: bool = True) -> subprocess.Popen:
        """Start ``tunefarm agent`` on ``key``; with ``wait``, return once the tracker lists one more on it."""
        before = self.client.servers_for_key(key) if wait else 0
        log = self.logs_dir / f"{name or f'agent-{key}-{len(self.agents)}'}.log"
        proc = start_tunefarm(["agent", "--tracker", self.addr, "--key", key, "--host", HOST, "--port", free_port(HOST),
                               *extra_args], log, cpus=cpus)
        self.agents.append((key, proc))
        if wait:
            try:
                wait_until(lambda: proc.poll() is not None or self.client.servers_for_key(key) > before,
                           self.agent_wait_s, what=f"an agent on key '{key}'")
            except TimeoutError:
                raise TunefarmError(f"the agent on key '{key}' did not register within {self.agent_wait_s:.0f} s; "
                                    f"see {log}") from None
            if proc.poll() is not None:
                raise TunefarmError(f"the agent on key '{key}' exited at start; see {log}")
        return proc

    def wait_for_agents(self, key: str, count: int) -> None:
        """Until the tracker lists ``count`` agents on ``key`` (after several ``add_agent(wait=False)``)."""
        try:
            wait_until(lambda: self.client.servers_for_key(key) >= count, self.agent_wait_s,
                       what=f"{count} agents on key '{key}'")
        except TimeoutError:
            raise TunefarmError(f"fewer than {count} agents registered on key '{key}' within "
                                f"{self.agent_wait_s:.0f} s; see the agent logs in {self.logs_dir}") from None

    def stop_agents(self, key: str | None = None) -> None:
        """Stop the agents started here on ``key`` (all of them without one); wait until the tracker drops them."""
        for agent_key, proc in self.agents:
            if key is None or agent_key == key:
                stop_process(proc)
        self.agents = [(k, p) for k, p in self.agents if p.poll() is None]
        if key is not None and self.client is not None:
            wait_until(lambda: self.client.servers_for_key(key) == 0, 60, what=f"agents on '{key}' to leave")

    def close(self) -> None:
        for _, proc in self.agents:
            stop_process(proc)
        self.agents.clear()
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.tracker is not None:
            stop_process(self.tracker)
            self.tracker = None
