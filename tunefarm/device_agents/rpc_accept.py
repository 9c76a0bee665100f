"""The agent's RPC listen loop: TVM 0.27's ``tvm.rpc.server._listen_loop`` with a hardened accept step.

TVM's stock accept step (``_accept_conn``, nested in ``_listen_loop`` in ``tvm/rpc/server.py`` of
``apache-tvm==0.27.0.post1``) reads each client's handshake (``[RPC_MAGIC, keylen int32, key bytes]``) one
connection at a time, with no timeout, and trusts what it reads (issue 32, item 1):

* one idle TCP connection to the agent's port blocked every farm session while it was held;
* a key length of 0 (``key.split()[0]`` on an empty key), a negative one, a key that is not UTF-8 or a bad
  ``-timeout=`` option raised out of the loop: the listen loop died and the agent restarted its server, 3-6 s
  without sessions each time, for 12 bytes and no credential.

:func:`listen_loop` replaces the stock function in the agent's RPC server process only
(:func:`install`; ``PopenRPCServerState`` looks ``_listen_loop`` up in its module when it starts its thread).
It keeps the stock protocol, the tracker steps and the serving step (``server._serving``: one session at a
time, as before) and changes only how connections are accepted:

* every connection is accepted at once and its handshake read without blocking, many at a time, each within
  :data:`HANDSHAKE_TIMEOUT_S`; at most :data:`MAX_PENDING` wait (:data:`MAX_PENDING_PER_PEER` per address),
  the oldest dropped first, so a flood of idle connections cannot keep an honest client out;
* every length is bounded (a key of 1..:data:`MAX_KEY_BYTES` bytes) and only the bytes of the handshake are
  read, never a byte of the session behind it;
* a malformed handshake is refused with one log line (at most :data:`LOG_LINES_PER_WINDOW` lines per
  :data:`LOG_WINDOW_S`, then a count) and the connection closed; the loop goes on;
* the tracker is pinged every ``ping_period`` seconds also while connections arrive (the stock loop pinged
  only after 2 s without one).

Pinned to TVM 0.27: the function keeps the stock signature and calls only ``tvm.rpc.base`` helpers and
``tvm.rpc.server._serving``; :func:`install` refuses (returns a reason) if those are not there.
"""
from __future__ import annotations

import math
import selectors
import struct
import time
from typing import Callable

from tunefarm.core.safe_text import printable

HANDSHAKE_TIMEOUT_S = 5.0  # a client sends its 3 small writes right after connecting
MAX_KEY_BYTES = 4096  # "client:KEY:0.123... -timeout=60": well under 100 bytes in practice
MAX_PENDING = 64  # handshakes read at once
MAX_PENDING_PER_PEER = 8
LOG_WINDOW_S = 10.0
LOG_LINES_PER_WINDOW = 30
ACCEPT_ERROR_PAUSE_S = 0.1  # after accept() fails (out of file descriptors): do not spin


def handshake_problem(buf: bytes, magic: int) -> tuple[int, str | None]:
    """For the bytes read so far of a client's handshake: ``(bytes still needed, None)`` while it is
    incomplete, ``(0, None)`` when ``buf`` is a whole handshake, ``(0, why)`` when it is refused."""
    if len(buf) < 4:
        return 4 - len(buf), None
    if struct.unpack("<i", buf[:4])[0] != magic:
        return 0, "not a TVM RPC client (wrong magic)"
    if len(buf) < 8:
        return 8 - len(buf), None
    keylen = struct.unpack("<i", buf[4:8])[0]
    if keylen <= 0 or keylen > MAX_KEY_BYTES:
        return 0, f"key length {keylen} (1 to {MAX_KEY_BYTES} bytes)"
    if len(buf) < 8 + keylen:
        return 8 + keylen - len(buf), None
    try:
        key = buf[8:8 + keylen].decode("utf-8")
    except UnicodeDecodeError:
        return 0, "the key is not UTF-8"
    if not key.split():
        return 0, "an empty key"
    return 0, None


def parse_options(words: list[str]) -> tuple[dict, str | None]:
    """The stock ``_parse_server_opt`` (``-timeout=SECONDS``; other words ignored), with the number checked:
    ``float("abc")`` raised out of the stock loop."""
    opts: dict = {}
    for word in words:
        if word.startswith("-timeout="):
            try:
                value = float(word[9:])
            except ValueError:
                return {}, "its -timeout is not a number"
            if not math.isfinite(value) or value <= 0 or value > 7 * 24 * 3600:
                return {}, "its -timeout is out of range"
            opts["timeout"] = value
    return opts, None


class _Pending:
    __slots__ = ("conn", "addr", "deadline", "buf")

    def __init__(self, conn, addr, deadline):
        self.conn, self.addr, self.deadline, self.buf = conn, addr, deadline, b""


