"""Whoever reaches an agent's RPC port, with no credential, can neither block nor crash it (issue 32, item 1).

The agent is the real ``tunefarm agent`` (its RPC server process runs TVM's listen loop with the farm's accept
step, :mod:`tunefarm.device_agents.rpc_accept`); the hostile side writes TVM's RPC handshake by hand.
"""
from __future__ import annotations

import re
import socket
import struct
import threading
import time

from conftest import agent_id_of, closed_by_peer
from tunefarm.core.procs import wait_until
from tunefarm.device_agents.rpc_accept import MAX_KEY_BYTES, handshake_problem, parse_options
from tunefarm.testing.localfarm import HOST

RPC_MAGIC = 0xFF271


def test_handshake_checks():
    magic = struct.pack("<i", RPC_MAGIC)
    assert handshake_problem(b"", RPC_MAGIC) == (4, None)
    assert handshake_problem(magic, RPC_MAGIC) == (4, None)
    assert handshake_problem(magic + struct.pack("<i", 5) + b"cl", RPC_MAGIC) == (3, None)
    assert handshake_problem(magic + struct.pack("<i", 5) + b"cli:k", RPC_MAGIC) == (0, None)
    for body, why in [(struct.pack("<i", 0), "key length 0"), (struct.pack("<i", -1), "key length -1"),
                      (struct.pack("<i", MAX_KEY_BYTES + 1), f"key length {MAX_KEY_BYTES + 1}"),
                      (struct.pack("<i", 2) + b"\xff\xfe", "not UTF-8"), (struct.pack("<i", 2) + b"  ", "empty key")]:
        need, problem = handshake_problem(magic + body, RPC_MAGIC)
        assert need == 0 and problem and why in problem, (body, problem)
    assert handshake_problem(struct.pack("<i", 0x2F271), RPC_MAGIC)[1] == "not a TVM RPC client (wrong magic)"
    assert parse_options(["-timeout=60", "x"]) == ({"timeout": 60.0}, None)
    for bad in ("-timeout=abc", "-timeout=nan", "-timeout=inf", "-timeout=-1", "-timeout=0"):
        assert parse_options([bad])[1], bad


def _rpc_port(log_path) -> int:
    found = []

    def serving() -> bool:
        found[:] = re.findall(r"serving key '\S+' on \S+:(\d+)", log_path.read_text(errors="replace"))
        return bool(found)

    wait_until(serving, 30, what="the agent's rpc server line")
    return int(found[-1])


def _session_within(host, port, key, seconds) -> str | None:
    """The agent id a fresh farm session answers, or None if none opened within ``seconds``."""
    from tunefarm.tracker.client import request_rpc_session

    got: list = []

    def ask():
        try:
            session = request_rpc_session(host, port, key, priority=1, session_timeout=30)
            got.append(session.get_function("tunefarm.agent.id")())
            del session
        except Exception as err:  # pylint: disable=broad-except
            got.append(err)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not (got and isinstance(got[0], Exception)), got
    return got[0] if got else None


def test_a_stranger_can_neither_block_nor_crash_an_agents_port(tracker, start_agent, tmp_path):
    host, port = tracker
    log = tmp_path / "agent.log"
    agent = start_agent(host, port, "k", log)
    rpc_port = _rpc_port(log)
    magic = struct.pack("<i", RPC_MAGIC)

    # Held open for the whole test, sending nothing (the stock accept step waited on the first for ever).
    idle = [socket.create_connection((HOST, rpc_port)) for _ in range(2)]
    # A handshake that promises a long key and never sends it.
    promised = socket.create_connection((HOST, rpc_port))
    promised.sendall(magic + struct.pack("<i", MAX_KEY_BYTES))
    try:
        # With both held, farm sessions still open, one after the other.
        for _ in range(2):
            assert _session_within(host, port, "k", 20) == agent_id_of(agent)

        # 12 bytes or less each: the stock loop died on every one of these (the agent restarted its server).
        hostile = {"key length 0": magic + struct.pack("<i", 0),
                   "key length -1": magic + struct.pack("<i", -1),
                   "key length 2147483647": magic + struct.pack("<i", 2 ** 31 - 1),
                   "the key is not UTF-8": magic + struct.pack("<i", 4) + b"\xff\xfe\xfd\xfc",
                   "an empty key": magic + struct.pack("<i", 3) + b" \t ",
                   "wrong magic": struct.pack("<i", 0x2F271)}
        for why, payload in hostile.items():
            conn = socket.create_connection((HOST, rpc_port))
            conn.sendall(payload)
            assert closed_by_peer(conn, 5), why
            conn.close()
        # A client with a key but not the session the tracker handed out: the stock mismatch answer.
        conn = socket.create_connection((HOST, rpc_port))
        conn.sendall(magic + struct.pack("<i", 13) + b"client:k:0.12")
        conn.settimeout(5)
        assert struct.unpack("<i", conn.recv(4))[0] == 0xFF271 + 2  # RPC_CODE_MISMATCH
        conn.close()

        # The agent is still serving, from the same rpc server process: a session opens at once.
        assert _session_within(host, port, "k", 20) == agent_id_of(agent)
        # Connections left waiting when a session starts are closed; one that stays idle is closed after
        # the handshake deadline, each with one line.
        assert all(closed_by_peer(sock, 1) for sock in idle + [promised])
        late = socket.create_connection((HOST, rpc_port))
        late.sendall(magic)
        idle.append(late)
        assert not closed_by_peer(late, 2) and closed_by_peer(late, 10)
        text = log.read_text(errors="replace")
        for why in hostile:
            assert re.search(rf"refused a connection from 127\.0\.0\.1:\d+: [^\n]*{re.escape(why)}", text), (why, text)
        assert "mismatched key" in text and "no whole handshake within 5 s" in text
        assert "a session started before its handshake was whole" in text
        assert "listen loop" not in text and "restarting" not in text, text
        assert len(re.findall(r"serving key 'k'", text)) == 1, text  # never restarted
        assert agent.poll() is None
    finally:
        for sock in idle + [promised]:
            sock.close()


