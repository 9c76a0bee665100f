"""The farm's plumbing with real processes on loopback: tracker, agents, ``tunefarm devices``."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from conftest import (HOST, agent_id_of, listed_agents, run_cli, spawn_agent, start_tracker, tracker_answers,
                      wait_listed)
from tunefarm.core.errors import NoDeviceError, TrackerUnreachable, TunefarmError
from tunefarm.core.procs import free_port, kill_hard, start_tunefarm, stop_process, wait_until
from tunefarm.core.wire import DeviceInfo


def _one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{output}"
    assert lines[0].startswith("tunefarm: error: "), lines[0]
    return lines[0]


def _rpc_server_pid(agent_log) -> int:
    pids = re.findall(r"started rpc server \(pid (\d+)\)", agent_log.read_text())
    assert pids, agent_log.read_text()
    return int(pids[-1])


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_tracker_stops_cleanly_on_sigterm(tmp_path):
    port = free_port(HOST)
    log = tmp_path / "tracker.log"
    proc = start_tracker(port, log)
    try:
        assert f"tracker listening on {HOST}:{port}" in log.read_text()
        workers = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert workers, "the stock Tracker runs in a worker process"
    finally:
        code = stop_process(proc, sig=signal.SIGTERM)
    assert code == 0, log.read_text()
    assert "stopping the tracker" in log.read_text()
    assert not tracker_answers(HOST, port)
    assert all(_gone(pid) for pid in workers)
    with socket.socket() as sock:  # the port is free again (the same option as the stock tracker)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))


def test_tracker_refuses_a_taken_port(tracker, tmp_path):
    host, port = tracker
    code, output, _ = run_cli(["tracker", "--host", host, "--port", port], tmp_path / "second.log")
    assert code != 0
    assert f"port {port}" in _one_error_line(output) and "already in use" in output
    # It names who holds the port: the running tracker's TVM worker, which is no orphan (nothing to kill).
    assert "(python -m tunefarm.core.popen_worker" in output and "tunefarm tracker --host" in output, output
    assert "kill" not in output, output


def test_agent_registers_and_devices_shows_it(tracker, start_agent, tmp_path):
    from tvm.target import Target

    from tunefarm.tracker.client import TrackerClient, request_rpc_session

    host, port = tracker
    with TrackerClient(host, port) as client:
        waits = []
        with pytest.raises(NoDeviceError) as err:
            client.wait_for_key("cpu-a", 1.5, on_wait=lambda waited, limit: waits.append((waited, limit)))
        assert str(err.value).startswith(f"no agent serves key 'cpu-a' on tracker {host}:{port} (waited ")
        assert str(err.value).endswith(f"start one with: tunefarm agent --tracker {host}:{port} --key cpu-a")
        assert waits and waits[0][1] == 1.5

        agent = start_agent(host, port, "cpu-a", tmp_path / "agent.log")
        agent_id = agent_id_of(agent)
        assert client.wait_for_key("cpu-a", 5) == 1
        assert client.servers_for_key("cpu-a") == 1

        code, output, _ = run_cli(["devices", "--tracker", f"{host}:{port}", "--json"], tmp_path / "devices.json")
        assert code == 0, output
        devices = json.loads(output)
        assert [d["key"] for d in devices] == ["cpu-a"]
        entry = devices[0]
        assert (entry["total"], entry["free"], entry["busy"], entry["pending"]) == (1, 1, 0, 0)
        (listed,) = entry["agents"]
        assert listed["agent_id"] == agent_id and listed["key"] == "cpu-a"
        assert listed["addr"].startswith(f"{HOST}:")
        assert listed["target"]["kind"] == "llvm" and listed["target"]["num-cores"] >= 1
        assert Target(listed["target"]).kind.name == "llvm"
        assert listed["has_cc"] is True and "tvm" in listed["runners"]

        code, table, _ = run_cli(["devices", "--tracker", f"{host}:{port}"], tmp_path / "devices.txt")
        assert code == 0 and "cpu-a" in table and agent_id in table

        # A real session through the tracker lands on this agent's server, which answers
        # tunefarm's global functions; while it is held the key counts one busy server.
        session = request_rpc_session(host, port, "cpu-a", priority=1, session_timeout=60)
        try:
            assert session.get_function("tunefarm.agent.id")() == agent_id
            assert json.loads(session.get_function("tunefarm.agent.info")())["agent_id"] == agent_id
            assert json.loads(session.get_function("tunefarm.agent.target")()) == listed["target"]
            (busy,) = client.devices()
            assert (busy["total"], busy["free"], busy["busy"]) == (1, 0, 1)
        finally:
            del session
        wait_until(lambda: client.devices()[0]["free"] == 1, 30, what="the server back in the free queue")

    assert f"session from {HOST}" in (tmp_path / "agent.log").read_text()
    wait_until(lambda: "agent joined: key=cpu-a" in (tmp_path / "tracker.log").read_text(), 10,
               what="the tracker's join log line")
    assert f"agent={agent_id}" in (tmp_path / "tracker.log").read_text()


def test_two_agents_on_one_key(tracker, tmp_path):
    from tunefarm.tracker.client import TrackerClient

    host, port = tracker
    agents = [spawn_agent(host, port, "shared", tmp_path / f"agent{i}.log") for i in range(2)]
    try:
        for i, agent in enumerate(agents):
            wait_listed(agent, host, port, "shared", tmp_path / f"agent{i}.log")
        with TrackerClient(host, port) as client:
            (entry,) = client.devices()
            assert client.servers_for_key("shared") == 2
        assert entry["key"] == "shared" and entry["total"] == 2 and entry["free"] == 2 and entry["busy"] == 0
        assert sorted(a.agent_id for a in entry["agents"]) == sorted(agent_id_of(a) for a in agents)
        assert len(set(entry["addrs"])) == 2
    finally:
        for agent in agents:
            assert stop_process(agent) == 0


def test_agents_reregister_after_tracker_restart(tmp_path):
    """A tracker that goes away for ~3 s: a healthy agent's stock server re-registers by itself; an
    agent whose server cannot (frozen with SIGSTOP: alive, not listening) is restarted by its supervisor."""
    port = free_port(HOST)
    tracker = start_tracker(port, tmp_path / "tracker1.log")
    second = None
    agents = {}
    try:
        for name in ("healthy", "frozen"):
            agents[name] = spawn_agent(HOST, port, "phoenix", tmp_path / f"{name}.log",
                                       env={"TUNEFARM_AGENT_UNLISTED_RESTART_S": "10"})
        for name, agent in agents.items():
            wait_listed(agent, HOST, port, "phoenix", tmp_path / f"{name}.log")
        healthy_server = _rpc_server_pid(tmp_path / "healthy.log")
        frozen_server = _rpc_server_pid(tmp_path / "frozen.log")
        psutil.Process(frozen_server).suspend()
        assert stop_process(tracker) == 0
        time.sleep(3)
        second = start_tracker(port, tmp_path / "tracker2.log")
        back = time.monotonic()
        ids = {name: agent_id_of(agent) for name, agent in agents.items()}
        # Back means: the frozen agent's rpc server replaced (a new one started) and both listed.
        wait_until(lambda: _rpc_server_pid(tmp_path / "frozen.log") != frozen_server
                   and set(ids.values()) <= {a.agent_id for a in listed_agents(HOST, port, "phoenix")},
                   30, interval=0.5, what="both agents on the restarted tracker, the frozen one's server replaced")
        assert time.monotonic() - back < 30
        assert all(agent.poll() is None for agent in agents.values())
        assert _rpc_server_pid(tmp_path / "healthy.log") == healthy_server
        assert "restarting the rpc server" not in (tmp_path / "healthy.log").read_text()
        assert "restarting the rpc server" in (tmp_path / "frozen.log").read_text()
        assert _rpc_server_pid(tmp_path / "frozen.log") != frozen_server and _gone(frozen_server)
    finally:
        for agent in agents.values():
            stop_process(agent)
        stop_process(tracker)
        if second is not None:
            stop_process(second)


AGENT_BACK_S = 3.0  # restarted tracker answering -> its agent listed again (1 s retry + registration)


def test_a_tracker_killed_with_kill_9_restarts_on_its_port_and_its_agent_comes_back(tmp_path):
    """``kill -9`` of ``tunefarm tracker`` alone (its pid, not its group: what a user or a supervisor does): the
    TVM tracker process it runs dies with it and frees the port, a new ``tunefarm tracker`` starts on that port,
    and the agent's own rpc server registers with it within a few seconds of it answering (issue 36, item 3).
    Before, the tracker process lived on serving the port and the restart failed with "already in use"."""
    port = free_port(HOST)
    tracker = start_tracker(port, tmp_path / "tracker1.log")
    workers = psutil.Process(tracker.pid).children(recursive=True)
    second = None
    agent = spawn_agent(HOST, port, "lazarus", tmp_path / "agent.log")
    try:
        wait_listed(agent, HOST, port, "lazarus", tmp_path / "agent.log")
        server = _rpc_server_pid(tmp_path / "agent.log")
        assert workers, "the stock Tracker runs in a worker process"
        os.kill(tracker.pid, signal.SIGKILL)
        tracker.wait(10)
        restart = time.monotonic()  # at once, as a supervisor would
        second = start_tracker(port, tmp_path / "tracker2.log")
        answered = time.monotonic()
        # The new one serves the port (an orphan of the old one would answer the handshake too).
        log2 = tmp_path / "tracker2.log"
        wait_until(lambda: second.poll() is not None or "tracker listening on" in log2.read_text(), 30, interval=0.1,
                   what="the restarted tracker's first line")
        assert second.poll() is None, log2.read_text()
        assert all(_gone(w.pid) for w in workers)
        me = agent_id_of(agent)
        wait_until(lambda: me in {a.agent_id for a in listed_agents(HOST, port, "lazarus")}, AGENT_BACK_S,
                   interval=0.1, what=f"the agent on the restarted tracker within {AGENT_BACK_S:g} s of it answering")
        print(f"tracker start {answered - restart:.1f} s, agent back {time.monotonic() - answered:.1f} s later "
              f"({time.monotonic() - restart:.1f} s after the restart)")
        # The stock server re-registered by itself: its supervisor neither restarted nor replaced it.
        assert _rpc_server_pid(tmp_path / "agent.log") == server and agent.poll() is None
        assert "restarting" not in (tmp_path / "agent.log").read_text()
    finally:
        stop_process(agent)
        for proc in (tracker, second):
            if proc is not None:
                stop_process(proc)
        for worker in workers:  # before the fix, the orphan still serving the port
            try:
                worker.kill()
            except psutil.Error:
                pass


def test_a_restart_names_the_orphaned_tracker_process_holding_its_port(tmp_path):
    """A stock ``python -m tvm.exec.rpc_tracker`` killed with ``kill -9`` leaves its tracker process serving the
    port (as ``tunefarm tracker`` did before its process died with it): ``tunefarm tracker`` on that port fails
    in one line that names the orphan and how to stop it, and signals nothing."""
    port = free_port(HOST)
    stock = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", HOST, "--port", str(port),
                              "--port-end", str(port + 1), "--silent"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    workers = []
    try:
        wait_until(lambda: stock.poll() is not None or tracker_answers(HOST, port), 60, what="the stock tracker")
        workers = psutil.Process(stock.pid).children(recursive=True)
        assert len(workers) == 1, workers
        os.kill(stock.pid, signal.SIGKILL)
        stock.wait(10)
        assert tracker_answers(HOST, port) and workers[0].is_running()  # the stock tracker's orphan
        code, output, _ = run_cli(["tracker", "--host", HOST, "--port", port], tmp_path / "second.log")
        assert code != 0
        line = _one_error_line(output)
        assert line.startswith(f"tunefarm: error: cannot start the tracker: port {port} on {HOST} is already in use "
                               f"by pid {workers[0].pid} (python -m tvm.exec.popen_worker"), line
        assert "a TVM worker left behind by its parent" in line and f"stop it with `kill {workers[0].pid}`" in line
        assert workers[0].is_running() and tracker_answers(HOST, port)  # named, not signalled
    finally:
        stop_process(stock)
        for worker in workers:
            try:
                worker.kill()
            except psutil.Error:
                pass


def test_a_slow_starting_server_is_not_restarted_for_being_unlisted(tracker, tmp_path):
    """The supervisor's "not listed for a while" clock starts when its rpc server listens: a server still
    importing (TVM here takes longer than the 1 s allowed below) is let finish starting and register, not
    restarted over and over (it was, before: the clock ran from the child's start)."""
    host, port = tracker
    log = tmp_path / "slow.log"
    agent = spawn_agent(host, port, "slowstart", log, env={"TUNEFARM_AGENT_UNLISTED_RESTART_S": "1"})
    try:
        wait_listed(agent, host, port, "slowstart", log)
        text = log.read_text()
        assert "restarting the rpc server" not in text and text.count("started rpc server") == 1
    finally:
        assert stop_process(agent) == 0


def test_devices_fails_fast_without_a_tracker(tmp_path):
    closed = free_port(HOST)
    code, output, seconds = run_cli(["devices", "--tracker", f"{HOST}:{closed}"], tmp_path / "closed.log")
    assert code != 0 and seconds < 10
    assert f"{HOST}:{closed}" in _one_error_line(output)


def test_tracker_client_does_not_hang_on_a_silent_port():
    """A port that accepts connections but never speaks the tracker protocol (the stock
    TrackerSession would wait forever): the same check ``tunefarm devices`` runs, with a 1 s bound."""
    from tunefarm.tracker.client import TrackerClient

    with socket.socket() as silent:
        silent.bind((HOST, 0))
        silent.listen(8)
        silent_port = silent.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(TrackerUnreachable, match=f"{HOST}:{silent_port} is not a TVM RPC tracker"):
            TrackerClient(HOST, silent_port, timeout=1.0)
    assert time.monotonic() - start < 5


def test_agent_rejects_bad_targets_in_one_line(tmp_path):
    tracker = f"{HOST}:{free_port(HOST)}"  # never contacted: the target is checked first
    cases = {"{bad json": "is not valid JSON", "no-such-preset": "unknown target 'no-such-preset'",
             '{"kind": "llvm", "mcpu": "no-such-cpu"}': "LLVM does not know the CPU 'no-such-cpu'"}
    procs = {}
    for i, target in enumerate(cases):
        procs[target] = (start_tunefarm(["agent", "--tracker", tracker, "--key", "k", "--target", target],
                                        log_path=tmp_path / f"bad{i}.log"), tmp_path / f"bad{i}.log")
    try:
        for target, expected in cases.items():
            proc, log = procs[target]
            assert proc.wait(120) != 0
            assert expected in _one_error_line(log.read_text())
    finally:
        for proc, _ in procs.values():
            stop_process(proc)


def test_agent_without_tracker_fails_in_one_line(tmp_path):
    closed = free_port(HOST)
    code, output, _ = run_cli(["agent", "--tracker", f"{HOST}:{closed}", "--key", "k"], tmp_path / "agent.log")
    assert code != 0
    lines = [line for line in output.splitlines() if line.startswith("tunefarm: error: ")]
    assert lines == [f"tunefarm: error: cannot reach tracker {HOST}:{closed}: Connection refused"]


def test_probe_gives_a_valid_llvm_target():
    from tvm.target import Target, codegen

    from tunefarm.core.targets import preset_names
    from tunefarm.device_agents.probe import check_c_compiler, physical_cores, probe, resolve_target

    info = probe(key="k", agent_id="here:1")
    target = Target(info.target)
    assert target.kind.name == "llvm"
    assert info.target["num-cores"] == info.num_cores == physical_cores() >= 1
    if "mcpu" in info.target:
        assert codegen.llvm_is_valid_cpu(info.target["mcpu"], codegen.llvm_get_system_triple())
    assert info.cpu_model and info.tvm_version and info.runners[0] == "tvm"
    assert info.has_cc == check_c_compiler()[0]
    assert info.opencl["tvm_runtime_opencl"] is False  # the PyPI wheel is built with USE_OPENCL=OFF
    assert DeviceInfo.from_json(json.loads(info.dumps())) == info
    assert resolve_target("auto", info) == info.target

    # Every preset parses in TVM; the CUDA one keeps what MetaSchedule needs from its tag.
    assert {"intel-igpu-opencl", "nvidia-h100", "x86-avx512"} <= set(preset_names())
    for name in preset_names():
        Target(resolve_target(name, info))
    h100 = Target(resolve_target("nvidia-h100", info))
    assert str(h100.attrs["arch"]) == "sm_90a" and int(h100.attrs["max_shared_memory_per_block"]) > 0
    assert h100.host.kind.name == "llvm"
    assert resolve_target("x86-avx512", info)["num-cores"] == info.num_cores
    with pytest.raises(TunefarmError, match="Target kind \"nope\" is not defined"):
        resolve_target('{"kind": "nope"}', info)


def test_killed_agent_disappears(tracker, start_agent, tmp_path):
    host, port = tracker
    log = tmp_path / "agent.log"
    agent = start_agent(host, port, "doomed", log)
    server_pid = _rpc_server_pid(log)
    # The tracker logs from a 1 s poll: let it see the agent before it goes.
    wait_until(lambda: "agent joined: key=doomed" in (tmp_path / "tracker.log").read_text(), 10,
               what="the tracker's join log line")
    kill_hard(agent)
    # The agent's RPC server dies with it (parent-death signal) and the tracker drops it.
    wait_until(lambda: _gone(server_pid), 15, what="the agent's rpc server to exit")
    wait_until(lambda: not listed_agents(host, port, "doomed"), 15, what="the tracker to drop the agent")
    code, output, _ = run_cli(["devices", "--tracker", f"{host}:{port}", "--json"], tmp_path / "devices.json")
    assert code == 0 and json.loads(output) == []
    wait_until(lambda: "agent left: key=doomed" in (tmp_path / "tracker.log").read_text(), 10,
               what="the tracker's leave log line")
