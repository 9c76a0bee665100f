"""A process that reaches the tracker's port can send anything: the tracker and its watcher survive it.

The hostile side speaks TVM's tracker protocol by hand (magic, then int32-length-prefixed JSON), as a
modified server would; the tracker is the real ``tunefarm tracker``.
"""
from __future__ import annotations

import json
import socket
import struct

import pytest

from conftest import listed_agents, run_cli
from tunefarm.core.procs import wait_until
from tunefarm.core.wire import INFO_FIELD, DeviceInfo
from tunefarm.tracker.server import tracker_message_problem

MAGIC = 0x2F271
UPDATE_INFO, PUT, SUMMARY = 5, 3, 6


class RawTrackerConn:
    """One connection speaking the tracker protocol with no checks of its own."""

    def __init__(self, host, port):
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.sendall(struct.pack("<i", MAGIC))
        assert struct.unpack("<i", self._recv(4))[0] == MAGIC

    def _recv(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed by the tracker")
            data += chunk
        return data

    def call(self, message):
        body = json.dumps(message).encode()
        self.sock.sendall(struct.pack("<i", len(body)) + body)
        size = struct.unpack("<i", self._recv(4))[0]
        return json.loads(self._recv(size))

    def prove_farm_key(self):
        """What an agent holding the farm key does first (tunefarm.core.credential)."""
        from tunefarm.core.credential import AUTH, CHALLENGE, load_farm_key, proof

        code, nonce = self.call([CHALLENGE])
        assert code == 0
        assert self.call([AUTH, "agent", proof(load_farm_key(), nonce, "agent")]) == 0

    def close(self):
        self.sock.close()


def _refused(host, port, message) -> bool:
    """Send one message on a fresh connection; True if the tracker closed it instead of answering."""
    conn = RawTrackerConn(host, port)
    try:
        conn.call(message)
        return False
    except (ConnectionError, OSError):
        return True
    finally:
        conn.close()


GOOD_INFO = {"key": "k", "agent_id": "h:1", "target": {"kind": "llvm"}, "cuda": [{"name": "x"}]}


def test_device_info_from_the_network_is_checked():
    assert DeviceInfo.from_json(GOOD_INFO).agent_id == "h:1"
    assert DeviceInfo.from_json({**GOOD_INFO, "peak_gflops": 250}).peak_gflops == 250.0  # JSON ints are numbers
    for bad in ({"cuda": "abc"}, {"target": 7}, {"num_cores": "2"}, {"num_cores": True}, {"runners": [1]},
                {"cuda": [1]}, {"hostname": "x" * 5000}, {"opencl": {"a": [[[[[[[[1]]]]]]]]}},
                {"threads": 10 ** 9}, {"runners": ["r"] * 1000}, {"peak_gflops": "fast"},
                {"peak_gflops": True}, {"peak_gflops": float("nan")}, {"peak_gflops": float("inf")},
                {"peak_gflops": -1.0}, {"peak_gflops": 1e12}):
        with pytest.raises(ValueError, match="DeviceInfo"):
            DeviceInfo.from_json({**GOOD_INFO, **bad})
    with pytest.raises(ValueError):
        DeviceInfo.from_json(["not", "a", "dict"])


def test_tracker_message_checks():
    ok = [[1], [6], [3, "k", [9000, "k:123"], None], [3, "k", [9000, "k:1"]], [4, "k", "", 0],
          [5, {"key": "server:k", "addr": [None, 9000], INFO_FIELD: GOOD_INFO}], [5, {"key": "server:k"}]]
    for message in ok:
        assert tracker_message_problem(message) is None, message
    bad = [5, [], "x", [True], [5, {"key": 5}], [5, {"key": "server:k", INFO_FIELD: {"cuda": "abc"}}],
           [5, {"key": "server:k", "addr": "x"}], [5, {"key": "server:k", "extra": 1}], [3, "k", [70000, "m"]],
           [3, 5, [9000, "m"]], [4, "k", "", "high"], [5, {"key": "server:k", "addr": [None, 9000],
                                                         INFO_FIELD: {**GOOD_INFO, "target": "x"}}], [99]]
    for message in bad:
        assert tracker_message_problem(message), message


def test_hostile_registrations_do_not_break_the_tracker(tracker, start_agent, tmp_path):
    host, port = tracker
    hostile = [
        [UPDATE_INFO, {"key": 5}],  # the stock tracker would then fail every SUMMARY
        [UPDATE_INFO, {"key": "server:farm", "addr": [None, 9000], INFO_FIELD: {"cuda": "abc", "target": 7}}],
        [UPDATE_INFO, {"key": "server:farm", "addr": [None, 9000], INFO_FIELD: {"target": "[/x]"}}],
        [PUT, {"k": 1}, "x"],
        ["not a code"],
    ]
    for message in hostile:
        assert _refused(host, port, message), message
    # A registration with the farm key that passes the checks but whose text is markup: shown as text.
    conn = RawTrackerConn(host, port)
    try:
        conn.prove_farm_key()
        assert conn.call([PUT, "farm", [9, "farm:1"], "127.0.0.1"]) == 0
        assert conn.call([UPDATE_INFO, {"key": "server:farm", "addr": [None, 9],
                                        INFO_FIELD: {**GOOD_INFO, "key": "farm", "agent_id": "[/x][bold]evil",
                                                     "cpu_model": "[red]"}}]) == 0
        summary = conn.call([SUMMARY])
        assert summary[0] == 0 and any(s.get("key") == "server:farm" for s in summary[1]["server_info"])
        code, table, _ = run_cli(["devices", "--tracker", f"{host}:{port}"], tmp_path / "devices.txt")
        assert code == 0, table
        assert "[/x][bold]evil" in table and "[red]" in table
        code, output, _ = run_cli(["devices", "--tracker", f"{host}:{port}", "--json"], tmp_path / "devices.json")
        assert code == 0 and json.loads(output)[0]["key"] == "farm"
    finally:
        conn.close()
    # The tracker and its watcher are still up, and an honest agent still joins.
    agent = start_agent(host, port, "honest", tmp_path / "agent.log")
    assert [a.key for a in listed_agents(host, port, "honest")] == ["honest"] and agent.poll() is None
    log = (tmp_path / "tracker.log").read_text()
    assert log.count("refused a request") >= len(hostile), log
    wait_until(lambda: "agent joined: key=honest" in (tmp_path / "tracker.log").read_text(), 15,
               what="the watcher's join line for the honest agent")
