"""Per-peer limits (issue 32, item 11): one address cannot fill the tracker with connections and half-sent
frames, nor guess the service's token at full speed; the farm's own processes, from another address, keep
being served. The hostile side connects from 127.0.0.2 (another loopback address) to the real ``tunefarm
tracker`` and ``tunefarm host serve``.
"""
from __future__ import annotations

import http.client
import socket
import struct
import time

from conftest import HOST, closed_by_peer, run_cli, start_host
from tunefarm.core.procs import free_port, stop_process, wait_until
from tunefarm.tracker import server as tracker_server
from tunefarm.tracker.client import TrackerClient

MAX_CONNECTIONS_PER_PEER = getattr(tracker_server, "MAX_CONNECTIONS_PER_PEER", 64)  # (absent before the cap)

TRACKER_MAGIC = 0x2F271
STRANGER = "127.0.0.2"


def _stranger_conn(host: str, port: int) -> socket.socket | None:
    """A tracker connection from the stranger's address that passed the magic, or None if it was closed."""
    sock = socket.create_connection((host, port), timeout=10, source_address=(STRANGER, 0))
    try:
        sock.sendall(struct.pack("<i", TRACKER_MAGIC))
        reply = sock.recv(4)
    except (ConnectionResetError, BrokenPipeError, socket.timeout):
        reply = b""
    if len(reply) == 4 and struct.unpack("<i", reply)[0] == TRACKER_MAGIC:
        return sock
    sock.close()
    return None


def test_the_tracker_caps_connections_and_frames_per_peer(tracker, start_agent, tmp_path):
    host, port = tracker
    held = []
    try:
        # A frame announced at 1 MB (the stock limit), half sent: refused at its header now.
        big = _stranger_conn(host, port)
        assert big is not None
        big.sendall(struct.pack("<i", 1 << 20) + b"x" * 4096)
        assert closed_by_peer(big, 5)
        big.close()
        # 100 connections from one address, each with a half-sent 100 kB frame: the cap's worth stay open.
        refused = 0
        for _ in range(100):
            sock = _stranger_conn(host, port)
            if sock is None:
                refused += 1
                continue
            held.append(sock)
            try:
                sock.sendall(struct.pack("<i", 200_000) + b"x" * 100_000)
            except OSError:
                pass
        assert len(held) == MAX_CONNECTIONS_PER_PEER and refused == 100 - MAX_CONNECTIONS_PER_PEER, (len(held), refused)
        # Meanwhile the farm is served: an agent registers, a summary answers, devices prints it.
        agent = start_agent(host, port, "k", tmp_path / "agent.log")
        with TrackerClient(host, port) as client:
            assert client.servers_for_key("k") == 1
        code, table, _ = run_cli(["devices", "--tracker", f"{host}:{port}"], tmp_path / "devices.txt")
        assert code == 0 and "k" in table, table
        assert agent.poll() is None
        # The held connections are still open (the cap refuses new ones, it does not drop old ones).
        assert not closed_by_peer(held[0], 0.5)
        log = (tmp_path / "tracker.log").read_text(errors="replace")
        assert f"refused a connection from {STRANGER}: more than {MAX_CONNECTIONS_PER_PEER} connections from one " \
               "address; closed" in log, log
        assert log.count(f"refused a connection from {STRANGER}") == 1, log  # once a minute, not per connection
        # Once the stranger lets go, its address is served again.
        for sock in held:
            sock.close()
        held.clear()
        wait_until(lambda: _reconnects(host, port), 10, what="a new connection from the stranger's address")
    finally:
        for sock in held:
            sock.close()


def _reconnects(host, port) -> bool:
    sock = _stranger_conn(host, port)
    if sock is None:
        return False
    sock.close()
    return True


def _get(conn: http.client.HTTPConnection, token: str) -> int:
    conn.request("GET", "/api/info", headers={"Authorization": f"Bearer {token}"})
    answer = conn.getresponse()
    answer.read()
    return answer.status


def test_wrong_tokens_are_slowed_per_peer_and_the_farm_keeps_serving(tmp_path):
    http_port, tracker_port = free_port(HOST), free_port(HOST)
    host = start_host(tmp_path, http_port, tracker_port)
    try:
        token = (tmp_path / "logs" / "farm" / "token").read_text().strip()
        env = {"TUNEFARM_FARM": f"http://{HOST}:{http_port}", "TUNEFARM_TOKEN": token,
               "TUNEFARM_CLIENT_CONFIG": str(tmp_path / "no-client-config.yaml")}
        stranger = http.client.HTTPConnection(HOST, http_port, timeout=10, source_address=(STRANGER, 0))
        statuses = []
        start = time.monotonic()
        while time.monotonic() - start < 3.0:
            try:
                statuses.append(_get(stranger, f"guess-{len(statuses)}"))
            except (http.client.RemoteDisconnected, ConnectionError):  # a 429 closes it: reconnect, as a guesser would
                stranger.close()
                stranger = http.client.HTTPConnection(HOST, http_port, timeout=10, source_address=(STRANGER, 0))
        # At most the free thirty plus about one a second were compared; the rest were answered 429.
        assert 30 <= statuses.count(401) <= 35, statuses.count(401)
        assert statuses.count(429) >= 20 and set(statuses) <= {401, 429}, statuses[:40]
        # While throttled, even the right token from that address is not compared. The bucket refills one guess
        # a second, so the right token goes right after a guess that was compared (401: the bucket is empty
        # again), on the same connection: a fixed pause here would race the refill on a loaded machine.
        stranger.close()
        stranger = http.client.HTTPConnection(HOST, http_port, timeout=10, source_address=(STRANGER, 0))
        deadline = time.monotonic() + 10.0
        while True:
            try:
                if _get(stranger, "one-more-guess") == 401:
                    break
            except (http.client.RemoteDisconnected, ConnectionError):
                stranger.close()
                stranger = http.client.HTTPConnection(HOST, http_port, timeout=10, source_address=(STRANGER, 0))
            assert time.monotonic() < deadline, "no guess from the stranger was compared within 10 s"
        assert _get(stranger, token) == 429
        # Others are served meanwhile: the CLI from 127.0.0.1 with the token.
        code, out, _ = run_cli(["jobs"], tmp_path / "jobs.txt", env=env, timeout=120)
        assert code == 0 and "no jobs" in out, out
        # The address gets its turn back as the bucket refills.
        time.sleep(2.5)
        stranger.close()
        stranger = http.client.HTTPConnection(HOST, http_port, timeout=10, source_address=(STRANGER, 0))
        assert _get(stranger, token) == 200
        stranger.close()
        log = (tmp_path / "host.log").read_text(errors="replace")
        assert log.count(f"too many wrong tokens from {STRANGER}") == 1, log
        assert host.poll() is None
    finally:
        stop_process(host)
