"""``tunefarm tracker``: TVM's RPC tracker with the farm's checks, plus a log of agents joining and leaving.

The tracker is ``tvm.rpc.tracker`` of TVM 0.27, run in its own process (a worker like the stock ``Tracker``'s,
started without PyTorch) by :func:`start_stock_tracker`. It is not unchanged: in that process
:func:`_start_stock_tracker` patches the stock module's classes before it starts the stock server with the
module's private ``_popen_start_tracker_server`` (the function stock ``Tracker`` sends to its worker):

* ``TCPEventHandler.call_handler``: every message is checked (:func:`tracker_message_problem`; the stock
  handler trusts every field: one UPDATE_INFO whose key is not a string made every later SUMMARY fail), the
  farm key's challenge and proof are answered (``core/credential.py``; the stock protocol has no
  authentication), PUT, REQUEST and a server's UPDATE_INFO are refused on a key that is not open without that
  proof, and a server's info is marked with whether it proved the key (``VERIFIED_FIELD``: only such a
  server's DeviceInfo is believed);
* ``TrackerServerHandler.__init__``: ``TCP_NODELAY`` on the listening socket, inherited by every connection
  (the stock tracker's two-send messages otherwise wait ~40 ms for a delayed ACK at every round trip);
* ``TrackerServerHandler.summary``: ``SUMMARY`` also lists the servers refused lately (``REFUSED_FIELD``).

These are private parts of ``tvm.rpc.tracker`` as of 0.27 (checked against 0.27.0.post1): a TVM upgrade must
check them again. The protocol on the wire, the queues and the matching of requests to servers are stock.
This process watches the tracker: every second it reads SUMMARY and prints a timestamped line for each server
that appeared or went away, with the agent's DeviceInfo when the server is a tunefarm agent.
"""
from __future__ import annotations

import collections
import errno
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from tunefarm.core.credential import AUTH, CHALLENGE, SUCCESS, load_farm_key, new_nonce, proof_ok
from tunefarm.core.errors import TrackerUnreachable, TunefarmError
from tunefarm.core.safe_text import printable
from tunefarm.core.targets import describe_target
from tunefarm.core.wire import INFO_FIELD
from tunefarm.tracker.client import TrackerClient, malformed_info, server_addr, server_device_info, server_key

POLL_INTERVAL_S = 1.0


def _log(message: str) -> None:
    """One line of the tracker's log; what peers sent (keys, agent ids, addresses) is in it, so control
    characters are written as escapes (a key holding ESC[2J otherwise cleared the screen of `tail -f`)."""
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {printable(message)}", flush=True)


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
                raise TunefarmError(f"cannot start the tracker: port {port} on {host} is already in use"
                                    + _port_holder(port)) from None
            raise TunefarmError(f"cannot start the tracker on {host}:{port}: {err.strerror or err}") from None


def _short_cmdline(proc) -> str:
    words = proc.cmdline()
    if words and words[0].rsplit("/", 1)[-1].startswith("python"):
        words = ["python", *words[1:]]
    text = " ".join(" ".join(words).split())  # one line, whatever the arguments hold
    return text if len(text) <= 80 else text[:77] + "..."


