"""The farm's cost model (issue 15, tunefarm.host.tuning.farm_model): which jobs teach it, training and loading
it without pickle, refusing damaged or foreign files, and a job that starts from it through the real farm.

The first tests build real MetaSchedule databases (as tests/test_warm_start.py does) and train real XGBoost
models on MetaSchedule's own features; the last tunes two tiny models through a tracker and an agent.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import yaml

from conftest import HOST, run_cli, spawn_agent, start_tracker, wait_listed
from test_warm_start import TARGET, _job_dir, _kernel
from tunefarm.core.procs import free_port, stop_process


def _records(n: int, factors=(1, 2, 4, 8, 16)):
    mod = _kernel(n)
    return [(mod, f, [1e-4 * (1 + i), 1.1e-4 * (1 + i)]) for i, f in enumerate(factors)]


def test_only_trusted_jobs_teach_the_model_and_it_loads_back(tmp_path):
    from tunefarm.host.tuning import farm_model as fm
    from tunefarm.host.tuning.jobdir import VERIFIED

    logs = tmp_path / "logs"
    # 104 records of 21 workloads: past XGBModel's 100 warm-up samples, so the model predicts from its booster.
    good = [r for n in range(16, 176, 8) for r in _records(n)] + _records(200, (1, 2, 4, 8))
    _job_dir(logs, "good", TARGET, good)
    _job_dir(logs, "killed", TARGET, _records(16), last_run="started")
    _job_dir(logs, "failed-too", TARGET, [(_kernel(16), 2, [1e10])])  # a failed candidate only: no time
    _job_dir(logs, "other", {"kind": "llvm", "num-cores": 2}, _records(16))
    rogue = _job_dir(logs, "rogue", TARGET, _records(16))
    with open(rogue.file(VERIFIED), "a") as log:
        log.write(json.dumps({"status": "below_floor", "measured_by": "x:1"}) + "\n")
    unchecked = _job_dir(logs, "unchecked", TARGET, _records(16))
    unchecked.file(VERIFIED).unlink()

    t0 = time.monotonic()
    meta = fm.rebuild(logs, TARGET)
    rebuild_s = time.monotonic() - t0
    assert meta["jobs"] == {"good": 104} and meta["records"] == 104 and meta["workloads"] == 21, meta
    skipped = meta["skipped"]
    assert "did not end" in skipped["killed"] and "impossible or unreproducible" in skipped["rogue"], skipped
    assert "not checked" in skipped["unchecked"] and "other" not in skipped, skipped
    assert meta["key"] == fm.model_key(TARGET)
    # Both stages were timed (each rounded to 0.01 s): features of 104 records and a real XGBoost fit take
    # more than 5 ms, and together they fit inside the rebuild this test timed around the call.
    assert meta["extract_s"] > 0 and meta["train_s"] > 0, meta
    assert meta["extract_s"] + meta["train_s"] <= rebuild_s + 0.01, (meta, rebuild_s)

    t0 = time.monotonic()
    model, loaded, load_s = fm.load(logs, TARGET)
    took = time.monotonic() - t0
    assert loaded == meta and model.data_size == 104 and model.booster is not None and 0 < load_s <= took
    # It predicts for a new candidate of a workload it never saw (features do not depend on the task).
    import tvm
    from tvm.s_tir import meta_schedule as ms

    new = _kernel(24)
    context = ms.TuneContext(mod=new, target=tvm.target.Target(TARGET), num_threads=1)
    cand = ms.MeasureCandidate(tvm.s_tir.Schedule(new), ms.arg_info.ArgInfo.from_prim_func(new["main"]))
    scores = model.predict(context, [cand, cand])
    assert scores.shape == (2,) and np.all(np.isfinite(scores)) and scores[0] == scores[1]  # the booster, not random

    # Nothing pickled on disk: every array loads with allow_pickle=False, the booster is JSON.
    for npz in (fm.model_dir(logs, TARGET) / "features").glob("*.npz"):
        np.load(npz, allow_pickle=False)["rows"]  # pylint: disable=expression-not-assigned
    json.loads((fm.model_dir(logs, TARGET) / fm.BOOSTER).read_text())
    assert [m["key"] for m in fm.list_models(logs)] == [meta["key"]]

    # The job changes: its features are extracted again, the model holds the new records.
    _job_dir(logs, "good", TARGET, _records(400, (2, 4)))
    assert fm.rebuild(logs, TARGET)["records"] == 106


def test_damaged_or_foreign_model_files_are_refused(tmp_path):
    from tunefarm.host.tuning import farm_model as fm

    logs = tmp_path / "logs"
    _job_dir(logs, "good", TARGET, _records(16))
    fm.rebuild(logs, TARGET)
    path = fm.model_dir(logs, TARGET)
    npz = path / "features" / "good.npz"
    good = {k: v for k, v in np.load(npz, allow_pickle=False).items()}

    # An object array (what a pickle needs) is refused by the loader, not unpickled.
    np.savez(npz, **{**good, "group_hashes": np.array([object()], dtype=object)})
    with pytest.raises(ValueError):
        fm.load(logs, TARGET)
    # Arrays that do not fit together.
    np.savez(npz, **{**good, "offsets": good["offsets"][:-1]})
    with pytest.raises(ValueError, match="not a feature set"):
        fm.load(logs, TARGET)
    np.savez(npz, **{**good, "costs": -good["costs"]})
    with pytest.raises(ValueError, match="not a feature set"):
        fm.load(logs, TARGET)
    np.savez(npz, **good)
    fm.load(logs, TARGET)
    (path / fm.BOOSTER).write_text("{not json")
    with pytest.raises(Exception):  # XGBoost's own error for a broken model file
        fm.load(logs, TARGET)
    (path / fm.META).write_text("[]")
    assert fm.available(logs, TARGET) is None and fm.list_models(logs) == []


def _job(path, name: str, model: str, port: int, **tuning) -> None:
    job = {"name": name, "model": {"source": "builtin", "name": model},
           "device": {"key": "cpu", "tracker": f"{HOST}:{port}"}, "target": "from-agent",
           "tuning": {"max_trials_global": 8, "num_trials_per_iter": 4, "population_size": 64, **tuning},
           "evaluate": {"baselines": [], "repeat": 5, "warmup": 1, "require_speedup": False}}
    path.write_text(yaml.safe_dump(job))


def test_a_job_starts_from_the_farm_model_of_its_target(tmp_path):
    port = free_port(HOST)
    tracker = start_tracker(port, tmp_path / "tracker.log")
    agent = spawn_agent(HOST, port, "cpu", tmp_path / "agent.log")
    logs = tmp_path / "logs"
    try:
        wait_listed(agent, HOST, port, "cpu", tmp_path / "agent.log")
        # Before any job: xgb-farm asked for explicitly is a one-line error; unset means cold.
        _job(tmp_path / "first.yaml", "convnet", "convnet", port, cost_model="xgb-farm")
        code, out, _ = run_cli(["tune", tmp_path / "first.yaml", "--logs-dir", logs, "--plan"], tmp_path / "p0.log", 300)
        errors = [l for l in out.splitlines() if l.startswith("tunefarm: error:")]
        assert code != 0 and len(errors) == 1 and "no cost model for this target" in errors[0], out

        _job(tmp_path / "first.yaml", "convnet", "convnet", port)
        code, out, _ = run_cli(["tune", tmp_path / "first.yaml", "--logs-dir", logs, "--skip-eval"],
                               tmp_path / "first.log", 600)
        assert code == 0, out
        assert "cost model: xgb (cold" in out and "farm cost model updated: 8 records of 1 job(s)" in out, out
        code, out, _ = run_cli(["models", "--logs-dir", logs], tmp_path / "models.log")
        assert code == 0 and "8 records" in out and "convnet (8)" in out, out
        from tunefarm.host.tuning import farm_model as fm

        (first_meta,) = fm.list_models(logs)

        # A new model for the same target starts from it; the report says which model, trained on what.
        _job(tmp_path / "second.yaml", "matmul", "matmul", port)
        code, out, _ = run_cli(["tune", tmp_path / "second.yaml", "--logs-dir", logs, "--plan"], tmp_path / "p1.log", 300)
        assert code == 0 and "cost model: the farm's (8 measured records of 1 job(s): convnet" in out, out
        code, out, took = run_cli(["tune", tmp_path / "second.yaml", "--logs-dir", logs], tmp_path / "second.log",
                                  600)
        assert code == 0, out
        report = json.loads((logs / "matmul" / "report.json").read_text())
        used = report["tuning"]["cost_model"]
        assert used["kind"] == "xgb-farm" and used["jobs"] == {"convnet": 8}, used
        # The load was timed (to 1 ms: reading the features and the booster takes tens of ms) inside the command
        # this test timed; the report names the training time the convnet job's update wrote into model.json.
        assert 0 < used["load_s"] <= took and used["train_s"] == first_meta["train_s"] > 0, (used, first_meta)
        assert report["tuning"]["farm_model_update"]["jobs"] == {"convnet": 8, "matmul": 8}, report["tuning"]
        md = (logs / "matmul" / "report.md").read_text()
        assert "the farm's XGBoost model, trained on 8 records of 1 earlier job(s) (convnet" in md, md

        # xgb starts cold whatever the farm has; a damaged model makes a job start cold with a warning.
        # (budget 16: one round of each of convnet's 4 tasks, whatever the warm start seeds; a plan on less fails)
        _job(tmp_path / "cold.yaml", "cold", "convnet", port, cost_model="xgb", max_trials_global=16)
        code, out, _ = run_cli(["tune", tmp_path / "cold.yaml", "--logs-dir", logs, "--plan"], tmp_path / "p2.log", 300)
        assert code == 0 and "cost model: xgb" in out and "the farm's" not in out, out
        (fm.models_root(logs) / used["key"] / fm.BOOSTER).write_text("{broken")
        _job(tmp_path / "third.yaml", "third", "matmul", port, max_trials_global=4)
        code, out, _ = run_cli(["tune", tmp_path / "third.yaml", "--logs-dir", logs, "--skip-eval"],
                               tmp_path / "third.log", 600)
        assert code == 0 and "cannot be loaded" in out and "starting cold" in out, out
    finally:
        stop_process(agent)
        stop_process(tracker)
