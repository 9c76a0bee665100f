"""A whole farm on this machine: a real tracker and real agents on free loopback ports.

``tunefarm quickstart``, the benchmarks and the tests start their farms through this one module, with the
same commands a user types (``tunefarm tracker``, ``tunefarm agent``), each in its own process group with
its log beside the caller's other files. A process that exits at start or never registers is a
one-line :class:`TunefarmError` naming its log.

    with LocalFarm(logs_dir) as farm:
        farm.add_agent("cpu")                      # waits until the tracker lists it
        farm.add_agent("build", cpus=[2, 3])       # pinned to cores 2 and 3 (taskset)
        run_job(..., tracker=farm.addr)

The module-level functions start and watch single processes for callers that manage them themselves
(the tests restart a tracker on the same port, kill agents, start agents that must fail).
"""
from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Sequence

from tunefarm.core.errors import TrackerUnreachable, TunefarmError
from tunefarm.tracker.client import tracker_answers
from tunefarm.core.procs import free_port, start_tunefarm, stop_process, wait_until

HOST = "127.0.0.1"


def start_tracker(port: int, log_path: str | Path, host: str = HOST, wait_s: float = 60.0,
                  open_keys: tuple[str, ...] = ()) -> subprocess.Popen:
    """``tunefarm tracker`` on ``host:port`` (``open_keys``: admitting stock TVM servers), returned once it
    answers the tracker handshake."""
    args = ["tracker", "--host", host, "--port", port]
    for key in open_keys:
        args += ["--open-key", key]
    proc = start_tunefarm(args, log_path)
    try:
        wait_until(lambda: proc.poll() is not None or tracker_answers(host, port), wait_s, what="the tracker")
    except TimeoutError:
        stop_process(proc)
        raise TunefarmError(f"the tracker did not start within {wait_s:.0f} s; see {log_path}") from None
    if proc.poll() is not None:
        raise TunefarmError(f"the tracker exited at start ({proc.returncode}); see {log_path}")
    return proc


def spawn_agent(tracker_addr: str, key: str, log_path: str | Path, *extra_args: str,
                cpus: Sequence[int] | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``tunefarm agent`` on ``key`` (RPC ports from a free one on loopback); does not wait."""
    return start_tunefarm(["agent", "--tracker", tracker_addr, "--key", key, "--host", HOST,
                           "--port", free_port(HOST), *extra_args], log_path, env=env, cpus=cpus)


def agent_id(proc: subprocess.Popen) -> str:
    """The agent id an agent started here registers with (hostname:pid of its process)."""
    return f"{socket.gethostname()}:{proc.pid}"


def listed_agents(host: str, port: int, key: str | None = None) -> list:
    """DeviceInfo of every tunefarm agent the tracker lists (on ``key`` if given)."""
    from tunefarm.core.wire import DeviceInfo  # pylint: disable=import-outside-toplevel
    from tunefarm.tracker.client import TrackerClient  # pylint: disable=import-outside-toplevel

    with TrackerClient(host, port) as client:
        return [agent for item in client.devices() if key is None or item["key"] == key
                for agent in item["agents"] if isinstance(agent, DeviceInfo)]


def wait_agent_listed(proc: subprocess.Popen, host: str, port: int, key: str, log_path: str | Path,
                      wait_s: float = 180.0) -> None:
    """Until the tracker lists the agent ``proc`` on ``key``; a TunefarmError if it exits or takes too long."""
    me = agent_id(proc)

    def listed() -> bool:
        if proc.poll() is not None:
            return True
        try:
            return any(a.agent_id == me for a in listed_agents(host, port, key))
        except TrackerUnreachable:
            return False

    try:
        wait_until(listed, wait_s, interval=0.5, what=f"agent {me} on key '{key}'")
    except TimeoutError:
        raise TunefarmError(f"the agent on key '{key}' did not register within {wait_s:.0f} s; "
                            f"see {log_path}") from None
    if proc.poll() is not None:
        raise TunefarmError(f"the agent on key '{key}' exited at start ({proc.returncode}); see {log_path}")


class LocalFarm:
    """Tracker (started on ``__enter__``) plus any number of agents; everything stops on ``__exit__``."""

    def __init__(self, logs_dir: str | Path, tracker_wait_s: float = 60.0, agent_wait_s: float = 180.0,
                 open_keys: tuple[str, ...] = ()):
        self.logs_dir = Path(logs_dir)
        self.tracker_wait_s = tracker_wait_s
        self.agent_wait_s = agent_wait_s
        self.open_keys = tuple(open_keys)  # keys the tracker admits stock TVM servers on (tunefarm tracker --open-key)
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
        from tunefarm.tracker.client import TrackerClient  # pylint: disable=import-outside-toplevel

        self.port = free_port(HOST)
        self.tracker = start_tracker(self.port, self.logs_dir / "tracker.log", wait_s=self.tracker_wait_s,
                                     open_keys=self.open_keys)
        self.client = TrackerClient(HOST, self.port)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add_agent(self, key: str, *extra_args: str, cpus: Sequence[int] | None = None, name: str = "",
                  wait: bool = True, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``tunefarm agent`` on ``key``; with ``wait``, return once the tracker lists it."""
        log = self.logs_dir / f"{name or f'agent-{key}-{len(self.agents)}'}.log"
        proc = spawn_agent(self.addr, key, log, *extra_args, cpus=cpus, env=env)
        self.agents.append((key, proc))
        if wait:
            wait_agent_listed(proc, HOST, self.port, key, log, self.agent_wait_s)
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