class Handshakes:
    """Connections whose handshake is being read, without blocking, all at once."""

    def __init__(self, listen_sock, magic: int, log: Callable[[str], None]):
        self.listen_sock = listen_sock
        self.magic = magic
        self._log = log
        self.pending: dict[int, _Pending] = {}  # fd -> pending, oldest first
        self.selector = selectors.DefaultSelector()
        self._window_start = 0.0
        self._lines = 0
        self._hidden = 0

    # -- logging, bounded ----------------------------------------------------------------------------
    def say(self, message: str) -> None:
        now = time.monotonic()
        if now - self._window_start > LOG_WINDOW_S:
            if self._hidden:
                self._log(f"({self._hidden} more refused connections in {LOG_WINDOW_S:g} s not shown)")
            self._window_start, self._lines, self._hidden = now, 0, 0
        if self._lines < LOG_LINES_PER_WINDOW:
            self._lines += 1
            self._log(message)
        else:
            self._hidden += 1

    def refuse(self, item: _Pending, why: str, reply: bytes | None = None) -> None:
        self.say(f"refused a connection from {printable(item.addr[0])}:{item.addr[1]}: {printable(why)}; closed")
        if reply:
            try:
                item.conn.send(reply)  # a few bytes into an empty send buffer: never blocks
            except OSError:
                pass
        self.drop(item)

    def drop(self, item: _Pending) -> None:
        fd = item.conn.fileno()
        if fd >= 0 and self.pending.get(fd) is item:
            del self.pending[fd]
            try:
                self.selector.unregister(item.conn)
            except (KeyError, ValueError):
                pass
        try:
            item.conn.close()
        except OSError:
            pass

    def refuse_all(self, why: str) -> None:
        for item in list(self.pending.values()):
            self.refuse(item, why)

    # -- accepting and reading -----------------------------------------------------------------------
    def accept(self) -> None:
        """Take every connection waiting on the listen socket."""
        for _ in range(MAX_PENDING):
            try:
                conn, addr = self.listen_sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # EMFILE and the like: the listen socket stays readable; pause
                self.say(f"cannot accept a connection: {err}")
                time.sleep(ACCEPT_ERROR_PAUSE_S)
                return
            conn.setblocking(False)
            item = _Pending(conn, addr, time.monotonic() + HANDSHAKE_TIMEOUT_S)
            same_peer = [p for p in self.pending.values() if p.addr[0] == addr[0]]
            if len(same_peer) >= MAX_PENDING_PER_PEER:
                self.refuse(same_peer[0], f"more than {MAX_PENDING_PER_PEER} handshakes at once from one address")
            elif len(self.pending) >= MAX_PENDING:
                self.refuse(next(iter(self.pending.values())), f"more than {MAX_PENDING} handshakes at once")
            self.pending[conn.fileno()] = item
            self.selector.register(conn, selectors.EVENT_READ, item)

    def read(self, item: _Pending) -> str | None:
        """Read what ``item``'s client sent; its key once the handshake is whole and well formed."""
        need, why = handshake_problem(item.buf, self.magic)
        try:
            chunk = item.conn.recv(need)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as err:
            self.refuse(item, f"connection error during the handshake ({err})")
            return None
        if not chunk:
            self.refuse(item, "closed during the handshake")
            return None
        item.buf += chunk
        need, why = handshake_problem(item.buf, self.magic)
        if why:
            self.refuse(item, why)
            return None
        if need:
            return None
        return item.buf[8:].decode("utf-8")

    def expire(self) -> None:
        now = time.monotonic()
        for item in [p for p in self.pending.values() if p.deadline <= now]:
            self.refuse(item, f"no whole handshake within {HANDSHAKE_TIMEOUT_S:g} s")

    def next_deadline(self) -> float:
        return min((p.deadline for p in self.pending.values()), default=math.inf)

    def wait(self, timeout: float) -> list[_Pending]:
        """Connections with something to read within ``timeout`` seconds (accepting new ones meanwhile)."""
        ready = []
        for key, _ in self.selector.select(max(0.0, timeout)):
            if key.data is None:
                self.accept()
            elif self.pending.get(key.fd) is key.data:  # not dropped (its descriptor reused) meanwhile
                ready.append(key.data)
        return ready


