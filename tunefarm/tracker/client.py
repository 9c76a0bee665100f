"""Ask a running tracker who serves which key, and wait for a key to be served.

Wraps ``tvm.rpc.connect_tracker`` so that a tracker that is down, or an address that is not a
tracker, is a one-line :class:`TrackerUnreachable` within seconds. The stock ``TrackerSession``
retries refused connections for 60 s and blocks forever on a peer that accepts but never answers.
"""
from __future__ import annotations

import json
import re
import socket
import struct
import threading
import time
from typing import Any, Callable

from tunefarm.core.errors import AgentsBusy, AgentUnreachable, NoDeviceError, TrackerUnreachable, TunefarmError, last_line
from tunefarm.core.rpc import close_session
from tunefarm.core.targets import describe_target
from tunefarm.core.wire import INFO_FIELD, REFUSED_FIELD, VERIFIED_FIELD, DeviceInfo, no_delay, parse_hostport

CONNECT_TIMEOUT_S = 5.0  # TCP connect + tracker handshake
CALL_TIMEOUT_S = 10.0  # one SUMMARY round trip

_RPC_TRACKER_MAGIC = 0x2F271  # tvm.rpc.base.RPC_TRACKER_MAGIC (checked in tests; no tvm import needed here)


def check_tracker(host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise TrackerUnreachable unless ``host:port`` completes the tracker handshake within ``timeout``."""
    addr = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.timeout:
        raise TrackerUnreachable(f"tracker {addr} did not accept a connection within {timeout:g} s") from None
    except OSError as err:
        raise TrackerUnreachable(f"cannot reach tracker {addr}: {err.strerror or err}") from None
    with sock:
        try:
            sock.settimeout(timeout)
            sock.sendall(struct.pack("<i", _RPC_TRACKER_MAGIC))
            reply = b""
            while len(reply) < 4:
                chunk = sock.recv(4 - len(reply))
                if not chunk:
                    break
                reply += chunk
        except OSError:
            reply = b""
        if len(reply) != 4 or struct.unpack("<i", reply)[0] != _RPC_TRACKER_MAGIC:
            raise TrackerUnreachable(f"{addr} is not a TVM RPC tracker (no tracker handshake within {timeout:g} s)")


def tracker_answers(host: str, port: int, timeout: float = 2.0) -> bool:
    """Whether ``host:port`` completes the tracker handshake now."""
    try:
        check_tracker(host, port, timeout=timeout)
        return True
    except TrackerUnreachable:
        return False


def _connect_session(host: str, port: int, timeout: float):
    """``tvm.rpc.connect_tracker`` with a deadline, its socket bounded for later calls."""
    check_tracker(host, port, timeout)  # before importing TVM (seconds): an absent tracker is said at once
    from tvm import rpc  # pylint: disable=import-outside-toplevel

    result: dict[str, Any] = {}

    def connect():
        try:
            result["session"] = rpc.connect_tracker(host, port)
        except Exception as err:  # pylint: disable=broad-except
            result["error"] = err

    # The handshake just worked, but the stock connect retries for 60 s if the tracker went away
    # in between; a daemon thread keeps that from becoming our caller's wait.
    thread = threading.Thread(target=connect, name="tracker-connect", daemon=True)
    thread.start()
    thread.join(timeout)
    if "session" not in result:
        reason = result.get("error") or f"no answer within {timeout:g} s"
        raise TrackerUnreachable(f"cannot connect to tracker {host}:{port}: {reason}")
    session = result["session"]
    # TrackerSession has no timeout of its own: bound every later round trip.
    sock = getattr(session, "_sock", None)
    if sock is not None:
        sock.settimeout(CALL_TIMEOUT_S)
        no_delay(sock)
    return session


AGENT_CONNECT_TIMEOUT_S = 5.0  # how long a plain TCP connect to an agent the tracker handed out may take


def agent_reachable(host: str, port: int, timeout: float = AGENT_CONNECT_TIMEOUT_S) -> str | None:
    """None if a TCP connection to ``host:port`` opens from here, else why not (one line)."""
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return None
    except OSError as err:
        return f"{type(err).__name__}: {err.strerror or err}" if getattr(err, "strerror", None) else str(err) or "timed out"


def unreachable_message(key: str, url: str, port: int, why: str) -> str:
    return (f"the agent registered on key '{key}' at {url}:{port} cannot be reached from this host ({why}): an "
            "agent behind NAT or a firewall, or one advertising an address other machines cannot reach; start it "
            "with --custom-addr ADDRESS (an address of its machine that this host can reach) and open its RPC "
            "ports (9090-9190 by default)")


def request_rpc_session(host: str, port: int, key: str, priority: int, session_timeout: int,
                        on_tracker_socket: Callable[[Any], None] | None = None):
    """An RPC session on a server of ``key`` handed out by the tracker at ``host:port``, the tracker socket
    without Nagle's delay. Blocks until the tracker hands one out (callers bound the wait:
    ``on_tracker_socket`` is given the tracker socket the request waits on, so that a caller that stops
    waiting can shut it down, which withdraws the request at the tracker).

    Stock ``TrackerSession.request`` retries five times whatever the failure; here a server the tracker
    hands out that this host cannot even open a TCP connection to (the NAT case) is an
    :class:`AgentUnreachable` at once, naming its address and the fix.
    """
    from tvm import rpc  # pylint: disable=import-outside-toplevel
    from tvm.rpc import base  # pylint: disable=import-outside-toplevel

    from tunefarm.core.credential import authenticate, load_farm_key  # pylint: disable=import-outside-toplevel

    tracker = rpc.connect_tracker(host, port)
    sock = getattr(tracker, "_sock", None)
    no_delay(sock)
    if on_tracker_socket is not None and sock is not None:
        on_tracker_socket(sock)
    last_err: Exception | None = None
    try:
        # The farm's tracker hands out sessions only to holders of the farm key (keys left open excepted).
        authenticate(sock, load_farm_key(), "host", base.sendjson, base.recvjson)
        for _ in range(3):
            base.sendjson(sock, [base.TrackerCode.REQUEST, key, "", priority])
            value = base.recvjson(sock)
            if not isinstance(value, list) or len(value) != 2 or value[0] != base.TrackerCode.SUCCESS \
                    or not isinstance(value[1], list) or len(value[1]) != 3:
                raise RuntimeError(f"the tracker answered a session request with {str(value)[:200]}")
            url, srv_port, matchkey = value[1]
            if not isinstance(url, str) or not isinstance(srv_port, int) or not isinstance(matchkey, str):
                raise RuntimeError(f"the tracker handed out a malformed server entry {str(value[1])[:200]}")
            try:
                return rpc.connect(url, srv_port, matchkey, session_timeout)
            except Exception as err:  # pylint: disable=broad-except
                why = agent_reachable(url, srv_port)
                if why is not None:
                    raise AgentUnreachable(unreachable_message(key, url, srv_port, why), url, srv_port) from None
                last_err = err  # reachable, but the session did not open (its server was busy): ask again
        raise RuntimeError(f"cannot open a session on key '{key}': {last_line(last_err) if last_err else '?'}")
    finally:
        tracker.close()


def request_session(tracker_addr, key: str, wait_s: float, session_timeout: int, on_wait=None, priority: int = 2):
    """An RPC session on an agent of ``key``: waits visibly for one, and never longer than ``wait_s``.

    The tracker answers a request only when a server is free, and a stale listing can keep it from
    ever answering: the request runs in a thread and is given up after the deadline. Giving up withdraws
    it: the tracker socket it waits on is shut down (TVM's tracker then hands that request no server), and
    a session that opened all the same, in the moment between the tracker's answer and the shutdown, is
    closed at once. Without this an abandoned request stayed queued at the tracker and, once an agent
    was free, opened a session that nobody used and that held the agent for the whole session timeout
    (issue 36: the one agent left on a key held idle for 760 s).
    """
    t0 = time.monotonic()
    with TrackerClient(*tracker_addr) as client:
        client.wait_for_key(key, wait_s, on_wait=on_wait)
    box: dict[str, Any] = {}
    lock = threading.Lock()

    def keep_socket(sock) -> None:
        with lock:
            box["sock"] = sock
            abandoned = box.get("abandoned", False)
        if abandoned:
            _shutdown(sock)

    def ask():
        try:
            sess = request_rpc_session(*tracker_addr, key, priority=priority, session_timeout=session_timeout,
                                       on_tracker_socket=keep_socket)
        except Exception as err:  # pylint: disable=broad-except
            with lock:
                box["err"] = err
            return
        with lock:
            if not box.get("abandoned"):
                box["sess"] = sess
                return
        close_session(sess)  # the caller gave up meanwhile

    thread = threading.Thread(target=ask, name="tracker-request", daemon=True)
    thread.start()
    thread.join(max(1.0, wait_s - (time.monotonic() - t0)))
    with lock:
        if "sess" in box:
            return box["sess"]
        box["abandoned"] = True
        sock = box.get("sock")
        err = box.get("err")
    if sock is not None:
        _shutdown(sock)
    if err is not None:
        if isinstance(err, AgentUnreachable):
            raise err
        raise TunefarmError(f"no session on key '{key}': {last_line(err)}")
    raise AgentsBusy(f"no agent on key '{key}' became free within {wait_s:.0f} s")


def _shutdown(sock) -> None:
    """Shut a socket down for both directions (the thread blocked on it wakes); never raises."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def server_key(info: dict[str, Any]) -> str | None:
    """'server:KEY' in a SUMMARY server_info entry -> KEY (None for anything else)."""
    prefix, sep, key = str(info.get("key", "")).partition(":")
    return key if sep and prefix == "server" else None


def server_addr(info: dict[str, Any]) -> str:
    addr = info.get("addr") or ["?", "?"]
    return f"{addr[0]}:{addr[1]}"


def server_device_info(info: dict[str, Any]) -> DeviceInfo | None:
    """The agent's DeviceInfo from a server_info entry, or None for a stock tvm.rpc server and for an entry
    whose DeviceInfo is malformed (anyone who reaches the tracker can register anything)."""
    data = info.get(INFO_FIELD)
    if data is None or not info.get(VERIFIED_FIELD):
        return None  # a DeviceInfo from a connection without the farm key is not believed
    try:
        return DeviceInfo.from_json(data)
    except ValueError:
        return None


def malformed_info(info: dict[str, Any]) -> str | None:
    """Why a server_info entry's DeviceInfo is unusable, or None (a stock server's entry has none)."""
    data = info.get(INFO_FIELD)
    if data is None:
        return None
    try:
        DeviceInfo.from_json(data)
    except ValueError as err:
        return str(err)
    return None


class TrackerClient:
    """A connection to one tracker. Reconnects by itself after a failed call.

    Every method raises :class:`TrackerUnreachable` (one line, naming the address) instead of hanging.
    Safe to share between threads.
    """

    def __init__(self, host: str, port: int, timeout: float = CONNECT_TIMEOUT_S):
        self.host = host
        self.port = int(port)
        self.timeout = timeout
        self._lock = threading.Lock()
        self._session = _connect_session(self.host, self.port, timeout)

    @classmethod
    def from_addr(cls, text: str, timeout: float = CONNECT_TIMEOUT_S) -> "TrackerClient":
        host, port = parse_hostport(text)
        return cls(host, port, timeout=timeout)

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def close(self) -> None:
        with self._lock:
            if self._session is not None:
                self._session.close()
                self._session = None

    def __enter__(self) -> "TrackerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def summary(self) -> dict[str, Any]:
        """The tracker's SUMMARY: ``{"queue_info": {key: {free, pending}}, "server_info": [...]}``."""
        with self._lock:
            if self._session is None:
                self._session = _connect_session(self.host, self.port, self.timeout)
            try:
                return self._session.summary()
            except (OSError, RuntimeError, ValueError) as err:
                self._session.close()
                self._session = None
                raise TrackerUnreachable(f"lost the connection to tracker {self.addr}: {err}") from None

    def devices(self) -> list[dict[str, Any]]:
        """One dict per key that has agents or waiting requests, sorted by key.

        ``{"key", "agents": [DeviceInfo, or "host:port" for a stock server], "addrs": ["host:port"],
        "total", "free", "busy", "pending"}``; ``busy`` counts servers in a session (total - free).
        """
        return devices_from_summary(self.summary())

    def agent_infos(self, key: str) -> list[DeviceInfo]:
        """DeviceInfo of every tunefarm agent on ``key`` (stock servers carry none)."""
        for entry in self.devices():
            if entry["key"] == key:
                return [a for a in entry["agents"] if isinstance(a, DeviceInfo)]
        return []

    def servers_for_key(self, key: str) -> int:
        """How many RPC servers are registered under ``key`` (free or busy)."""
        return sum(1 for info in self.summary().get("server_info", []) if server_key(info) == key)

    def wait_for_key(self, key: str, timeout: float, on_wait: Callable[[float, float], Any] | None = None,
                     poll_interval: float = 1.0) -> int:
        """Wait until at least one server serves ``key``; return how many do.

        ``on_wait(waited_s, timeout_s)`` is called about every 5 s while waiting. Raises
        :class:`NoDeviceError` after ``timeout`` seconds.
        """
        start = time.monotonic()
        last_report = None
        while True:
            count = self.servers_for_key(key)
            if count:
                return count
            waited = time.monotonic() - start
            if waited >= timeout:
                raise NoDeviceError(
                    f"no agent serves key '{key}' on tracker {self.addr} (waited {waited:.0f} s); "
                    f"start one with: tunefarm agent --tracker {self.addr} --key {key}")
            if on_wait is not None and (last_report is None or waited - last_report >= 5.0):
                last_report = waited
                on_wait(waited, timeout)
            time.sleep(min(poll_interval, max(0.05, timeout - waited)))


def devices_from_summary(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Group a SUMMARY by key (see :meth:`TrackerClient.devices`)."""
    queue_info = summary.get("queue_info", {}) or {}
    by_key: dict[str, dict[str, Any]] = {}

    def entry(key: str) -> dict[str, Any]:
        if key not in by_key:
            by_key[key] = {"key": key, "agents": [], "addrs": [], "total": 0, "free": 0, "busy": 0, "pending": 0,
                           "refused": []}
        return by_key[key]

    for info in summary.get("server_info", []) or []:
        key = server_key(info)
        if key is None:
            continue
        item = entry(key)
        addr = server_addr(info)
        device = server_device_info(info)
        item["agents"].append(device if device is not None else addr)
        item["addrs"].append(addr)
        item["total"] += 1
    for key, queue in queue_info.items():
        # The tracker keeps a queue for every key it ever saw: skip keys with nobody on either side.
        if key not in by_key and not queue.get("pending"):
            continue
        item = entry(key)
        item["free"] = int(queue.get("free", 0))
        item["pending"] = int(queue.get("pending", 0))
    for refused in summary.get(REFUSED_FIELD, []) or []:
        if isinstance(refused, dict) and isinstance(refused.get("key"), str):
            entry(refused["key"])["refused"].append(refused)
    for item in by_key.values():
        item["busy"] = max(0, item["total"] - item["free"])
    return [by_key[k] for k in sorted(by_key)]


def devices_to_json(devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """:meth:`TrackerClient.devices` as plain JSON: each agent a dict with its ``addr``."""
    out = []
    for item in devices:
        agents = []
        for agent, addr in zip(item["agents"], item["addrs"]):
            agents.append({**agent.to_json(), "addr": addr} if isinstance(agent, DeviceInfo) else {"addr": addr})
        out.append({**item, "agents": agents})
    return out


def _describe_vendor(vendor: dict[str, Any]) -> str:
    """The vendor libraries an agent reports (DeviceInfo.vendor), e.g. ``onednn 2.6.3 avx512_core``."""
    parts = []
    for name, entry in sorted((vendor or {}).items()):
        if isinstance(entry, dict) and entry.get("available") is True:
            parts.append(" ".join(str(x) for x in (name, entry.get("version"), entry.get("isa")) if x))
    return ", ".join(parts) or "-"


def _describe_opencl(opencl: dict[str, Any]) -> str:
    if not opencl:
        return "-"
    platforms = opencl.get("platforms") if isinstance(opencl.get("platforms"), list) else []
    devices = [d for p in platforms if isinstance(p, dict) and isinstance(p.get("devices"), list)
               for d in p["devices"]]
    runtime = "runtime yes" if opencl.get("tvm_runtime_opencl") else "runtime no"
    dev = opencl.get("device") if isinstance(opencl.get("device"), dict) else {}
    limits = ""
    if opencl.get("tvm_runtime_opencl") and isinstance(dev.get("max_threads_per_block"), int):
        # Agent-supplied numbers: shown only when they are integers (the table escapes all text).
        limits = f" ({dev['max_threads_per_block']} work-items/group"
        if isinstance(dev.get("max_shared_memory_per_block"), int):
            limits += f", {dev['max_shared_memory_per_block'] // 1024} KiB local"
        if isinstance(dev.get("warp_size"), int):
            limits += f", warp {dev['warp_size']}"
        limits += ")"
    return (f"{len(devices)} device(s), {runtime}{limits}" if devices else f"none, {runtime}{limits}")


def print_devices(tracker_addr: str, as_json: bool = False) -> None:
    """``tunefarm devices``: the per-key table (or JSON) of a tracker."""
    host, port = parse_hostport(tracker_addr)
    with TrackerClient(host, port) as client:
        devices = client.devices()
    if as_json:
        print(json.dumps(devices_to_json(devices), indent=2, sort_keys=True))
        return

    from rich.console import Console  # pylint: disable=import-outside-toplevel
    from rich.markup import escape as escape_markup  # pylint: disable=import-outside-toplevel
    from rich.table import Table  # pylint: disable=import-outside-toplevel

    from tunefarm.core.safe_text import printable  # pylint: disable=import-outside-toplevel

    def escape(text) -> str:  # neither markup nor control characters reach the terminal
        return escape_markup(printable(text))

    console = Console()
    if not console.is_terminal:  # piped or logged: do not squeeze the table into 80 columns
        console = Console(width=max(console.width, 200))
    if not devices:
        console.print(f"no agents registered on tracker {host}:{port} "
                      f"(start one with: tunefarm agent --tracker {host}:{port} --key KEY)")
        return
    table = Table(title=f"tracker {host}:{port}")
    for name in ("key", "agents", "free", "busy", "pending", "target", "cpu", "cc", "cuda", "opencl", "vendor"):
        table.add_column(name, justify="right" if name in ("free", "busy", "pending") else "left",
                         no_wrap=name in ("key", "agents", "free", "busy", "pending"))
    for item in devices:
        lines: dict[str, list[str]] = {name: [] for name in ("agents", "target", "cpu", "cc", "cuda", "opencl",
                                                             "vendor")}
        # One line per agent, by id (the cards of a --gpus box in order: host:gpu0, host:gpu1, ..., host:gpu10).
        for agent, addr in sorted(zip(item["agents"], item["addrs"]), key=lambda pair: [
                int(part) if part.isdigit() else part
                for part in re.split(r"(\d+)", pair[0].agent_id if isinstance(pair[0], DeviceInfo) else pair[1])]):
            # Everything an agent says about itself is its own text: escaped, never read as markup.
            if isinstance(agent, DeviceInfo):
                lines["agents"].append(escape(f"{agent.agent_id} @ {addr}"))
                lines["target"].append(escape(describe_target(agent.target)))
                lines["cpu"].append(escape(f"{agent.cpu_model or '?'} ({agent.num_cores} cores, "
                                           f"{agent.threads or '?'} threads)"))
                lines["cc"].append("yes" if agent.has_cc else "[red]no[/]")
                lines["cuda"].append(escape(", ".join((f"gpu{d['gpu']} " if "gpu" in d else "") + str(d.get("name", "?"))
                                                      for d in agent.cuda) or "-"))
                lines["opencl"].append(escape(_describe_opencl(agent.opencl)))
                lines["vendor"].append(escape(_describe_vendor(agent.vendor)))
            else:
                lines["agents"].append(escape(f"{addr} (stock server, open key)"))
                for name in ("target", "cpu", "cc", "cuda", "opencl", "vendor"):
                    lines[name].append("?")
        for refused in item.get("refused", []):
            lines["agents"].append("[red]" + escape(f"{refused.get('addr')} REFUSED: {refused.get('reason')}") + "[/]")
            for name in ("target", "cpu", "cc", "cuda", "opencl", "vendor"):
                lines[name].append("-")
        table.add_row(escape(item["key"]), "\n".join(lines["agents"]) or "-", str(item["free"]), str(item["busy"]),
                      str(item["pending"]), *("\n".join(lines[n]) or "-"
                                              for n in ("target", "cpu", "cc", "cuda", "opencl", "vendor")))
    console.print(table)
