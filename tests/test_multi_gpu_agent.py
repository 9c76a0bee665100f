"""``tunefarm agent --gpus`` (issue 35): one agent per card of a GPU box, supervised as one command.

For real, on this machine's CPU: a tracker, ``tunefarm agent --gpus 0,1`` as one process. This machine has no
GPU, so the two children serve the CPU target (the documented, warned behaviour of explicit indices without a
GPU), each with CUDA_VISIBLE_DEVICES set to its index, NVLink multicast off, its own port range, the id
``<host>:gpu<i>`` and half the cores. One child killed with kill -9 is restarted and re-registers under the same
id; a small tuning job measures candidates on both cards' agents, and the timing verifier's second measurement of
each new best goes to the other card; SIGTERM to the supervisor stops every process it started and frees their
ports.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import time

import psutil
import pytest

from conftest import HOST, run_cli, start_tracker
from test_tuning import write_job
from tunefarm.core.errors import TrackerUnreachable, TunefarmError
from tunefarm.core.procs import free_port, start_tunefarm, stop_process, wait_until
from tunefarm.device_agents.gpus import choose_cards, cpu_split, parse_gpus, parse_nvidia_smi_list

KEY = "cards"
LISTED_S = 120.0  # two agents probing and importing TVM at once on 2 busy cores (~25 s here)
RESTART_S = 90.0  # kill -9 -> listed again: 1 s back-off, then one agent's start (~15 s here)


def _listed(port: int) -> dict[str, tuple]:
    """agent id -> (DeviceInfo, 'host:port') of the agents the tracker lists on KEY."""
    from tunefarm.tracker.client import TrackerClient

    try:
        with TrackerClient(HOST, port) as client:
            for item in client.devices():
                if item["key"] == KEY:
                    return {a.agent_id: (a, addr) for a, addr in zip(item["agents"], item["addrs"])
                            if hasattr(a, "agent_id")}
    except TrackerUnreachable:
        pass
    return {}


def _children(sup) -> dict[int, psutil.Process]:
    """The supervisor's child agents by card index (their --gpu-child)."""
    found = {}
    for proc in psutil.Process(sup.pid).children():
        try:
            cmd = proc.cmdline()
        except psutil.Error:
            continue
        if "--gpu-child" in cmd:
            found[int(cmd[cmd.index("--gpu-child") + 1])] = proc
    return found


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def test_gpus_is_parsed_and_checked_against_the_cards_found():
    assert parse_gpus("all") == parse_gpus(" ALL ") == "all"
    assert parse_gpus("0,1") == [0, 1] and parse_gpus("3, 1") == [3, 1]
    for bad in ("", "garbage", "0,0", "-1", "0,,1", "1.5", "all,0", "0;1", "64"):
        with pytest.raises(TunefarmError, match="--gpus"):
            parse_gpus(bad)
    listing = ("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5d1e0c2a-0000-0000-0000-000000000000)\n"
               "GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-aaaa)\n"
               "  MIG 1g.5gb     Device  0: (UUID: MIG-bbbb)\n")
    assert parse_nvidia_smi_list(listing) == [(0, "NVIDIA H100 80GB HBM3"), (1, "NVIDIA A100-SXM4-40GB")]
    assert parse_nvidia_smi_list("No devices were found\n") == []
    found = [(0, "NVIDIA H100"), (1, "NVIDIA H100"), (2, "NVIDIA H100")]
    assert choose_cards("all", found, "nvidia-smi -L") == ([0, 1, 2], True)
    assert choose_cards([2, 0], found, "nvidia-smi -L") == ([2, 0], True)
    with pytest.raises(TunefarmError, match="no GPU 3 on this machine"):
        choose_cards([0, 3], found, "nvidia-smi -L")
    with pytest.raises(TunefarmError, match="--gpus all: no GPU found"):
        choose_cards("all", [], "nvidia-smi -L")
    assert choose_cards([0, 1], [], "nvidia-smi -L") == ([0, 1], False)  # no GPU here: allowed, served by the CPU
    each, builds, said = cpu_split(2, None)
    assert each >= 1 and builds >= 1 and "split between 2 agents" in said
    assert cpu_split(1000, None)[:2] == (1, 1)  # never below one thread and one build
    assert cpu_split(2, 3)[0] == 3