def _port_holder(port: int) -> str:
    """The end of the error above: who listens on ``port``, as far as this user can see; named, never
    signalled. A TVM worker whose parent is gone is most likely the tracker process of a tracker killed with
    ``kill -9`` (a stock ``python -m tvm.exec.rpc_tracker``, or a ``tunefarm tracker`` from before its tracker
    process died with it, :func:`_die_with_parent`): the error says how to stop it."""
    # pylint: disable=import-outside-toplevel
    import psutil

    try:
        pids = sorted({c.pid for c in psutil.net_connections("inet")
                       if c.pid and c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port})
    except psutil.Error:
        pids = []
    held, orphans = [], []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            text = f"pid {pid} ({_short_cmdline(proc)}"
            if set(proc.cmdline()) & {"tvm.exec.popen_worker", "tunefarm.core.popen_worker"}:
                parent = proc.parent()
                # TVM's workers are started by Python processes: a worker whose parent is init or some other
                # program (a subreaper) was left behind by its own.
                if parent is None or parent.pid == 1 or not any(
                        word in " ".join(parent.cmdline()) for word in ("python", "tunefarm", "tvm")):
                    text += ", a TVM worker left behind by its parent: a tracker killed with kill -9?"
                    orphans.append(pid)
                else:
                    text += f", the TVM worker of pid {parent.pid}: {_short_cmdline(parent)}"
            held.append(text + ")")
        except psutil.Error:
            continue
    if orphans:
        return (f" by {'; '.join(held)}: stop {'it' if len(orphans) == 1 else 'them'} with "
                f"`kill {' '.join(map(str, orphans))}` and start again, or pick another port with --port")
    return f" by {'; '.join(held)}: another tracker? pick another port with --port" if held else \
        " (another tracker? pick one with --port)"


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
    problem = malformed_info(info)
    if problem:
        return text + f" (its tunefarm info is malformed, so it counts as a stock server: {problem})"
    if device is None:
        return text + (" (a server without the farm key, admitted on an open key)" if INFO_FIELD in info
                       else " (stock tvm.rpc server, no DeviceInfo; admitted on an open key)")
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
        """One round; whatever a registration holds, the watcher (and so the tracker) keeps running."""
        try:
            self._poll()
        except Exception as err:  # pylint: disable=broad-except
            _log(f"warning: could not read one tracker summary ({type(err).__name__}: {err}); watching on")

    def _poll(self) -> None:
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
        for info in summary.get("server_info", []) or []:
            if not isinstance(info, dict) or server_key(info) is None:
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


# TVM's tracker codes (tvm.rpc.base.TrackerCode), spelled out so that the check below needs no TVM import.
_PING, _STOP, _PUT, _REQUEST, _UPDATE_INFO, _SUMMARY, _GET_PENDING_MATCHKEYS = 1, 2, 3, 4, 5, 6, 7
MAX_KEY = 256  # a device key, a match key, an address
MAX_INFO_BYTES = 64 * 1024  # one server's UPDATE_INFO


def _short_str(value: Any, limit: int = MAX_KEY) -> bool:
    return isinstance(value, str) and len(value) <= limit


