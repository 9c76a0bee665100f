"""Tuning through the farm, for real: tracker + agents on loopback, tiny models, MetaSchedule + XGBoost.

Every job runs as the ``tunefarm tune`` command a user types. Budgets are a handful of trials.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import (HOST, agent_id_of, apply_best_with_plain_tvm, listed_agents, run_cli, spawn_agent, start_agents,
                      start_tracker, wait_listed)
from tunefarm.core.procs import free_port, kill_hard, start_tunefarm, stop_process, wait_until

TUNE_TIMEOUT_S = 600


def write_job(path: Path, name: str, port: int, key: str, model: dict, trials: int = 12, per_iter: int = 4,
              **extra) -> Path:
    job = {"name": name, "model": model, "device": {"key": key, "tracker": f"{HOST}:{port}"},
           "target": "from-agent",
           "tuning": {"max_trials_global": trials, "num_trials_per_iter": per_iter, "population_size": 64},
           "builder": {"workers": 2, "timeout_sec": 60},
           "runner": {"timeout_sec": 30, "device_wait_sec": 30, "number": 2, "min_repeat_ms": 5},
           "evaluate": {"warmup": 3, "repeat": 15}}
    for section, values in extra.items():
        if isinstance(values, dict) and isinstance(job.get(section), dict):
            job[section].update(values)
        else:
            job[section] = values
    path.write_text(yaml.safe_dump(job))
    return path


def records(job_dir: Path) -> list[list]:
    text = (job_dir / "database_tuning_record.json").read_text().strip()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_tune_convnet_end_to_end_then_resume(cpu_farm, tmp_path):
    logs = tmp_path / "logs"
    job = write_job(tmp_path / "job.yaml", "convnet", cpu_farm["port"], "cpu",
                    {"source": "builtin", "name": "convnet"}, trials=16, per_iter=4)
    code, out, _ = run_cli(["tune", job, "--logs-dir", logs], tmp_path / "tune1.log", TUNE_TIMEOUT_S)
    assert code == 0, out
    job_dir = logs / "convnet"
    report = json.loads((job_dir / "report.json").read_text())
    assert report["ok"], report["problems"]
    res = report["results"]
    # The tuned build runs tuned kernels: every TIR function carries a schedule, and it is faster.
    assert report["schedules"]["tuned"] == report["schedules"]["tir_functions"] > 0
    assert report["schedules"]["tasks_without_record"] == []
    assert res["tvm-tuned"]["latency"]["median_ms"] < res["tvm-untuned"]["latency"]["median_ms"]
    assert res["tvm-tuned"]["numerics"]["ok"] and res["tvm-tuned"]["numerics"]["max_abs_err"] < 1e-3
    assert res["tvm-tuned"]["where"] == f"agent {agent_id_of(cpu_farm['agent'])}"
    for base in ("torch", "onnxruntime"):  # a local agent: baselines run and are checked
        assert res[base]["numerics"]["ok"], res[base]
        assert res[base]["latency"]["samples"] >= 5
    (info,) = listed_agents(HOST, cpu_farm["port"], "cpu")
    for name in ("tvm-tuned", "tvm-untuned", "torch", "onnxruntime"):  # every row on the agent, its threads and precision
        assert res[name]["where"] == f"agent {agent_id_of(cpu_farm['agent'])}", res[name]
        assert res[name]["threads"] == info.threads and res[name]["precision"] == "fp32", res[name]
    assert res["tvm-tuned"]["latency"]["timer"] == "time_evaluator" and res["torch"]["latency"]["timer"] == "wall_clock"
    lat = res["tvm-tuned"]["latency"]
    assert lat["p99_ms"] >= lat["p90_ms"] >= lat["median_ms"] >= lat["min_ms"] > 0
    assert report["tuning"]["per_agent"] == {agent_id_of(cpu_farm["agent"]): 16}
    assert (report["tuning"]["trials_this_run"], report["tuning"]["seeded_records"]) == (16, 0)
    first = records(job_dir)
    assert len(first) == 16
    assert (job_dir / "report.md").read_text().startswith("# tunefarm report: convnet")
    # Placement 'auto' (the default) with an agent that has no oneDNN plugin (the tests' caches are empty): nothing
    # placed, the reason said, and the job's model is the all-TVM build (tests/test_placement.py: with the plugin).
    (why,) = report["placement"]["not_used"]
    assert report["placement"]["backends"] == [] and why.startswith("onednn: ") and "plugin" in why, why
    assert report["model_handed_out"] == "tvm-tuned" and not {"tvm-vendor", "tvm-placed"} & set(res)
    assert json.loads((job_dir / "placement.json").read_text())["offload"] == {}
    assert json.loads((job_dir / "job_state.json").read_text())["pipeline"]["layout"] == "NCHW"  # no vendor: NCHW
    assert "16 trials measured by this job" in (job_dir / "report.md").read_text()
    assert len((job_dir / "progress.jsonl").read_text().splitlines()) == 4

    # Same job again: the budget is spent; nothing is measured, nothing is lost.
    code, out, _ = run_cli(["tune", job, "--logs-dir", logs, "--skip-eval"], tmp_path / "tune2.log", TUNE_TIMEOUT_S)
    assert code == 0, out
    assert "already measured" in out and "nothing left to tune" in out
    assert records(job_dir) == first

    # A larger budget resumes: earlier records are kept, and a candidate met again is not re-measured
    # (its record repeats the earlier run_secs exactly instead of a fresh, different timing).
    write_job(tmp_path / "job.yaml", "convnet", cpu_farm["port"], "cpu", {"source": "builtin", "name": "convnet"},
              trials=24, per_iter=4)
    code, out, _ = run_cli(["tune", job, "--logs-dir", logs, "--skip-eval"], tmp_path / "tune3.log", TUNE_TIMEOUT_S)
    assert code == 0, out
    after = records(job_dir)
    assert after[:16] == first and len(after) == 24
    earlier = {(r[0], json.dumps(r[1][0])): r[1][1] for r in first}
    for rec in after[16:]:
        key = (rec[0], json.dumps(rec[1][0]))
        if key in earlier:
            assert rec[1][1] == earlier[key]
    # Cache hits are not recorded again (and do not count: 8 new trials): every candidate is in the database once.
    assert len({(r[0], json.dumps(r[1][0])) for r in after}) == 24
    # The resumed run's "best est." sums every task of the model from its first batch on.
    resumed = [json.loads(line) for line in (job_dir / "progress.jsonl").read_text().splitlines()][4:]
    assert resumed and all(e["estimated_ms"] is not None for e in resumed) and resumed[-1]["trials"] == 24


def test_best_logs_apply_with_plain_tvm(cpu_farm, tmp_path):
    """`tunefarm logs best` writes a JSONDatabase that stock TVM applies to its own fused module."""
    logs = tmp_path / "logs"
    job = write_job(tmp_path / "job.yaml", "mm", cpu_farm["port"], "cpu", {"source": "builtin", "name": "matmul"},
                    trials=8, per_iter=4)
    code, out, _ = run_cli(["tune", job, "--logs-dir", logs, "--skip-eval"], tmp_path / "tune.log", TUNE_TIMEOUT_S)
    assert code == 0, out
    code, out, _ = run_cli(["logs", "best", logs / "mm", "-o", tmp_path / "best"], tmp_path / "best.log", 120)
    assert code == 0, out
    code, shown, _ = run_cli(["logs", "show", logs / "mm"], tmp_path / "show.log", 120)
    assert code == 0 and "estimated end-to-end" in shown, shown

    # Plain TVM from here on: no tunefarm code.
    apply_best_with_plain_tvm(tmp_path / "best", json.loads((logs / "mm" / "job_state.json").read_text()))


def test_folded_batchnorm_and_prepacked_weights_tune_and_check(cpu_farm, tmp_path):
    """Both layout options on a ResNet block: BatchNorm folded into the conv (no BatchNorm arithmetic left in any
    task), each kernel's weights prepacked at compile time, numerics checked; a resumed run keeps the pipeline
    its directory was tuned with and refuses a job file that asks for another."""
    from tunefarm.host.models import load_model, to_relax
    from tunefarm.core.jobspec import ModelSpec
    from tunefarm.host.tuning.jobdir import JobDir
    from tunefarm.host.tuning.pipeline import apply_records

    logs = tmp_path / "logs"
    job = write_job(tmp_path / "job.yaml", "block", cpu_farm["port"], "cpu", {"source": "builtin", "name": "resblock"},
                    trials=8, per_iter=4, evaluate={"baselines": []}, tuning={"weight_prepack": True})
    code, out, _ = run_cli(["tune", job, "--logs-dir", logs], tmp_path / "tune1.log", TUNE_TIMEOUT_S)
    assert code == 0, out
    report = json.loads((logs / "block" / "report.json").read_text())
    assert report["ok"], report["problems"]
    assert report["tuning"]["pipeline"] == {"fold_batchnorm": True, "weight_prepack": True, "precision": "fp32",
                                            "layout": "NCHW"}
    names = [t["task"] for t in report["tasks"]]
    assert len(names) == 2 and all("conv2d" in n and "divide" not in n and "subtract" not in n for n in names), names
    assert report["schedules"]["tuned"] == report["schedules"]["tir_functions"] == 2
    tuned = report["results"]["tvm-tuned"]
    assert tuned["numerics"]["ok"] and tuned["numerics"]["max_abs_err"] < 1e-3, tuned
    # What the evaluation compiled: each tuned kernel takes weights packed once, on the constants.
    job_dir = JobDir(logs / "block")
    import tvm
    target = tvm.target.Target(job_dir.read_state()["target"])
    mod = job_dir.pipeline().fuse(to_relax(load_model(ModelSpec(source="builtin", name="resblock"))), target)
    applied, scheduled, _ = apply_records(mod, target, job_dir.open_database())
    kernels = sorted(gv.name_hint for gv, f in applied.functions.items() if isinstance(f, tvm.tirx.PrimFunc))
    assert len(scheduled) == 2 and sum(n.endswith("_prepacked") for n in kernels) == 2, kernels
    main_text = applied["main"].script()
    assert "_weight_prepack" not in main_text and main_text.count("_prepacked") == 2, main_text

    # Resume: the directory's pipeline wins; a job file that asks for another one is refused in one line.
    other = write_job(tmp_path / "job2.yaml", "block", cpu_farm["port"], "cpu",
                      {"source": "builtin", "name": "resblock"},
                      trials=12, per_iter=4, evaluate={"baselines": []},
                      tuning={"fold_batchnorm": False, "weight_prepack": True})
    code, out, _ = run_cli(["tune", other, "--logs-dir", logs, "--skip-eval"], tmp_path / "tune2.log", TUNE_TIMEOUT_S)
    assert code != 0 and "was tuned with tuning.fold_batchnorm: true" in out, out


def test_nhwc_layout_tunes_through_the_farm_and_checks(cpu_farm, tmp_path):
    """tuning.layout NHWC on the CPU: the convnet's convs tuned in NHWC (one transpose of the input in front of
    them), every TIR function tuned, the tuned build checked against PyTorch; the layout is recorded in
    job_state.json and a resume that asks for NCHW is refused."""
    logs = tmp_path / "logs"
    model = {"source": "builtin", "name": "convnet"}
    job = write_job(tmp_path / "job.yaml", "nhwc", cpu_farm["port"], "cpu", model, trials=20, per_iter=4,
                    evaluate={"baselines": []}, tuning={"layout": "NHWC"})
    code, out, _ = run_cli(["tune", job, "--logs-dir", logs], tmp_path / "tune.log", TUNE_TIMEOUT_S)
    assert code == 0, out
    report = json.loads((logs / "nhwc" / "report.json").read_text())
    assert report["ok"], report["problems"]
    assert report["tuning"]["pipeline"]["layout"] == "NHWC"
    assert json.loads((logs / "nhwc" / "job_state.json").read_text())["pipeline"]["layout"] == "NHWC"
    names = sorted(t["task"] for t in report["tasks"])
    assert names == ["fused_conv2d1_add_relu", "fused_conv2d_add_relu", "fused_matmul_add1", "mean", "transpose"]
    assert report["schedules"]["tuned"] == report["schedules"]["tir_functions"] == 5
    tuned = report["results"]["tvm-tuned"]
    assert tuned["numerics"]["ok"] and tuned["numerics"]["max_abs_err"] < 1e-3, tuned

    other = write_job(tmp_path / "job2.yaml", "nhwc", cpu_farm["port"], "cpu", model, trials=24, per_iter=4,
                      tuning={"layout": "NCHW"})
    code, out, _ = run_cli(["tune", other, "--logs-dir", logs, "--skip-eval"], tmp_path / "tune2.log", TUNE_TIMEOUT_S)
    assert code != 0 and "was tuned with tuning.layout: NHWC" in out, out


def test_nchwc_layout_tunes_channel_blocked_convs_through_the_farm_and_checks(cpu_farm, tmp_path):
    """tuning.layout NCHWc on the CPU: convs whose input channels fill a vector block run in NCHW{b}c through TOPI's
    conv2d_NCHWc (the first conv, 3 input channels, stays NCHW), layout transforms only around the run of blocked
    convs; every TIR function tuned and the build checked against PyTorch; the block is one vector of the target."""
    from tunefarm.host.tuning.pipeline import channel_block

    logs = tmp_path / "logs"
    job = write_job(tmp_path / "job.yaml", "nchwc", cpu_farm["port"], "cpu", {"source": "builtin", "name": "convnet"},
                    trials=24, per_iter=4, evaluate={"baselines": []}, tuning={"layout": "NCHWc"})
    code, out, _ = run_cli(["tune", job, "--logs-dir", logs], tmp_path / "tune.log", TUNE_TIMEOUT_S)
    assert code == 0, out
    report = json.loads((logs / "nchwc" / "report.json").read_text())
    assert report["ok"], report["problems"]
    assert report["tuning"]["pipeline"]["layout"] == "NCHWc"
    names = sorted(t["task"] for t in report["tasks"])
    assert names == ["fused_conv2d_NCHWc_add1_relu1", "fused_conv2d_add_relu", "fused_matmul_add2", "mean",
                     "te_layout_transform", "te_layout_transform1"], names
    assert report["schedules"]["tuned"] == report["schedules"]["tir_functions"] == 6
    tuned = report["results"]["tvm-tuned"]
    assert tuned["numerics"]["ok"] and tuned["numerics"]["rel_l2_err"] < 1e-5, tuned
    import tvm

    assert channel_block(tvm.target.Target(report["target"])) in (8, 16)
    assert "convs in channel blocks of one fp32 vector" in (logs / "nchwc" / "report.md").read_text()


def test_onnx_model_checked_against_onnxruntime(cpu_farm, tmp_path):
    import torch

    from tunefarm.host.models import BUILTIN_MODELS

    torch.manual_seed(0)
    factory, shape = BUILTIN_MODELS["convnet"]
    onnx_path = tmp_path / "convnet.onnx"
    torch.onnx.export(factory().eval(), (torch.randn(*shape),), str(onnx_path), input_names=["x"], dynamo=False)
    job = write_job(tmp_path / "job.yaml", "convnet-onnx", cpu_farm["port"], "cpu",
                    {"source": "onnx", "path": "convnet.onnx"}, trials=16, per_iter=4,
                    evaluate={"baselines": ["onnxruntime"]})
    code, out, _ = run_cli(["tune", job, "--logs-dir", tmp_path / "logs"], tmp_path / "tune.log", TUNE_TIMEOUT_S)
    assert code == 0, out
    report = json.loads((tmp_path / "logs" / "convnet-onnx" / "report.json").read_text())
    assert report["reference"] == "ONNX Runtime"
    assert report["results"]["tvm-tuned"]["numerics"]["ok"]
    assert report["results"]["onnxruntime"]["numerics"]["max_abs_err"] == 0.0


@pytest.mark.parametrize("model, message", [
    ({"source": "torchvision", "name": "resnet1800"}, "unknown torchvision model 'resnet1800'"),
    ({"source": "builtin", "name": "nope"}, "unknown builtin model 'nope'"),
    ({"source": "onnx", "path": "missing.onnx"}, "ONNX model file not found"),
])
def test_bad_model_is_one_line_error(cpu_farm, tmp_path, model, message):
    job = write_job(tmp_path / "job.yaml", "bad", cpu_farm["port"], "cpu", model)
    code, out, took = run_cli(["tune", job, "--logs-dir", tmp_path / "logs"], tmp_path / "out.log", 120)
    assert code == 2
    errors = [l for l in out.splitlines() if l.startswith("tunefarm: error:")]
    assert len(errors) == 1 and message in errors[0], out
    assert "Traceback" not in out
    assert not (tmp_path / "logs" / "bad").exists()  # a failed job leaves no empty job directory


def test_missing_model_file_is_said_before_waiting_for_an_agent(cpu_farm, tmp_path):
    """Issue 12: a missing ONNX file on a key no agent serves fails at once, not after the device wait."""
    job = write_job(tmp_path / "job.yaml", "nofile", cpu_farm["port"], "nobody-here",
                    {"source": "onnx", "path": "missing.onnx"}, runner={"device_wait_sec": 600})
    code, out, _ = run_cli(["tune", job, "--logs-dir", tmp_path / "logs"], tmp_path / "out.log", 300)
    assert code == 2 and "ONNX model file not found" in out, out
    assert "waiting for an agent" not in out, out


def test_no_agent_for_key_waits_visibly_then_fails(cpu_farm, tmp_path):
    job = write_job(tmp_path / "job.yaml", "nokey", cpu_farm["port"], "gpu-nobody",
                    {"source": "builtin", "name": "matmul"}, runner={"device_wait_sec": 4})
    code, out, took = run_cli(["tune", job, "--logs-dir", tmp_path / "logs"], tmp_path / "out.log", 120)
    assert code == 2, out
    assert "waiting for an agent on key 'gpu-nobody'" in out
    assert "tunefarm: error: no agent serves key 'gpu-nobody'" in out
    assert took < 60
    assert not (tmp_path / "logs" / "nokey").exists()


def test_tracker_unreachable_is_one_line_error(tmp_path):
    job = write_job(tmp_path / "job.yaml", "down", free_port(HOST), "cpu", {"source": "builtin", "name": "matmul"})
    code, out, took = run_cli(["tune", job, "--logs-dir", tmp_path / "logs"], tmp_path / "out.log", 120)
    assert code == 2
    assert "tunefarm: error:" in out and "tracker" in out and "Traceback" not in out
    assert took < 30
    assert not (tmp_path / "logs" / "down").exists()


def _wait_progress(job_dir: Path, lines: int, proc, timeout=300):
    def ready():
        if proc.poll() is not None:
            return True
        path = job_dir / "progress.jsonl"
        return path.exists() and len(path.read_text().splitlines()) >= lines
    wait_until(ready, timeout, interval=0.2, what="tuning progress")


# slow (make test-all): ~120 s; the default suite keeps batches spread over several agents and an agent lost
# mid-batch in tests/test_multihost.py (eight agents on one key; a pulled cable), where root and ip netns exist.
@pytest.mark.slow
def test_two_agents_on_one_key_are_both_used_and_a_killed_one_is_survived(agent_pair, tmp_path):
    port, agents = agent_pair
    job_proc = None
    try:
        # Phase 1: both agents measure the job's batches.
        job = write_job(tmp_path / "job.yaml", "pair", port, "pair", {"source": "builtin", "name": "convnet"},
                        trials=16, per_iter=4, evaluate={"baselines": []})
        code, out, _ = run_cli(["tune", job, "--logs-dir", tmp_path / "logs"], tmp_path / "tune1.log",
                               TUNE_TIMEOUT_S)
        assert code == 0, out
        report = json.loads((tmp_path / "logs" / "pair" / "report.json").read_text())
        per_agent = report["tuning"]["per_agent"]
        assert set(per_agent) == {agent_id_of(a) for a in agents}, per_agent
        assert all(n > 0 for n in per_agent.values())

        # Phase 2: kill one agent (kill -9) while a longer job runs; the job finishes on the other.
        write_job(tmp_path / "job2.yaml", "pair2", port, "pair", {"source": "builtin", "name": "convnet"},
                  trials=24, per_iter=4, evaluate={"baselines": []}, tuning={"warm_start": False})
        job_proc = start_tunefarm(["tune", tmp_path / "job2.yaml", "--logs-dir", tmp_path / "logs"],
                                  tmp_path / "tune2.log")
        _wait_progress(tmp_path / "logs" / "pair2", 1, job_proc)
        kill_hard(agents[0])
        code = job_proc.wait(TUNE_TIMEOUT_S)
        out = (tmp_path / "tune2.log").read_text()
        assert code == 0, out
        assert len(records(tmp_path / "logs" / "pair2")) == 24
        report = json.loads((tmp_path / "logs" / "pair2" / "report.json").read_text())
        assert report["ok"]
        assert report["results"]["tvm-tuned"]["where"] == f"agent {agent_id_of(agents[1])}"
        # The lost agent is said on the console and in report.md, with what each agent measured.
        lost = agent_id_of(agents[0])
        assert f"agent {lost} on key 'pair' is gone" in " ".join(out.split())
        assert list(report["tuning"]["agents_lost"]) == [lost]
        md = (tmp_path / "logs" / "pair2" / "report.md").read_text()
        per_agent = report["tuning"]["per_agent"]
        assert f"| {lost} | {per_agent[lost]} | - | lost during the run |" in md
        assert f"| {agent_id_of(agents[1])} | {per_agent[agent_id_of(agents[1])]} | - | - |" in md
    finally:
        if job_proc is not None:
            stop_process(job_proc)


# slow (make test-all): ~75 s; the default suite keeps a job that loses its agents and goes on when they are back in
# tests/test_multihost.py (a pulled cable, a tracker restart), where root and ip netns exist.
@pytest.mark.slow
def test_job_waits_for_a_lost_agent_to_return(tmp_path):
    """The only agent dies mid-job; the job waits (visibly) and goes on when an agent joins again."""
    port = free_port(HOST)
    tracker = start_tracker(port, tmp_path / "tracker.log")
    agent = spawn_agent(HOST, port, "solo", tmp_path / "agent.log")
    job_proc = None
    replacement = None
    try:
        wait_listed(agent, HOST, port, "solo", tmp_path / "agent.log")
        write_job(tmp_path / "job.yaml", "solo", port, "solo", {"source": "builtin", "name": "convnet"},
                  trials=32, per_iter=4, runner={"device_wait_sec": 240}, evaluate={"baselines": []})
        job_proc = start_tunefarm(["tune", tmp_path / "job.yaml", "--logs-dir", tmp_path / "logs"],
                                  tmp_path / "tune.log")
        _wait_progress(tmp_path / "logs" / "solo", 1, job_proc)
        kill_hard(agent)
        wait_until(lambda: "waiting for an agent on key 'solo'" in (tmp_path / "tune.log").read_text()
                   or job_proc.poll() is not None, 240, what="the job to wait for an agent")
        assert job_proc.poll() is None, (tmp_path / "tune.log").read_text()
        replacement = spawn_agent(HOST, port, "solo", tmp_path / "agent2.log")
        code = job_proc.wait(TUNE_TIMEOUT_S)
        assert code == 0, (tmp_path / "tune.log").read_text()
        assert len(records(tmp_path / "logs" / "solo")) == 32
        assert json.loads((tmp_path / "logs" / "solo" / "report.json").read_text())["ok"]
    finally:
        for proc in (job_proc, replacement, agent):
            if proc is not None:
                stop_process(proc)
        stop_process(tracker)


def test_candidates_built_on_agents_of_a_build_key(cpu_farm, tmp_path):
    """builder.key: the agents of that key compile the candidates; the measuring key runs them."""
    builders = start_agents(HOST, cpu_farm["port"], "build", [tmp_path / f"build{i}.log" for i in range(2)])
    try:
        job = write_job(tmp_path / "job.yaml", "remote-build", cpu_farm["port"], "cpu",
                        {"source": "builtin", "name": "convnet"}, trials=16, per_iter=4,
                        builder={"key": "build"}, evaluate={"baselines": []})
        code, out, _ = run_cli(["tune", job, "--logs-dir", tmp_path / "logs"], tmp_path / "tune.log", TUNE_TIMEOUT_S)
        assert code == 0, out
        report = json.loads((tmp_path / "logs" / "remote-build" / "report.json").read_text())
        built = report["tuning"]["built_on_agents"]
        assert set(built) == {agent_id_of(p) for p in builders}, built
        # Every candidate handed to the build key is counted once: built there, or failed to build.
        tn = report["tuning"]
        assert sum(built.values()) + sum(tn["build_failures"].values()) == tn["trials_this_run"], tn
        assert report["ok"] and report["schedules"]["tuned"] == report["schedules"]["tir_functions"]
    finally:
        for proc in builders:
            stop_process(proc)


def test_warm_start_seeds_a_new_job_from_an_earlier_one(cpu_farm, tmp_path):
    logs = tmp_path / "logs"
    model = {"source": "builtin", "name": "convnet"}
    job_a = write_job(tmp_path / "a.yaml", "cold", cpu_farm["port"], "cpu", model, trials=16, per_iter=4)
    code, out, _ = run_cli(["tune", job_a, "--logs-dir", logs, "--skip-eval"], tmp_path / "a.log", TUNE_TIMEOUT_S)
    assert code == 0, out
    job_b = write_job(tmp_path / "b.yaml", "warm", cpu_farm["port"], "cpu", model, trials=8, per_iter=4,
                      tuning={"warm_start_top_k": 2})
    code, out, _ = run_cli(["tune", job_b, "--logs-dir", logs, "--skip-eval"], tmp_path / "b.log", TUNE_TIMEOUT_S)
    assert code == 0, out
    state = json.loads((logs / "warm" / "job_state.json").read_text())
    imported = state["warm_start"]
    assert imported["sources"] == ["cold"] and imported["records"] > 0
    assert "warm start:" in out
    # Imported records do not count against the budget: 8 new trials on top of them.
    assert len(records(logs / "warm")) == imported["records"] + 8
    # ... nor are they recorded again when the search proposes them (cache hits): each candidate once.
    assert len({(r[0], json.dumps(r[1][0])) for r in records(logs / "warm")}) == imported["records"] + 8
    assert "this run: 8 trial(s) measured" in " ".join(out.split())
    from tunefarm.host.tuning.logs import load_tasks, open_database, task_rows
    cold = {r["task"]: r["best_us"] for r in task_rows(open_database(logs / "cold"), load_tasks(logs / "cold"))}
    warm = {r["task"]: r["best_us"] for r in task_rows(open_database(logs / "warm"), load_tasks(logs / "warm"))}
    assert all(warm[t] is not None for t in warm)
    assert all(warm[t] <= cold[t] for t in cold if cold[t] is not None)
    # The per-task table keeps seeded records apart from the job's own trials.
    rows = task_rows(open_database(logs / "warm"), load_tasks(logs / "warm"))
    assert sum(r["seeded"] for r in rows) == imported["records"] and sum(r["trials"] for r in rows) == 8


def test_the_stop_hook_ends_tuning_cleanly_and_keeps_the_records(cpu_farm, tmp_path):
    """tune_job(..., should_stop=...) is asked after each measured batch; True ends the run, no error."""
    from tunefarm.core.jobspec import load_job
    from tunefarm.host.tuning.job import tune_job

    job = load_job(write_job(tmp_path / "job.yaml", "stop", cpu_farm["port"], "cpu",
                             {"source": "builtin", "name": "matmul"}, trials=40, per_iter=4))
    seen = []

    def should_stop(progress) -> bool:
        seen.append((progress.trials, dict(progress.best), progress.t0))
        return progress.trials >= 4

    from rich.console import Console

    from tunefarm.host.console import ConsoleEvents

    with (tmp_path / "console.txt").open("w") as out:
        result = tune_job(job, tmp_path / "logs", events=ConsoleEvents(Console(file=out)), should_stop=should_stop)
    assert result.stopped and result.measured == 4 and len(seen) == 1
    trials, best, t0 = seen[0]
    assert trials == 4 and list(best) == [0] and t0 <= time.time()
    assert len(records(tmp_path / "logs" / "stop")) == 4  # what was measured is kept
    assert "stopping: the caller's stop hook ended tuning after 4 trials" in (tmp_path / "console.txt").read_text()


def test_a_deadline_ends_tuning_even_before_any_batch_is_joined(cpu_farm, tmp_path):
    """tune_job(..., stop_at=T): from T no new candidates are made, whether or not MetaSchedule has joined a
    batch (it joins none before its first round over every task is out). A deadline already past ends the run
    after what was in flight; nothing measured is lost and the run is not an error."""
    from rich.console import Console

    from tunefarm.core.jobspec import load_job
    from tunefarm.host.console import ConsoleEvents
    from tunefarm.host.tuning.job import tune_job

    job = load_job(write_job(tmp_path / "job.yaml", "deadline", cpu_farm["port"], "cpu",
                             {"source": "builtin", "name": "convnet"}, trials=64, per_iter=4))
    with (tmp_path / "console.txt").open("w") as out:
        result = tune_job(job, tmp_path / "logs", events=ConsoleEvents(Console(file=out)), stop_at=time.time())
    text = (tmp_path / "console.txt").read_text()
    assert result.stopped and "stopping: the deadline ended tuning" in text, text
    assert result.measured < 64 and len(records(tmp_path / "logs" / "deadline")) == result.measured


def test_tune_started_with_sigint_ignored_still_stops_on_ctrl_c(cpu_farm, tmp_path):
    """A background job of a non-interactive shell starts with SIGINT ignored; tune takes it back."""
    import signal

    job = write_job(tmp_path / "job.yaml", "waits", cpu_farm["port"], "nobody-serves-this",
                    {"source": "builtin", "name": "matmul"}, runner={"device_wait_sec": 120})
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the child, as from such a shell
    try:
        proc = start_tunefarm(["tune", job, "--logs-dir", tmp_path / "logs"], tmp_path / "tune.log")
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        wait_until(lambda: "waiting for an agent" in (tmp_path / "tune.log").read_text() or proc.poll() is not None,
                   60, what="tune to wait for an agent")
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 130, (tmp_path / "tune.log").read_text()
    finally:
        stop_process(proc)
    assert "tunefarm: interrupted" in (tmp_path / "tune.log").read_text()
    assert not (tmp_path / "logs" / "waits").exists()
