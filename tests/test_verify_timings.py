"""Issue 12: a process that holds the farm key but fakes its timings gets none of them into the farm's truth.

A real tracker, an honest agent and a rogue RPC server (tests/rogue_timing_server.py: the farm's own
server with the timer replaced, answering 20 ns for every candidate, reporting a huge peak and an agent id
of its own) on one key; a real tuning job through both. Every result of the rogue is either below the
physical floor (committed as failed) or a new best, which the honest agent measures again before it
counts; after three strikes the rogue is flagged. No record of the fake time enters the database, every
workload's best is a verified record, and ``logs best`` exports only verified ones.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import HOST, listed_agents, run_cli, spawn_agent, start_tracker, wait_listed
from tunefarm.core.procs import free_port, stop_process, wait_until

# What the rogue answers for every candidate: below the physical floor of the convs (flops / the key's lowest peak:
# microseconds), above that of the tiniest tasks (a few ns for the convnet's matmul at ~150 GFLOP/s), so both
# checks are exercised on any machine. At 1 ns every task's floor was above it on a 2-core AMD EPYC (146 GFLOP/s)
# and no fake ever reached the second measurement.
FAKE_S = 2e-8
TUNE_TIMEOUT_S = 900


def _rogue(port: int, key: str, info: dict, log: Path) -> subprocess.Popen:
    first = free_port(HOST)
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, str(Path(__file__).with_name("rogue_timing_server.py")), str(FAKE_S),
                                 "--tracker", f"{HOST}:{port}", "--key", key, "--host", HOST, "--port", str(first),
                                 "--port-end", str(first + 50), "--info-json", json.dumps(info)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def test_a_rogue_with_the_farm_key_cannot_fake_timings(tmp_path):
    import yaml

    from tunefarm.host.tuning.jobdir import JobDir, mean_run_s
    from tunefarm.host.tuning.verify import trace_hash
    from tunefarm.tracker.client import TrackerClient

    port = free_port(HOST)
    tracker = start_tracker(port, tmp_path / "tracker.log")
    honest = rogue = None
    try:
        honest = spawn_agent(HOST, port, "mixed", tmp_path / "honest.log")
        wait_listed(honest, HOST, port, "mixed", tmp_path / "honest.log")
        (info,) = [a.to_json() for a in listed_agents(HOST, port, "mixed")]
        assert info["peak_gflops"] > 0  # the agent measured its peak
        rogue_info = dict(info, agent_id="rogue:1", peak_gflops=1e8)  # a huge peak, to lower its own floor
        rogue = _rogue(port, "mixed", rogue_info, tmp_path / "rogue.log")
        with TrackerClient(HOST, port) as client:
            wait_until(lambda: client.servers_for_key("mixed") == 2, 60, what="the rogue to register")
        job = {"name": "victim", "model": {"source": "builtin", "name": "convnet"},
               "device": {"key": "mixed", "tracker": f"{HOST}:{port}"}, "target": "from-agent",
               "tuning": {"max_trials_global": 32, "num_trials_per_iter": 4, "population_size": 64},
               "builder": {"workers": 2, "timeout_sec": 60},
               "runner": {"timeout_sec": 30, "device_wait_sec": 30, "number": 2, "min_repeat_ms": 5}}
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
        logs = tmp_path / "logs"
        code, out, _ = run_cli(["tune", tmp_path / "job.yaml", "--logs-dir", logs, "--skip-eval"],
                               tmp_path / "tune.log", TUNE_TIMEOUT_S)
        assert code == 0, out
        assert "FLAGGED agent rogue:1" in out, out

        job_dir = JobDir(logs / "victim")
        database = job_dir.open_database()
        records = database.get_all_tuning_records()
        means = [m for m in (mean_run_s(r.run_secs) for r in records) if m is not None]
        # Not one fake timing in the database (an honest tiny kernel may take tens of ns, never exactly the fake).
        assert means and not [m for m in means if abs(m - FAKE_S) < FAKE_S / 100], sorted(means)[:5]
        verified = job_dir.verified()
        assert verified, "nothing was verified"
        import tvm_ffi
        seen = set()
        for rec in records:  # every workload's best record is a verified one
            key = str(tvm_ffi.structural_hash(rec.workload.mod))
            if key in seen:
                continue
            seen.add(key)
            top = database.get_top_k(rec.workload, 1)
            if top:
                assert trace_hash(top[0].trace) in verified.get(key, set()), key
        log = [json.loads(l) for l in (logs / "victim" / "verified.jsonl").read_text().splitlines()]
        assert any(e.get("measured_by") == "rogue:1" for e in log), log[:5]
        # Each of the rogue's would-be bests was measured again by the honest agent, which did not reproduce it.
        rogue_bests = [e for e in log if e.get("measured_by") == "rogue:1" and "verify_s" in e]
        assert rogue_bests and all(e["verified_by"] != "rogue:1" and e.get("disputed") for e in rogue_bests), log

        code, out, _ = run_cli(["logs", "best", logs / "victim", "-o", tmp_path / "best"], tmp_path / "best.log", 120)
        assert code == 0 and "best verified record" in out, out
        from tvm.s_tir import meta_schedule as ms
        exported = ms.database.JSONDatabase(work_dir=str(tmp_path / "best")).get_all_tuning_records()
        assert exported and all(abs(mean_run_s(r.run_secs) - FAKE_S) > FAKE_S / 100 for r in exported)
    finally:
        for proc in (rogue, honest, tracker):
            if proc is not None:
                stop_process(proc)


def test_two_measurements_are_judged_by_the_slower_and_only_a_lie_is_a_strike():
    """The verdict on a record measured twice (what the farm did to an honest agent on CI: 17.8 us against
    34.1 us, both agents sharing two loaded cores, was a strike; three of them flagged it)."""
    from tunefarm.host.tuning.verify import STRIKE_MIN_GAP_S, judge

    assert judge(20e-6, 25e-6) == (25e-6, "verified")
    assert judge(25e-6, 20e-6) == (25e-6, "verified")  # the second faster: still the slower one counts
    assert judge(17.8e-6, 34.1e-6) == (34.1e-6, "disputed")  # honest noise on shared cores: no strike
    assert judge(1e-9, 300e-6) == (300e-6, "strike")  # the rogue's 1 ns against a real conv
    # Far apart in ratio but not in time (a tiny kernel near the timer's resolution): disputed, no strike.
    assert judge(1e-9, STRIKE_MIN_GAP_S / 2) == (STRIKE_MIN_GAP_S / 2, "disputed")