def _port(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 65536


def tracker_message_problem(args: Any) -> str | None:
    """Why a tracker request is malformed, or None. The stock tracker trusts every field it is sent, and
    one server's UPDATE_INFO with a key that is not a string makes every later SUMMARY fail (the farm goes
    blind); anyone who reaches the tracker's port can send one, so each request is checked first."""
    if not isinstance(args, list) or not args or not isinstance(args[0], int) or isinstance(args[0], bool):
        return "a request must be a JSON list starting with an integer code"
    code, rest = args[0], args[1:]
    if code in (_PING, _SUMMARY, _GET_PENDING_MATCHKEYS, CHALLENGE):
        return None
    if code == AUTH:
        return None if len(rest) == 2 and _short_str(rest[0], 32) and _short_str(rest[1], 128) else \
            "AUTH needs a role and a proof"
    if code == _STOP:
        return None if rest and _short_str(rest[0], 1024) else "STOP needs a key string"
    if code == _PUT:
        if len(rest) not in (2, 3) or not _short_str(rest[0]):
            return "PUT needs a key string"
        pair = rest[1]
        if not (isinstance(pair, list) and len(pair) == 2 and _port(pair[0]) and _short_str(pair[1], 2 * MAX_KEY)):
            return "PUT needs [port, match key]"
        if len(rest) == 3 and rest[2] is not None and not _short_str(rest[2]):
            return "PUT's custom address must be a string"
        return None
    if code == _REQUEST:
        if len(rest) != 3 or not _short_str(rest[0]) or not _short_str(rest[1], 1024) or not (
                isinstance(rest[2], int) and not isinstance(rest[2], bool)):
            return "REQUEST needs key, user and an integer priority"
        return None
    if code == _UPDATE_INFO:
        return _info_problem(rest[0] if len(rest) == 1 else None)
    return f"unknown tracker code {code}"


def _info_problem(info: Any) -> str | None:
    # pylint: disable=import-outside-toplevel
    import json

    from tunefarm.core.wire import INFO_FIELD, DeviceInfo

    if not isinstance(info, dict) or not _short_str(info.get("key")):
        return "UPDATE_INFO needs an object with a key string"
    if set(info) - {"key", "addr", INFO_FIELD}:
        return f"UPDATE_INFO has unknown fields {sorted(map(str, set(info) - {'key', 'addr', INFO_FIELD}))[:5]}"
    addr = info.get("addr")
    if addr is not None and not (isinstance(addr, list) and len(addr) == 2 and (addr[0] is None or _short_str(addr[0]))
                                 and _port(addr[1])):
        return "UPDATE_INFO's addr must be [host or null, port]"
    if len(json.dumps(info)) > MAX_INFO_BYTES:
        return f"UPDATE_INFO is over {MAX_INFO_BYTES} bytes"
    if INFO_FIELD in info:
        try:
            DeviceInfo.from_json(info[INFO_FIELD])
        except ValueError as err:
            return str(err)
    return None


REFUSED_KEPT = 64  # refused servers the SUMMARY lists (newest)
# Per-peer limits (issue 32, item 11: 100 half-sent 1 MB frames from one address grew the tracker by 120 MB).
# A farm's own processes on one machine hold one connection per agent, one per waiting session request and
# the watcher's: far fewer than this. Peers behind one NAT share the cap.
MAX_CONNECTIONS_PER_PEER = 64
MAX_CONNECTIONS = 4096  # all peers together; lowered below the process's file descriptor limit
# The largest message a farm process sends the tracker is an UPDATE_INFO (at most MAX_INFO_BYTES); the stock
# limit is 1 MB, which a connection may buffer before its message is checked.
MAX_MESSAGE_BYTES = 4 * MAX_INFO_BYTES
LOG_REFUSALS_EVERY_S = 60.0


PARENT_POLL_S = 1.0
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent_pid: int) -> None:
    """In the tracker's process: end with ``tunefarm tracker`` (``parent_pid``), however that one ends.

    TVM's worker process notices its parent's exit (its command pipe closes) and returns from its main loop,
    but the stock tracker's thread is not a daemon, so the process lives on, serving the port: a ``kill -9``
    of ``tunefarm tracker`` left it holding the port, and the next ``tunefarm tracker`` there failed with
    "already in use". The kernel's parent-death signal (Linux) kills it at once; a poll of the parent pid is
    the fallback elsewhere. The tracker process has nothing to clean up that its exit does not."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes  # pylint: disable=import-outside-toplevel

            # Sent when the thread that started this process exits: run_tracker starts it from the main thread.
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(0)  # pylint: disable=protected-access  # the tracker's thread would keep the process alive

    watch_thread = threading.Thread(target=watch, name="tracker-parent-watch", daemon=True)
    watch_thread.start()  # it exits at once if the parent is already gone (before the signal was asked for)


def _connection_limit() -> int:
    try:
        import resource  # pylint: disable=import-outside-toplevel

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return MAX_CONNECTIONS
    return MAX_CONNECTIONS if soft == resource.RLIM_INFINITY else max(16, min(MAX_CONNECTIONS, soft - 64))


def _cap_connections(stock) -> None:
    """In the tracker's process: at most :data:`MAX_CONNECTIONS_PER_PEER` connections from one address and
    :func:`_connection_limit` in all (a connection over the cap is closed as it is accepted, with a log line at
    most once a minute per address), and messages of at most :data:`MAX_MESSAGE_BYTES`. The stock accept loop
    (``TrackerServerHandler._on_event``, TVM 0.27) takes every connection and retries accept() for ever on an
    error other than EAGAIN (out of file descriptors: a busy loop); this one stops at the first error."""
    stock.MAX_TRACKER_MSG_BYTES = MAX_MESSAGE_BYTES  # read by TCPEventHandler.on_message at each message
    limit = _connection_limit()
    logged: dict[str, list] = {}  # peer -> [last logged, refused since]

    def say(peer: str, problem: str) -> None:
        seen = logged.setdefault(peer, [0.0, 0])
        seen[1] += 1
        if time.monotonic() - seen[0] > LOG_REFUSALS_EVERY_S:
            again = f" ({seen[1]} times since the last line)" if seen[1] > 1 else ""
            print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} refused a connection from {printable(peer, 100)}: "
                  f"{problem}; closed{again}", flush=True)
            seen[0], seen[1] = time.monotonic(), 0
            if len(logged) > 4096:
                logged.clear()

    def on_event(self, _events):
        while True:
            try:
                conn, addr = self._sock.accept()  # pylint: disable=protected-access
            except OSError as err:
                if err.args and err.args[0] not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    say("-", f"accept failed: {err}")
                return
            peer = str(addr[0]) if isinstance(addr, tuple) and addr else str(addr)
            connections = self._connections  # pylint: disable=protected-access
            if len(connections) >= limit:
                conn.close()
                say(peer, f"the tracker holds {limit} connections")
                continue
            if sum(1 for c in connections if c._addr[0] == peer) >= MAX_CONNECTIONS_PER_PEER:  # pylint: disable=protected-access
                conn.close()
                say(peer, f"more than {MAX_CONNECTIONS_PER_PEER} connections from one address")
                continue
            stock.TCPEventHandler(self, conn, addr)

    stock.TrackerServerHandler._on_event = on_event  # pylint: disable=protected-access


def _start_stock_tracker(host: str, port: int, port_end: int, silent: bool, farm_key: str,
                         open_keys: list[str], parent_pid: int):
    """Runs in the tracker's own process: the stock tracker, its connections without Nagle's delay, every
    request checked (:func:`tracker_message_problem`) before the stock handler sees it, and PUT / REQUEST
    admitted only from a connection that proved the farm key (:mod:`tunefarm.core.credential`) unless
    the key is one of ``open_keys``; the process ends with its parent ``parent_pid`` (:func:`_die_with_parent`)."""
    _die_with_parent(parent_pid)
    # pylint: disable=import-outside-toplevel
    from tvm.rpc import tracker as stock

    from tunefarm.core.wire import REFUSED_FIELD, VERIFIED_FIELD, no_delay

    key = farm_key.encode()
    open_set = set(open_keys)
    refused: collections.OrderedDict = collections.OrderedDict()  # (key, where) -> entry, newest last
    original = stock.TrackerServerHandler.__init__

    def init(self, sock, stop_key):
        no_delay(sock)  # inherited by every connection the tracker accepts
        original(self, sock, stop_key)

    stock.TrackerServerHandler.__init__ = init
    _cap_connections(stock)
    summary = stock.TrackerServerHandler.summary

    def summary_with_refused(self):
        out = summary(self)
        out[REFUSED_FIELD] = list(refused.values())
        return out

    stock.TrackerServerHandler.summary = summary_with_refused
    call_handler = stock.TCPEventHandler.call_handler

    logged: dict[tuple, list] = {}  # (peer host, problem) -> [last logged, refused since]

    def refuse(conn, problem: str) -> None:
        # Shown even with the stock tracker's logging silenced (a farm's operator wants to see this), at most
        # once a minute per peer and problem: a refused server retries for ever.
        seen = logged.setdefault((conn._addr[0], problem), [0.0, 0])  # pylint: disable=protected-access
        seen[1] += 1
        if time.monotonic() - seen[0] > LOG_REFUSALS_EVERY_S:
            again = f" ({seen[1]} times since the last line)" if seen[1] > 1 else ""
            print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} refused a request from {printable(conn.name())}: "
                  f"{printable(problem, 300)}; connection closed{again}", flush=True)
            seen[0], seen[1] = time.monotonic(), 0
        conn.close()

    def checked_call(self, args):
        problem = tracker_message_problem(args)
        if problem:
            refuse(self, problem)
            return
        code = args[0]
        if code == CHALLENGE:
            self.tunefarm_nonce = new_nonce()
            self.ret_value([SUCCESS, self.tunefarm_nonce])
            return
        if code == AUTH:
            nonce, self.tunefarm_nonce = getattr(self, "tunefarm_nonce", None), None  # one use per challenge
            if not proof_ok(key, nonce, args[1], args[2]):
                refuse(self, "wrong farm key")
                return
            self.tunefarm_role = args[1]
            self.ret_value(SUCCESS)
            return
        # A server announces itself with UPDATE_INFO ("server:KEY"), then PUT; a client asks with REQUEST.
        wanted = (args[1] if code in (_PUT, _REQUEST) else
                  args[1]["key"].partition(":")[2] if code == _UPDATE_INFO and args[1]["key"].startswith("server:")
                  else None)
        if wanted is not None and wanted not in open_set and not getattr(self, "tunefarm_role", None):
            if code != _REQUEST:
                info = args[1] if code == _UPDATE_INFO else self._info  # pylint: disable=protected-access
                port_of = args[2][0] if code == _PUT else None
                addr = info.get("addr") or [None, port_of]
                where = f"{addr[0] or self._addr[0]}:{addr[1]}"  # pylint: disable=protected-access
                refused[(wanted, where)] = {"key": wanted, "addr": where, "time": time.time(),
                                            "reason": "no farm key (a stock or foreign server)"}
                refused.move_to_end((wanted, where))
                while len(refused) > REFUSED_KEPT:
                    refused.popitem(last=False)
            what = "request a session" if code == _REQUEST else "register a server"
            refuse(self, f"cannot {what} on key '{wanted}' without the farm key")
            return
        call_handler(self, args)
        if code == _UPDATE_INFO:
            self._info[VERIFIED_FIELD] = bool(getattr(self, "tunefarm_role", None))  # pylint: disable=protected-access

    stock.TCPEventHandler.call_handler = checked_call
    return stock._popen_start_tracker_server(host, port, port_end, silent)  # pylint: disable=protected-access


def start_stock_tracker(host: str, port: int, port_end: int, silent: bool = True, farm_key: bytes | None = None,
                        open_keys: list[str] | None = None):
    """``tvm.rpc.tracker.Tracker(host, port, port_end, silent)`` with the farm's patches (the module docstring).

    Same process layout as the stock class (a PopenWorker runs the tracker) and the same object back,
    so ``terminate()`` works as usual; only the function sent to the worker differs, the worker starts without
    PyTorch (:class:`~tunefarm.core.torchless.TorchlessWorker`), and it dies with this process
    (:func:`_die_with_parent`). Call it from the main thread: Linux sends the parent-death signal when the
    thread that started the worker ends.
    """
    # pylint: disable=import-outside-toplevel
    from tvm.rpc.tracker import Tracker

    from tunefarm.core.torchless import TorchlessWorker

    tracker = Tracker.__new__(Tracker)
    tracker.proc = TorchlessWorker()
    key = (farm_key or load_farm_key()).decode()
    tracker.proc.send(_start_stock_tracker, [host, port, port_end, silent, key, list(open_keys or []), os.getpid()])
    tracker.port, tracker.stop_key = tracker.proc.recv()
    tracker.host = host
    return tracker


def run_tracker(host: str, port: int, open_keys: list[str] | None = None, farm_key_file: str | None = None) -> None:
    """Run the tracker on exactly ``host:port`` until SIGINT/SIGTERM; then stop it and return."""

    _check_port_free(host, port)
    # Neither this process nor the tracker's needs PyTorch, which tvm_ffi imports first when it is installed:
    # it was two thirds of each one's TVM import, and so of a restarted tracker's start (6-8 s before; the
    # tracker process's half is TorchlessWorker's). None in sys.modules makes that import fail, as tvm_ffi allows.
    sys.modules.setdefault("torch", None)  # type: ignore[assignment]
    farm_key = load_farm_key(farm_key_file)
    stop = threading.Event()

    def on_signal(signum, _frame):
        stop.set()

    old_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        tracker = start_stock_tracker(host, port, port + 1, silent=True, farm_key=farm_key, open_keys=open_keys)
    except (ValueError, OSError) as err:  # the tracker process reports a failed bind this way
        raise TunefarmError(f"cannot start the tracker on {host}:{port}: {err}") from None
    watcher = _Watcher(_local_addr(host), tracker.port)
    try:
        print(f"tracker listening on {host}:{tracker.port}", flush=True)
        print("only processes with the farm key register agents or take sessions"
              + (f"; open to stock TVM servers and clients: {', '.join(open_keys)}" if open_keys else ""), flush=True)
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
