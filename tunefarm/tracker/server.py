"""``tunefarm tracker``: the stock TVM RPC tracker, plus a log of agents joining and leaving.

The tracker is ``tvm.rpc.tracker.Tracker`` unchanged (it runs in its own process). This process only
watches it: every second it reads SUMMARY and prints a timestamped line for each server that
appeared or went away, with the agent's DeviceInfo when the server is a tunefarm agent.
"""
from __future__ import annotations

import collections
import errno
import signal
import socket
import sys
import threading
import time
from typing import Any

from tunefarm.core.errors import TrackerUnreachable, TunefarmError
from tunefarm.tracker.client import (TrackerClient, describe_target, server_addr, server_device_info,
                                     server_key)

POLL_INTERVAL_S = 1.0


def _log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}", flush=True)


def _check_port_free(host: str, port: int) -> None:
    """A one-line error now, rather than the tracker process's traceback, if the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # Same option as the stock tracker, so a port in TIME_WAIT counts as free here too.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise TunefarmError(f"cannot start the tracker: port {port} on {host} is already in use "
                                    f"(another tracker? pick one with --port)") from None
            raise TunefarmError(f"cannot start the tracker on {host}:{port}: {err.strerror or err}") from None


def _local_addr(host: str) -> str:
    """Where this process reaches a tracker bound to ``host``."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _server_identity(info: dict[str, Any]) -> tuple:
    device = server_device_info(info)
    return (server_key(info), server_addr(info), device.agent_id if device else "")


def _describe_server(info: dict[str, Any]) -> str:
    device = server_device_info(info)
    text = f"key={server_key(info)} addr={server_addr(info)}"
    if device is None:
        return text + " (stock tvm.rpc server, no DeviceInfo)"
    cuda = ", ".join(d.get("name", "?") for d in device.cuda) or "none"
    return (f"{text} agent={device.agent_id} target=[{describe_target(device.target)}] "
            f"cpu=[{device.cpu_model} x{device.num_cores}] cc={'yes' if device.has_cc else 'NO'} cuda={cuda}")


class _Watcher:
    """Diffs successive SUMMARY replies into 'joined' / 'left' log lines."""

    def __init__(self, host: str, port: int):
        self.host = host
        self.port = port
        self.client: TrackerClient | None = None
        self.known: collections.Counter = collections.Counter()
        self.described: dict[tuple, str] = {}
        self.unreachable_logged = False

    def poll(self) -> None:
        try:
            if self.client is None:
                self.client = TrackerClient(self.host, self.port)
            summary = self.client.summary()
        except TrackerUnreachable as err:
            self.client = None
            if not self.unreachable_logged:
                _log(f"warning: cannot read the tracker's summary: {err}")
                self.unreachable_logged = True
            return
        self.unreachable_logged = False
        now: collections.Counter = collections.Counter()
        for info in summary.get("server_info", []):
            if server_key(info) is None:
                continue
            ident = _server_identity(info)
            now[ident] += 1
            self.described.setdefault(ident, _describe_server(info))
        for ident in now - self.known:
            _log(f"agent joined: {self.described[ident]}")
        for ident in self.known - now:
            _log(f"agent left: key={ident[0]} addr={ident[1]}" + (f" agent={ident[2]}" if ident[2] else ""))
            if not now[ident]:
                self.described.pop(ident, None)
        self.known = now

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def _start_stock_tracker(host: str, port: int, port_end: int, silent: bool):
    """Runs in the tracker's own process: the stock tracker, its connections without Nagle's delay."""
    # pylint: disable=import-outside-toplevel
    from tvm.rpc import tracker as stock

    from tunefarm.core.wire import no_delay

    original = stock.TrackerServerHandler.__init__

    def init(self, sock, stop_key):
        no_delay(sock)  # inherited by every connection the tracker accepts
        original(self, sock, stop_key)

    stock.TrackerServerHandler.__init__ = init
    return stock._popen_start_tracker_server(host, port, port_end, silent)  # pylint: disable=protected-access


def start_stock_tracker(host: str, port: int, port_end: int, silent: bool = True):
    """``tvm.rpc.tracker.Tracker(host, port, port_end, silent)``, with ``TCP_NODELAY`` on its connections.

    Same process layout as the stock class (a PopenWorker runs the tracker) and the same object back,
    so ``terminate()`` works as usual; only the function sent to the worker differs.
    """
    # pylint: disable=import-outside-toplevel
    from tvm.support.popen_pool import PopenWorker
    from tvm.rpc.tracker import Tracker

    tracker = Tracker.__new__(Tracker)
    tracker.proc = PopenWorker()
    tracker.proc.send(_start_stock_tracker, [host, port, port_end, silent])
    tracker.port, tracker.stop_key = tracker.proc.recv()
    tracker.host = host
    return tracker


def run_tracker(host: str, port: int) -> None:
    """Run the tracker on exactly ``host:port`` until SIGINT/SIGTERM; then stop it and return."""

    _check_port_free(host, port)
    stop = threading.Event()

    def on_signal(signum, _frame):
        stop.set()

    old_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        tracker = start_stock_tracker(host, port, port + 1, silent=True)
    except (ValueError, OSError) as err:  # the tracker process reports a failed bind this way
        raise TunefarmError(f"cannot start the tracker on {host}:{port}: {err}") from None
    watcher = _Watcher(_local_addr(host), tracker.port)
    try:
        print(f"tracker listening on {host}:{tracker.port}", flush=True)
        if host in ("0.0.0.0", "::", ""):
            print("note: TVM RPC has no authentication; keep the tracker and agents on a trusted network",
                  flush=True)
        while not stop.is_set():
            watcher.poll()
            if tracker.proc is None or not tracker.proc.is_alive():
                # A signal to our process group (Ctrl-C, stop_process) ends the tracker's worker
                # too, maybe before our own handler has run: only a death without one is a crash.
                if stop.wait(1.0):
                    break
                raise TunefarmError(f"the tracker process on {host}:{tracker.port} died")
            stop.wait(POLL_INTERVAL_S)
        _log("stopping the tracker")
    finally:
        watcher.close()
        _terminate(tracker)
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)


def _terminate(tracker) -> None:
    """Stop the tracker process; kill it if the polite stop fails (it dials 127.0.0.1, which a
    tracker bound to another address does not answer)."""
    try:
        tracker.terminate()
    except Exception:  # pylint: disable=broad-except
        proc = getattr(tracker, "proc", None)
        if proc is not None:
            proc.kill()
            tracker.proc = None
    sys.stdout.flush()