def test_gpus_garbage_and_no_gpu_are_one_line_errors(tmp_path):
    for n, (args, says) in enumerate([
            (["--gpus", "garbage"], "--gpus takes 'all' or card indices"),
            (["--gpus", "0,0"], "--gpus names a card twice"),
            (["--gpus", "0", "--opencl"], "--gpus starts one agent per CUDA card"),
            # This machine has no GPU (no nvidia-smi, no CUDA device for TVM).
            (["--gpus", "all"], "--gpus all: no GPU found on this machine")]):
        code, out, _ = run_cli(["agent", "--tracker", f"{HOST}:1", "--key", KEY, *args], tmp_path / f"{n}.log")
        lines = out.strip().splitlines()
        assert code != 0 and len(lines) == 1 and lines[0].startswith("tunefarm: error: ") and says in out, out


def test_one_command_serves_each_card_restarts_a_killed_one_and_stops_them_all(tmp_path):
    port = free_port(HOST)
    tracker = start_tracker(port, tmp_path / "tracker.log")
    base = free_port(HOST)
    log = tmp_path / "agents.log"
    sup = start_tunefarm(["agent", "--gpus", "0,1", "--tracker", f"{HOST}:{port}", "--key", KEY, "--host", HOST,
                          "--port", base], log)
    host = socket.gethostname()
    ids = {0: f"{host}:gpu0", 1: f"{host}:gpu1"}
    try:
        t0 = time.monotonic()
        wait_until(lambda: sup.poll() is not None or set(ids.values()) <= set(_listed(port)), LISTED_S,
                   what="both cards' agents listed")
        assert sup.poll() is None, log.read_text()
        print(f"both listed after {time.monotonic() - t0:.1f} s")
        out = log.read_text()
        # The documented behaviour without a GPU: a warning line, and each child serves the CPU.
        assert "no GPU found on this machine" in out and "starting 2 agents anyway" in out, out
        assert "split between 2 agents" in out, out
        listed = _listed(port)
        assert set(listed) == set(ids.values()), listed
        from tunefarm.core.threads import usable_cores

        share = max(1, usable_cores() // 2)
        for index, agent_id in ids.items():
            info, addr = listed[agent_id]
            first = base + 100 * index  # disjoint ranges: [base, base+100) and [base+100, base+200)
            assert first <= int(addr.rsplit(":", 1)[1]) < first + 100, (agent_id, addr)
            assert info.threads == share and info.target["kind"] == "llvm" and info.target["num-cores"] == share
            assert info.peak_gflops > 0
        children = _children(sup)
        assert sorted(children) == [0, 1]
        for index, child in children.items():
            env = child.environ()
            assert env["CUDA_VISIBLE_DEVICES"] == str(index) and env["NCCL_NVLS_ENABLE"] == "0", env
            assert env["TVM_NUM_THREADS"] == env["OMP_NUM_THREADS"] == str(share)
            assert env["TUNEFARM_AGENT_BUILD_WORKERS"] == str(max(1, len(os.sched_getaffinity(0)) // 2))

        # kill -9 the agent of gpu1: the supervisor restarts it and it registers again under the same id.
        victim = children[1]
        (server,) = [p for p in victim.children() if "tunefarm.device_agents.rpc_server" in p.cmdline()]
        # (its RPC server, which dies with it: PDEATHSIG)
        victim.kill()
        killed = time.monotonic()
        wait_until(lambda: not _alive(server.pid) and ids[1] not in _listed(port), 30,
                   what="the killed agent's server gone from the tracker")
        wait_until(lambda: ids[1] in _listed(port) or sup.poll() is not None, RESTART_S,
                   what="gpu1's agent listed again")
        print(f"gpu1 listed again {time.monotonic() - killed:.1f} s after kill -9")
        assert sup.poll() is None, log.read_text()
        out = log.read_text()
        assert "gpu1: agent was killed by signal 9" in out and "restarting it in 1 s" in out, out
        assert _children(sup)[1].pid != victim.pid
        assert _children(sup)[0].pid == children[0].pid  # the other card's agent was left alone
        assert set(_listed(port)) == set(ids.values())
        # `tunefarm devices` shows one line per card, in the cards' order, each with its own ports.
        code, table, _ = run_cli(["devices", "--tracker", f"{HOST}:{port}"], tmp_path / "devices.log")
        assert code == 0 and table.index(f"{ids[0]} @ {HOST}:") < table.index(f"{ids[1]} @ {HOST}:"), table

        # A small tuning job on the key: its batches are measured on both cards' agents, and each new best is
        # measured a second time on the other card (the verifier prefers an agent other than the first).
        job = write_job(tmp_path / "job.yaml", "cards", port, KEY, {"source": "builtin", "name": "matmul"},
                        trials=8, per_iter=4, tuning={"warm_start": False},
                        evaluate={"baselines": [], "warmup": 2, "repeat": 5, "require_speedup": False})
        t1 = time.monotonic()
        code, tune_out, _ = run_cli(["tune", job, "--logs-dir", tmp_path / "logs"], tmp_path / "tune.log", 300)
        print(f"tuning job: {time.monotonic() - t1:.1f} s")
        assert code == 0, tune_out
        job_dir = tmp_path / "logs" / "cards"
        report = json.loads((job_dir / "report.json").read_text())
        per_agent = report["tuning"]["per_agent"]
        assert set(per_agent) == set(ids.values()) and all(n > 0 for n in per_agent.values()), per_agent
        verified = [json.loads(line) for line in (job_dir / "verified.jsonl").read_text().splitlines()]
        checked = [v for v in verified if v.get("verified_by")]
        assert checked, verified
        assert all(v["verified_by"] != v["measured_by"] and {v["verified_by"], v["measured_by"]} == set(ids.values())
                   for v in checked), checked

        # SIGTERM to the supervisor stops every process it started; their ports are free again.
        pids = [p.pid for p in psutil.Process(sup.pid).children(recursive=True)]
        ports = [int(addr.rsplit(":", 1)[1]) for _, addr in _listed(port).values()]
        assert len(pids) >= 4 and len(ports) == 2, (pids, ports)
        os.kill(sup.pid, signal.SIGTERM)
        t2 = time.monotonic()
        assert sup.wait(40) == 0, log.read_text()
        print(f"supervisor stopped {time.monotonic() - t2:.1f} s after SIGTERM")
        wait_until(lambda: not any(_alive(pid) for pid in pids), 10, what="every child process gone")
        assert all(_port_free(p) for p in ports), ports
        assert "stopped every agent" in log.read_text()
        wait_until(lambda: not _listed(port), 10, what="the tracker to list no agent on the key")
    finally:
        stop_process(sup)
        stop_process(tracker)


def test_a_card_agent_that_fails_its_first_start_stops_the_command(tracker, tmp_path):
    """A card's agent that cannot start (here: a target no agent can serve) is not restarted forever: the command
    stops every card's agent and exits with one line naming the card, the agent's own error above it."""
    host, port = tracker
    code, out, took = run_cli(["agent", "--gpus", "0,1", "--tracker", f"{host}:{port}", "--key", KEY, "--host", HOST,
                               "--port", free_port(HOST), "--target", "no-such-target"], tmp_path / "agents.log", 120)
    assert code != 0, out
    assert "unknown target 'no-such-target'" in out, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("tunefarm: error: the agent of gpu") and "failed at start" in last, out
    assert "restarting" not in out, out
    print(f"exited {took:.1f} s after start")