def _accept_conn(listen_sock, tracker_conn, handshakes: Handshakes, port, rpc_key, custom_addr, ping_period=2):
    """The stock ``_accept_conn``'s contract (register with the tracker, regenerate an unused match key,
    return ``(conn, addr, opts)`` of the first client with the match key), with the handshakes read as
    :class:`Handshakes` does."""
    # pylint: disable=import-outside-toplevel
    from tvm.rpc import base
    from tvm.rpc.base import TrackerCode

    old_keyset = set()
    if tracker_conn:
        matchkey = base.random_key(rpc_key)
        base.sendjson(tracker_conn, [TrackerCode.PUT, rpc_key, (port, matchkey), custom_addr])
        assert base.recvjson(tracker_conn) == TrackerCode.SUCCESS
    else:
        matchkey = rpc_key
    unmatch_period_count = 0
    unmatch_timeout = 4
    next_ping = time.monotonic() + ping_period
    expect_header = "client:" + matchkey
    server_key = "server:" + rpc_key
    while True:
        now = time.monotonic()
        wait_s = handshakes.next_deadline() - now
        if tracker_conn:
            wait_s = min(wait_s, next_ping - now)
        for item in handshakes.wait(min(wait_s, 3600.0)):
            key = handshakes.read(item)
            if key is None:
                continue
            arr = key.split()
            if arr[0] != expect_header:
                handshakes.refuse(item, "mismatched key (not the session the tracker handed out)",
                                  struct.pack("<i", base.RPC_CODE_MISMATCH))
                continue
            opts, why = parse_options(arr[1:])
            if why:
                handshakes.refuse(item, why, struct.pack("<i", base.RPC_CODE_MISMATCH))
                continue
            conn = item.conn
            handshakes.selector.unregister(conn)
            del handshakes.pending[conn.fileno()]
            # The match key is used: no other pending client holds it, and none is read during the session.
            handshakes.refuse_all("a session started before its handshake was whole")
            conn.setblocking(True)  # the session's C++ loop reads this descriptor in blocking mode
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            try:
                conn.sendall(struct.pack("<i", base.RPC_CODE_SUCCESS) + struct.pack("<i", len(server_key))
                             + server_key.encode("utf-8"))
            except OSError as err:
                handshakes.say(f"lost {printable(item.addr[0])}:{item.addr[1]} while answering its handshake ({err})")
                conn.close()
                continue
            conn.settimeout(None)
            return conn, item.addr, opts
        handshakes.expire()
        if tracker_conn and time.monotonic() >= next_ping:
            next_ping = time.monotonic() + ping_period
            base.sendjson(tracker_conn, [TrackerCode.GET_PENDING_MATCHKEYS])
            pending_keys = base.recvjson(tracker_conn)
            old_keyset.add(matchkey)
            # a match key the tracker no longer holds was handed to a client that did not come
            if matchkey not in pending_keys:
                unmatch_period_count += 1
            else:
                unmatch_period_count = 0
            if unmatch_period_count * ping_period > unmatch_timeout + ping_period:
                matchkey = base.random_key(rpc_key, cmap=old_keyset)
                expect_header = "client:" + matchkey
                base.sendjson(tracker_conn, [TrackerCode.PUT, rpc_key, (port, matchkey), custom_addr])
                assert base.recvjson(tracker_conn) == TrackerCode.SUCCESS
                unmatch_period_count = 0


def make_listen_loop(log: Callable[[str], None]):
    """The replacement for ``tvm.rpc.server._listen_loop`` (same arguments), logging refusals with ``log``."""

    def listen_loop(sock, port, rpc_key, tracker_addr, load_library, custom_addr):
        # pylint: disable=import-outside-toplevel
        from tvm.rpc import base, server

        sock.setblocking(False)
        handshakes = Handshakes(sock, base.RPC_MAGIC, log)
        handshakes.selector.register(sock, selectors.EVENT_READ, None)
        tracker_conn = None
        while True:
            try:
                # step 1: set up the tracker connection and report to the tracker (stock)
                if tracker_addr and tracker_conn is None:
                    tracker_conn = base.connect_with_retry(tracker_addr)
                    tracker_conn.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
                    magic = struct.unpack("<i", base.recvall(tracker_conn, 4))[0]
                    if magic != base.RPC_TRACKER_MAGIC:
                        raise RuntimeError(f"{tracker_addr!s} is not RPC Tracker")
                    cinfo = {"key": "server:" + rpc_key, "addr": (custom_addr, port)}
                    base.sendjson(tracker_conn, [base.TrackerCode.UPDATE_INFO, cinfo])
                    assert base.recvjson(tracker_conn) == base.TrackerCode.SUCCESS
                # step 2: wait for the client the tracker sends (hardened)
                conn, addr, opts = _accept_conn(sock, tracker_conn, handshakes, port, rpc_key, custom_addr)
            except OSError:
                # the tracker connection dropped (a client's errors never get here): reconnect (stock)
                if tracker_conn:
                    tracker_conn.close()
                    tracker_conn = None
                continue
            # step 3: serve the session (stock; one at a time)
            server._serving(conn, addr, opts, load_library)  # pylint: disable=protected-access

    return listen_loop


def install(log: Callable[[str], None]) -> str | None:
    """Make this process's ``PopenRPCServerState`` use :func:`make_listen_loop`'s loop; None, or why not."""
    # pylint: disable=import-outside-toplevel
    from tvm.rpc import base, server

    missing = [name for name in ("RPC_MAGIC", "RPC_TRACKER_MAGIC", "RPC_CODE_MISMATCH", "RPC_CODE_SUCCESS",
                                 "random_key", "sendjson", "recvjson", "recvall", "connect_with_retry")
               if not hasattr(base, name)]
    missing += [name for name in ("_listen_loop", "_serving") if not hasattr(server, name)]
    if missing:
        return f"this TVM's rpc modules lack {', '.join(missing)} (the hardened accept step is written for 0.27)"
    server._listen_loop = make_listen_loop(log)  # pylint: disable=protected-access
    return None
