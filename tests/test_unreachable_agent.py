"""A job whose only agent cannot be reached stops at once and spends nothing (issue 32, item 7).

The agent is real and listed at a real tracker, but registers an address nobody listens on (``--custom-addr``
127.0.0.3; it binds 127.0.0.1). The job names its target itself, so nothing needs a session before tuning:
before, every candidate of the budget was recorded as failed ("not measured"), batch after batch.
"""
from __future__ import annotations

import json

import yaml

from conftest import run_cli
from tunefarm.core.procs import free_port


def _job(path, name, port, key, trials):
    job = {"name": name, "model": {"source": "builtin", "name": "matmul"},
           "device": {"key": key, "tracker": f"127.0.0.1:{port}"}, "target": {"kind": "llvm", "num-cores": 1},
           "tuning": {"max_trials_global": trials, "num_trials_per_iter": 4, "population_size": 64,
                      "warm_start": False},
           "builder": {"workers": 1, "timeout_sec": 60},
           "runner": {"timeout_sec": 30, "device_wait_sec": 30, "number": 2, "min_repeat_ms": 5},
           "evaluate": {"baselines": [], "require_speedup": False}}
    path.write_text(yaml.safe_dump(job))
    return path


def _records(job_dir) -> list:
    path = job_dir / "database_tuning_record.json"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def test_a_job_whose_only_agent_is_unreachable_stops_at_once_and_spends_nothing(tracker, start_agent, tmp_path):
    host, port = tracker
    rpc_port = free_port(host)
    start_agent(host, port, "nat", tmp_path / "nowhere.log",
                extra_args=("--port", str(rpc_port), "--custom-addr", "127.0.0.3"))
    logs = tmp_path / "logs"
    job = _job(tmp_path / "job.yaml", "nat", port, "nat", 32)
    code, out, took = run_cli(["tune", job, "--logs-dir", logs, "--skip-eval"], tmp_path / "tune.log", 600)
    flat = " ".join(out.split())
    errors = [l for l in out.splitlines() if l.startswith("tunefarm: error:")]
    assert code != 0 and len(errors) == 1, out
    assert "no agent on key 'nat' can be reached from this host" in errors[0] and "nothing was measured" in errors[0], \
        errors[0]
    assert flat.count("unreachable agent") == 1 and "127.0.0.3" in flat, out  # the line said once, named
    assert "Traceback" not in out, out
    assert _records(logs / "nat") == [], "no trial was spent on candidates that never reached a device"
    assert "trial(s) measured" not in flat, out  # it stopped in its first batch, not after the budget

    # The farm keeps serving: with a reachable agent beside the unreachable one, the same job runs and
    # measures everything (the unreachable one is named, not a reason to stop).
    start_agent(host, port, "nat", tmp_path / "reachable.log")
    job = _job(tmp_path / "job2.yaml", "nat2", port, "nat", 4)
    code, out, _ = run_cli(["tune", job, "--logs-dir", logs, "--skip-eval"], tmp_path / "tune2.log", 600)
    flat = " ".join(out.split())
    assert code == 0, out
    assert "this run: 4 trial(s) measured (0 failed)" in flat, out
    assert len(_records(logs / "nat2")) == 4
