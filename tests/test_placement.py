"""Placement by measurement (issue 31, item 3), for real: a job tuned through a tracker and an agent that runs
oneDNN, every operator group oneDNN can run timed on that agent as oneDNN and as TVM's tuned kernel, placed on the
faster, the whole model built all-TVM / all-oneDNN / placed and the fastest correct one handed out; the
per-operator table in the report; placement.json read back by the one call that builds a pulled model.

Skipped with the reason where the oneDNN plugin cannot be built (.ci/run installs libdnnl-dev).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import HOST, ONEDNN_WHY_NOT, listed_agents, run_cli
from tunefarm.core.errors import TunefarmError

pytestmark = pytest.mark.skipif(ONEDNN_WHY_NOT is not None, reason=ONEDNN_WHY_NOT or "")
TUNE_TIMEOUT_S = 600
WHOLE = ("tvm-tuned", "tvm-placed", "tvm-vendor")


def _job(path: Path, port: int, key: str, **extra) -> Path:
    job = {"name": "resblock", "model": {"source": "builtin", "name": "resblock"},
           "device": {"key": key, "tracker": f"{HOST}:{port}"},
           "tuning": {"max_trials_global": 16, "num_trials_per_iter": 4, "population_size": 64},
           "runner": {"timeout_sec": 30, "device_wait_sec": 30, "number": 2, "min_repeat_ms": 5},
           "evaluate": {"warmup": 3, "repeat": 15, "baselines": []}, **extra}
    path.write_text(yaml.safe_dump(job))
    return path


def _resblock_relax():
    from tunefarm.core.jobspec import ModelSpec
    from tunefarm.host.models import load_model, to_relax

    model = load_model(ModelSpec(source="builtin", name="resblock"))
    return model, to_relax(model)


def _run(ex, inputs) -> np.ndarray:
    import tvm
    from tvm import relax

    return relax.VirtualMachine(ex, tvm.cpu())["main"](*[tvm.runtime.tensor(x) for x in inputs]).numpy()


def test_groups_are_placed_by_measurement_and_the_fastest_whole_build_is_handed_out(onednn_cache, tracker,
                                                                                      start_agent, tmp_path):
    cache, _lib, _ = onednn_cache
    env = {"XDG_CACHE_HOME": str(cache)}
    host, port = tracker
    start_agent(host, port, "place", tmp_path / "agent.log", env=env)
    (info,) = listed_agents(host, port, "place")
    logs = tmp_path / "logs"
    job = _job(tmp_path / "job.yaml", port, "place")
    code, out, _ = run_cli(["tune", job, "--logs-dir", logs], tmp_path / "tune.log", TUNE_TIMEOUT_S, env=env)
    assert code == 0, out
    job_dir = logs / "resblock"
    # An agent that runs oneDNN and placement auto: the CPU default layout is NCHWc (channel blocks), said in the plan.
    assert json.loads((job_dir / "job_state.json").read_text())["pipeline"]["layout"] == "NCHWc"
    assert "(the CPU default where the job places groups on a vendor library" in " ".join(out.split()), out
    assert any("conv2d_NCHWc" in t["name"] for t in json.loads((job_dir / "tasks.json").read_text()))
    report = json.loads((job_dir / "report.json").read_text())
    # Before tuning, each group that is exactly one task was timed on oneDNN on the agent (trials go where TVM can
    # still win); a ceded task measured no round after it was ceded but the batch it may have had in flight.
    first = report["tuning"]["vendor_first"]
    tasks = {t["task"]: t for t in report["tasks"]}
    assert sorted(g["composite"] for g in first["groups"]) == ["dnnl.conv2d_bias_relu", "dnnl.conv2d_bias_sum_relu"]
    assert all(g["task"] in tasks and g["vendor_ms"] > 0 for g in first["groups"]), first
    for c in first["ceded"]:
        assert c["tvm_best_ms"] >= first["far"] * c["vendor_ms"] and c["trials"] >= first["min_trials"], c
        assert tasks[c["task"]]["trials"] <= c["trials"] + 4, (c, tasks[c["task"]])
    assert "trials where TVM can still win: 2 task(s) timed on the vendor library" in (job_dir / "report.md").read_text()
    placement = report["placement"]
    assert placement["backends"] == ["onednn"] and placement["not_used"] == [], placement
    groups = placement["groups"]
    # The resblock: conv+bias+relu, then conv+bias+residual+relu; each matched to the job's tuned task.
    assert sorted(g["composite"] for g in groups) == ["dnnl.conv2d_bias_relu", "dnnl.conv2d_bias_sum_relu"], groups
    for g in groups:
        assert g["tvm_record"] and g["count"] == 1, g
        assert g["tvm_numerics"]["ok"] and g["vendor_numerics"]["ok"], g
        assert g["tvm_ms"] > 0 and g["vendor_ms"] > 0, g
        assert g["placed"] == ("onednn" if g["vendor_ms"] < g["tvm_ms"] else "tvm"), g  # the faster, measured
        assert g["agent"] == info.agent_id and g["threads"] == info.threads, g
        assert g["flops"] == 2 * 16 * 16 * 16 * 16 * 9, g
    res = report["results"]
    built = [name for name in WHOLE if name in res]
    assert "tvm-tuned" in built and "tvm-vendor" in built, res.keys()
    same = placement["builds"]["tvm-placed"].get("same_as")
    placed_keys = {g["key"] for g in groups if g["placed"] == "onednn"}
    if same is None:  # a build of its own: exactly the groups that measured faster on oneDNN
        assert set(placement["builds"]["tvm-placed"]["offload"]["onednn"]) == placed_keys
    else:
        assert same == ("tvm-tuned" if not placed_keys else "tvm-vendor"), placement["builds"]
    for name in built:  # every build checked against PyTorch and timed on the same agent, same threads
        assert res[name]["numerics"]["ok"], res[name]
        assert res[name]["where"] == f"agent {info.agent_id}" and res[name]["threads"] == info.threads, res[name]
    timed = {name: res[name]["latency"]["median_ms"] for name in built}
    assert placement["chosen"] == min(timed, key=timed.get) == report["model_handed_out"], (placement, timed)
    assert placement["whole_ms"] == timed
    on_disk = json.loads((job_dir / "placement.json").read_text())
    assert on_disk["chosen"] == placement["chosen"] and on_disk["offload"] == placement["offload"]
    # Each build with oneDNN parts was timed with both idle-spin settings before its row, and its row ran the
    # faster; the chosen build's setting is the environment handed out (mixed: core.threads.MIXED_POOLS).
    from tunefarm.core.threads import MIXED_POOLS

    probed = {n: b["pool_spin"] for n, b in placement["builds"].items() if b.get("vendor_modules")}
    assert "tvm-vendor" in probed, placement["builds"]
    for name, probe in probed.items():
        assert sorted(probe["probe_ms"]) == ["mixed", "stock"] and all(v > 0 for v in probe["probe_ms"].values())
        assert probe["chosen"] == min(probe["probe_ms"], key=probe["probe_ms"].get), probe
        ran = res[name].get("details", {}).get("pool_spin")
        assert ran == (MIXED_POOLS if probe["chosen"] == "mixed" else None), (name, probe, res[name])
    chosen_build = placement["builds"].get(placement["chosen"], {})
    chosen_build = placement["builds"].get(chosen_build.get("same_as"), chosen_build)
    expected_env = MIXED_POOLS if chosen_build.get("pool_spin", {}).get("chosen") == "mixed" else {}
    assert on_disk["environment"] == placement["environment"] == expected_env, (placement, chosen_build)
    md = (job_dir / "report.md").read_text()
    assert "## Placement" in md and f"The job's model is **{placement['chosen']}**" in md, md
    table = [l for l in md.splitlines() if l.startswith("| ") and "dnnl.conv2d" in l]
    assert len(table) == 2 and all(("oneDNN" in l) != ("| TVM |" in l) for l in table), table
    assert "everything else" in md
    assert "tvm-vendor: idle spins probed on the agent before its row, mixed " in md, md

    # The one call that builds a pulled job's model: job_state.json, best/ and placement.json, as pull writes them.
    from tunefarm.core import onednn
    from tunefarm.host.placement.apply import compile_pulled
    from tunefarm.host.placement.build import build_model  # noqa: F401  (the evaluation's own builder)

    pulled = tmp_path / "pulled"
    pulled.mkdir()
    code, out, _ = run_cli(["logs", "best", job_dir, "-o", pulled / "best"], tmp_path / "best.log", 120)
    assert code == 0, out
    (pulled / "database").mkdir()  # where tunefarm pull's bundle has it (host/service/views.py build_bundle)
    shutil.copy(job_dir / "job_state.json", pulled / "database" / "job_state.json")
    shutil.copy(job_dir / "placement.json", pulled / "placement.json")
    from tunefarm.host.placement.apply import environment

    assert environment(pulled) == on_disk["environment"] and environment(tmp_path) == {}
    onednn.load_plugin(_lib, export_env=False)
    model, mod = _resblock_relax()
    reference = model.reference_outputs()[0]
    out = _run(compile_pulled(mod, pulled), model.inputs)
    assert float(np.linalg.norm(out - reference) / np.linalg.norm(reference)) < 1e-4
    # A placement with only the first group offloaded builds a mixed module (oneDNN + TVM's tuned kernel).
    first = {**on_disk, "chosen": "tvm-placed", "offload": {"onednn": [groups[0]["key"]]}}
    (pulled / "placement.json").write_text(json.dumps(first))
    out = _run(compile_pulled(mod, pulled), model.inputs)
    assert float(np.linalg.norm(out - reference) / np.linalg.norm(reference)) < 1e-4

    # Placement off: the same job evaluated again (its budget is spent) places nothing and says so.
    _job(tmp_path / "job.yaml", port, "place", placement={"backends": "off"})
    code, out, _ = run_cli(["tune", job, "--logs-dir", logs], tmp_path / "tune2.log", TUNE_TIMEOUT_S, env=env)
    assert code == 0, out
    report = json.loads((job_dir / "report.json").read_text())
    assert report["placement"]["backends"] == [] and report["model_handed_out"] == "tvm-tuned"
    assert not set(report["results"]) & {"tvm-placed", "tvm-vendor"}, report["results"].keys()
    assert json.loads((job_dir / "placement.json").read_text())["offload"] == {}
    assert "No operator group was placed on a vendor library: placement.backends is off" in (
        job_dir / "report.md").read_text()


@pytest.mark.parametrize("content, message", [
    ("{", "cannot read placement file"),
    ('{"format": 2, "chosen": "tvm-tuned", "offload": {}}', "not a placement file of format 1"),
    ('{"format": 1, "chosen": "rm -rf /", "offload": {}}', "'chosen' must be one of"),
    ('{"format": 1, "chosen": "tvm-placed", "offload": {"evil": ["k"]}}', "'offload' must map backends"),
    ('{"format": 1, "chosen": "tvm-placed", "offload": {"onednn": "k"}}', "'offload' must map backends"),
    ('{"format": 1, "chosen": "tvm-placed", "offload": {"onednn": [1]}}', "'offload' must map backends"),
    ('[]', "not a placement file"),
    ('{"format": 1, "chosen": "tvm-vendor", "offload": {}, "environment": {"LD_PRELOAD": "/tmp/x.so"}}',
     "'environment' may only set"),
    ('{"format": 1, "chosen": "tvm-vendor", "offload": {}, "environment": {"GOMP_SPINCOUNT": "1; rm -rf /"}}',
     "'environment' may only set"),
    ('{"format": 1, "chosen": "tvm-vendor", "offload": {}, "environment": ["GOMP_SPINCOUNT"]}',
     "'environment' may only set"),
])
def test_a_damaged_or_hostile_placement_file_is_a_one_line_error(tmp_path, content, message):
    from tunefarm.host.placement import result

    path = tmp_path / "placement.json"
    path.write_text(content)
    with pytest.raises(TunefarmError) as info:
        result.read(path)
    assert message in str(info.value) and "\n" not in str(info.value)
    path.write_bytes(b"x" * (result.MAX_BYTES + 1))
    with pytest.raises(TunefarmError, match="larger than"):
        result.read(path)


def test_a_group_tvm_runs_fused_is_counted_in_the_rest_not_by_its_time_alone():
    """ResNet-50's Linear took 11.6 ms timed alone without a record of its own and 0.34 ms as the model's tuned
    fused kernel: the profile gives it no share or GFLOP/s of its own and leaves its time in the rest."""
    from tunefarm.host.reports.placement import profile_rows

    groups = [{"key": "conv", "backend": "dnnl", "count": 2, "flops": 2e8, "tvm_ms": 3.0, "vendor_ms": 1.0,
               "tvm_record": True},
              {"key": "fc", "backend": "dnnl", "count": 1, "flops": 4e6, "tvm_ms": 11.6, "vendor_ms": 0.2,
               "tvm_record": False}]
    rows = profile_rows({"chosen": "tvm-placed", "offload": {"dnnl": ["conv"]}, "whole_ms": {"tvm-placed": 5.0},
                         "groups": groups})
    conv, fc, rest = rows
    assert conv["backend"] == "dnnl" and conv["spent_ms"] == 2.0 and conv["share"] == 0.4 and conv["gflops"] == 200.0
    assert fc["backend"] == "tvm" and fc["ms"] == 11.6 and fc["spent_ms"] is None and fc["share"] is None
    assert fc["gflops"] is None
    assert rest["rest"] and rest["spent_ms"] == 3.0 and rest["share"] == 0.6


def test_a_group_whose_task_is_not_tuned_yet_is_told_from_one_tvm_fuses_otherwise():
    """A group whose TVM kernel is one of the job's tasks (tasks.json's structural-hash keys) runs untuned in the
    model when that task has no record yet, so it is placed by time; a group whose kernel is no task of the job
    (TVM fuses it otherwise in the model) is not."""
    import tvm
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    from tunefarm.host.placement.measure import _untuned_task, group_modules
    from tunefarm.host.placement.vendors import VENDORS
    from tunefarm.host.tuning.pipeline import Pipeline

    _model, mod = _resblock_relax()
    target = tvm.target.Target({"kind": "llvm", "num-cores": 2})
    pipeline = Pipeline(fold_batchnorm=True)
    graph = pipeline.graph(mod, target)
    keys = {str(tvm_ffi.structural_hash(t.dispatched[0]))
            for t in ms.relax_integration.extract_tasks(pipeline.lower(graph, target), target)}
    groups = group_modules(graph, VENDORS["onednn"])
    assert len(groups) == 2 and keys, (groups, keys)
    assert all(_untuned_task(gm, target, pipeline, keys) for gm in groups)
    assert not any(_untuned_task(gm, target, pipeline, set()) for gm in groups)
    assert not any(_untuned_task(gm, target, pipeline, {"0"}) for gm in groups)