def test_a_flood_of_idle_connections_does_not_keep_a_session_out(tracker, start_agent, tmp_path):
    host, port = tracker
    log = tmp_path / "agent.log"
    agent = start_agent(host, port, "k", log)
    rpc_port = _rpc_port(log)
    flood = []
    try:
        start = time.monotonic()
        for _ in range(200):  # more than the handshakes the agent reads at once, from one address
            flood.append(socket.create_connection((HOST, rpc_port)))
        assert _session_within(host, port, "k", 20) == agent_id_of(agent)
        assert time.monotonic() - start < 30
        text = log.read_text(errors="replace")
        assert "handshakes at once from one address" in text
        # The log stays short: refusals beyond a few per 10 s are counted, not written one by one.
        assert text.count("refused a connection") <= 40, text
        assert "restarting" not in text
    finally:
        for sock in flood:
            sock.close()


def test_a_job_spends_no_trial_on_a_port_under_attack(tracker, start_agent, tmp_path):
    """While a stranger holds idle connections and sends the 12-byte crashers every half second, a job measures
    every candidate it builds on the one agent: nothing fails for want of a device, the server never restarts."""
    import yaml

    from conftest import run_cli

    host, port = tracker
    log = tmp_path / "agent.log"
    start_agent(host, port, "k", log)
    rpc_port = _rpc_port(log)
    magic = struct.pack("<i", RPC_MAGIC)
    stop = threading.Event()
    idle = [socket.create_connection((HOST, rpc_port)) for _ in range(3)]

    def attack():
        while not stop.wait(0.5):
            for payload in (magic + struct.pack("<i", 0), magic + struct.pack("<i", -1)):
                try:
                    socket.create_connection((HOST, rpc_port)).sendall(payload)
                except OSError:
                    pass
            idle.append(socket.create_connection((HOST, rpc_port)))  # and one more idle connection each time

    thread = threading.Thread(target=attack, daemon=True)
    thread.start()
    try:
        job = {"name": "attacked", "model": {"source": "builtin", "name": "matmul"},
               "device": {"key": "k", "tracker": f"{host}:{port}"}, "target": {"kind": "llvm", "num-cores": 1},
               "tuning": {"max_trials_global": 8, "num_trials_per_iter": 4, "population_size": 64,
                          "warm_start": False},
               "builder": {"workers": 1, "timeout_sec": 60},
               "runner": {"timeout_sec": 30, "device_wait_sec": 30, "number": 2, "min_repeat_ms": 5}}
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
        code, out, _ = run_cli(["tune", tmp_path / "job.yaml", "--logs-dir", tmp_path / "logs", "--skip-eval"],
                               tmp_path / "tune.log", 600)
    finally:
        stop.set()
        thread.join(5)
        for sock in idle:
            sock.close()
    flat = " ".join(out.split())
    assert code == 0, out
    assert re.search(r"this run: \d+ trial\(s\) measured \(0 failed\)", flat), out
    text = log.read_text(errors="replace")
    assert "key length -1" in text and "restarting" not in text and "listen loop" not in text, text
    assert len(re.findall(r"serving key 'k'", text)) == 1
