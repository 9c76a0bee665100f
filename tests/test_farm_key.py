"""The farm key: without it, a process that reaches the tracker can neither register a server nor take a
session; stock TVM servers join only on keys the tracker leaves open, and are shown as such."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from conftest import HOST, run_cli, spawn_agent, tracker_answers, wait_listed
from tunefarm.core.credential import load_farm_key, proof, proof_ok
from tunefarm.core.errors import TunefarmError
from tunefarm.core.procs import free_port, start_tunefarm, stop_process, wait_until


def test_proofs_and_key_files(tmp_path, monkeypatch):
    monkeypatch.delenv("TUNEFARM_FARM_KEY", raising=False)
    path = tmp_path / "farm.key"
    key = load_farm_key(path)
    assert path.stat().st_mode & 0o777 == 0o600 and len(key) >= 32 and load_farm_key(path) == key
    assert proof_ok(key, "n1", "agent", proof(key, "n1", "agent"))
    assert not proof_ok(key, "n2", "agent", proof(key, "n1", "agent"))  # a recorded proof is worth nothing later
    assert not proof_ok(key, "n1", "host", proof(key, "n1", "agent"))
    assert not proof_ok(b"other", "n1", "agent", proof(key, "n1", "agent"))
    assert not proof_ok(key, None, "agent", proof(key, "n1", "agent"))
    os.chmod(path, 0o644)
    with pytest.raises(TunefarmError, match="readable by others"):
        load_farm_key(path)
    with pytest.raises(TunefarmError, match="no farm key at"):
        load_farm_key(tmp_path / "missing.key", create=False)


def _stock_server(port: int, key: str, log) -> subprocess.Popen:
    first = free_port(HOST)
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--tracker", f"{HOST}:{port}",
                                 "--key", key, "--host", HOST, "--port", str(first), "--port-end", str(first + 50)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def test_only_farm_key_holders_register_and_take_sessions(tmp_path):
    from tvm import rpc

    from tunefarm.tracker.client import TrackerClient, request_rpc_session

    port = free_port(HOST)
    tracker = start_tunefarm(["tracker", "--host", HOST, "--port", port, "--open-key", "open"], tmp_path / "tracker.log")
    procs = [tracker]
    try:
        wait_until(lambda: tracker_answers(HOST, port), 60, what="the tracker")
        procs.append(_stock_server(port, "closed", tmp_path / "stock-closed.log"))
        procs.append(_stock_server(port, "open", tmp_path / "stock-open.log"))
        wrong = spawn_agent(HOST, port, "closed", tmp_path / "wrong.log", env={"TUNEFARM_FARM_KEY": "not the key"})
        procs.append(wrong)
        honest = spawn_agent(HOST, port, "closed", tmp_path / "honest.log")
        procs.append(honest)
        wait_listed(honest, HOST, port, "closed", tmp_path / "honest.log")
        with TrackerClient(HOST, port) as client:
            wait_until(lambda: client.servers_for_key("open") == 1, 60, what="the stock server on the open key")
            wait_until(lambda: any(r["key"] == "closed" for d in client.devices() for r in d["refused"]), 60,
                       what="the refused stock server in the summary")
            wait_until(lambda: "registration refused" in (tmp_path / "wrong.log").read_text(), 60,
                       what="the agent with a wrong key to be refused")
            # On the closed key: the honest agent only, the stock server and the wrong-key agent are not listed.
            assert client.servers_for_key("closed") == 1
            (closed,) = [d for d in client.devices() if d["key"] == "closed"]
            assert [a.agent_id for a in closed["agents"]] == [f"{os.uname().nodename}:{honest.pid}"]
        code, table, _ = run_cli(["devices", "--tracker", f"{HOST}:{port}"], tmp_path / "devices.txt")
        assert code == 0 and "REFUSED: no farm key" in table and "(stock server, open key)" in table
        code, output, _ = run_cli(["devices", "--tracker", f"{HOST}:{port}", "--json"], tmp_path / "devices.json")
        by_key = {d["key"]: d for d in json.loads(output)}
        assert by_key["closed"]["refused"] and by_key["open"]["total"] == 1 and not by_key["open"]["refused"]

        # Sessions: a stock client gets one on the open key, never on the closed one; the farm's client does.
        session = rpc.connect_tracker(HOST, port).request("open", session_timeout=30)
        assert session is not None
        del session
        with pytest.raises(Exception):
            rpc.connect_tracker(HOST, port).request("closed", session_timeout=30)
        session = request_rpc_session(HOST, port, "closed", priority=1, session_timeout=30)
        assert session.get_function("tunefarm.agent.id")() == f"{os.uname().nodename}:{honest.pid}"
        del session
        log = (tmp_path / "tracker.log").read_text()
        assert "cannot register a server on key 'closed' without the farm key" in log
        assert "cannot request a session on key 'closed' without the farm key" in log
        assert "wrong farm key" in log
        assert (tmp_path / "wrong.log").read_text().count("registration refused") == 1  # said once, not per retry
    finally:
        for proc in reversed(procs):
            stop_process(proc)


def test_the_key_file_is_made_private(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFARM_FARM_KEY_FILE", str(tmp_path / "sub" / "farm.key"))
    monkeypatch.delenv("TUNEFARM_FARM_KEY", raising=False)
    load_farm_key()
    assert stat.S_IMODE((tmp_path / "sub" / "farm.key").stat().st_mode) == 0o600
