"""``tunefarm compare`` for real: a tracker and a local agent on loopback, every row through an RPC session.

The default test tunes the builtin convnet for a few trials (as tests/test_tuning.py does), then runs
configs/compare/smoke.yaml against it. The ResNet-18 + ResNet-50 run (each tuned for a few trials first, then
configs/compare/seed-resnet.yaml) is marked ``slow``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import HOST, agent_id_of, listed_agents, run_cli
from tunefarm.core.comparespec import compare_from_dict
from tunefarm.core.errors import TunefarmError
from tunefarm.core.procs import free_port, stop_process, wait_until
from tunefarm.core.stats import MIN_SAMPLES
from tunefarm.core.wire import RUNNER_RUN_FUNC

REPO = Path(__file__).resolve().parents[1]
TUNE_TIMEOUT_S = 600
COMPARE_TIMEOUT_S = 600


FARM_OPEN_KEYS = ("stock",)  # cpu_farm (tests/conftest.py): its tracker admits stock TVM servers on key 'stock'


def _smoke_config(path: Path, port: int, logs: Path, **changes) -> Path:
    cfg = yaml.safe_load((REPO / "configs" / "compare" / "smoke.yaml").read_text())
    cfg["tracker"] = f"{HOST}:{port}"
    for row in cfg["rows"]:
        if row.get("logs"):
            row["logs"] = str(logs / "{model}")
    cfg.update(changes)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _assert_real_png(path: Path) -> None:
    from PIL import Image

    assert path.is_file(), path
    assert path.stat().st_size > 5 * 1024, f"{path} is only {path.stat().st_size} bytes"
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 20, f"{path} has only {len(colours)} colours"


def test_compare_smoke_after_tuning(cpu_farm, tmp_path):
    logs = tmp_path / "logs"
    job = {"name": "convnet", "model": {"source": "builtin", "name": "convnet"},
           "device": {"key": "cpu", "tracker": f"{HOST}:{cpu_farm['port']}"}, "target": "from-agent",
           "tuning": {"max_trials_global": 8, "num_trials_per_iter": 4, "population_size": 64},
           "builder": {"workers": 2, "timeout_sec": 60},
           "runner": {"timeout_sec": 30, "device_wait_sec": 30, "number": 2, "min_repeat_ms": 5}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    code, out, _ = run_cli(["tune", tmp_path / "job.yaml", "--logs-dir", logs, "--skip-eval"],
                           tmp_path / "tune.log", TUNE_TIMEOUT_S)
    assert code == 0, out

    config = _smoke_config(tmp_path / "smoke.yaml", cpu_farm["port"], logs)
    cfg = yaml.safe_load(config.read_text())  # plus a tuned row whose job was never run
    cfg["rows"].append({"backend": "tvm-tuned", "key": "cpu", "logs": str(tmp_path / "nowhere"),
                        "label": "tvm-tuned-nologs@cpu"})
    config.write_text(yaml.safe_dump(cfg))
    out_dir = tmp_path / "compare"
    code, out, took = run_cli(["compare", config, "-o", out_dir], tmp_path / "compare.log", COMPARE_TIMEOUT_S)
    assert code == 0, out
    report = json.loads((out_dir / "report.json").read_text())
    (model,) = report["models"]
    rows = {r["label"]: r for r in model["rows"]}
    agent = f"agent {agent_id_of(cpu_farm['agent'])}"

    ran = ["tvm-tuned@cpu", "tvm-untuned@cpu", "torch@cpu", "torch-compile@cpu", "onnxruntime@cpu"]
    (info,) = listed_agents(HOST, cpu_farm["port"], "cpu")
    for label in ran:
        row = rows[label]
        assert row["status"] == "ok", row
        assert row["where"] == agent, row
        assert row["threads"] == info.threads and row["precision"] == "fp32", row  # every row states both
        assert row["numerics"]["ok"] and row["numerics"]["max_abs_err"] < 1e-3, row
        lat = row["latency"]
        assert lat["p99_ms"] >= lat["p90_ms"] >= lat["median_ms"] >= lat["min_ms"] > 0, lat
        assert lat["samples"] >= 5 and lat["warmup"] >= 1
        assert row["throughput_per_s"] > 0 and row["speedup_vs_baseline"] > 0
    assert rows["torch@cpu"]["speedup_vs_baseline"] == 1.0  # the baseline
    tuned = rows["tvm-tuned@cpu"]["details"]
    assert tuned["tuned_functions"] >= 1 and tuned["trials"] == 8, tuned
    assert rows["tvm-tuned@cpu"]["latency"]["timer"] == rows["tvm-untuned@cpu"]["latency"]["timer"] == "time_evaluator"
    assert rows["torch-compile@cpu"]["details"]["compile_s"] > 0

    trt = rows["tensorrt-fp16@cpu"]
    assert trt["status"] == "not available" and "TensorRT is not installed" in trt["reason"], trt
    assert "latency" not in trt
    nologs = rows["tvm-tuned-nologs@cpu"]
    assert nologs["status"] == "not run" and "no tuning logs" in nologs["reason"] and "latency" not in nologs
    gpu = rows["torch-cuda@gpu"]
    assert gpu["status"] == "no agent" and "no agent on key 'gpu'" in gpu["reason"], gpu
    assert gpu["wall_s"] < 30  # device_wait_sec: 5, waited once

    md = (out_dir / "report.md").read_text()
    assert "| tensorrt-fp16@cpu | not available on this device: TensorRT is not installed" in md
    assert "| torch-cuda@gpu | no agent: no agent on key 'gpu'" in md
    assert report["plots"] == {"latency": "latency.png", "tuning": "tuning.png"}
    _assert_real_png(out_dir / "latency.png")
    _assert_real_png(out_dir / "tuning.png")



@pytest.fixture(scope="module")
def matmul_build(cpu_farm):
    """The builtin matmul compiled for the agent's own target and exported, as the host hands a TVM build
    to the agent's TVM runner; its inputs as .npz and PyTorch's outputs as the reference."""
    import tvm

    from tunefarm.core.jobspec import ModelSpec
    from tunefarm.host.models import load_model, to_relax
    from tunefarm.host.tuning.job import fuse_for_tuning

    (info,) = listed_agents(HOST, cpu_farm["port"], "cpu")
    target = tvm.target.Target(info.target)
    model = load_model(ModelSpec(source="builtin", name="matmul"))
    lib = cpu_farm["base"] / "matmul-untuned.so"
    tvm.compile(fuse_for_tuning(to_relax(model), target), target).export_library(str(lib))
    inputs = cpu_farm["base"] / "matmul-inputs.npz"
    np.savez(inputs, input0=model.inputs[0])
    return {"info": info, "model": model, "lib": lib, "inputs": inputs, "reference": model.reference_outputs()}


def test_tvm_runner_on_the_agent(cpu_farm, matmul_build, tmp_path):
    """tunefarm.runner.run("tvm-untuned", lib.so, ...) in one session: outputs as PyTorch's, timed by
    time_evaluator with the agent's own threads, a slow row held to its budget, a missing device named."""
    from tunefarm.tracker.client import request_session

    sess = request_session((HOST, cpu_farm["port"]), "cpu", 60, 300)
    try:
        threads = int(sess.get_function("runtime.NumThreads")())
        sess.upload(str(matmul_build["lib"]), "model.so")
        sess.upload(str(matmul_build["inputs"]), "inputs.npz")
        run = sess.get_function(RUNNER_RUN_FUNC)
        res = json.loads(run("tvm-untuned", "model.so", "inputs.npz", 3, 12, json.dumps({"budget_s": 30})))
        assert res["available"] and "error" not in res, res
        (tmp_path / "out.npz").write_bytes(bytes(sess.download(res["outputs_file"])))
        with np.load(tmp_path / "out.npz") as data:
            outputs = [data[name] for name in data.files]
        slow = json.loads(run("tvm", "model.so", "inputs.npz", 3, 50, json.dumps({"budget_s": 1e-9})))
        no_gpu = json.loads(run("tvm", "model.so", "inputs.npz", 3, 50, json.dumps({"device": "opencl"})))
    finally:
        del sess
    assert res["backend"] == "tvm-untuned" and res["device"] == "cpu:0" and res["precision"] == "fp32"
    assert res["threads"] == threads == matmul_build["info"].threads >= 1
    np.testing.assert_allclose(outputs[0], matmul_build["reference"][0], rtol=1e-4, atol=1e-4)
    lat = res["latency"]
    assert lat["timer"] == "time_evaluator" and lat["samples"] == 12 and lat["warmup"] == 4
    assert lat["p99_ms"] >= lat["p90_ms"] >= lat["median_ms"] >= lat["min_ms"] > 0 and lat["first_run_ms"] > 0
    assert res["throughput_per_s"] > 0
    # A build slower than its budget gets the minimum of samples and one warm-up run (plus the single timing).
    assert slow["latency"]["samples"] == MIN_SAMPLES and slow["latency"]["warmup"] == 2, slow["latency"]
    assert no_gpu["available"] is False and "sees no opencl" in no_gpu["reason"], no_gpu


def test_comparator_runs_a_tvm_build_on_the_agent_and_marks_a_stock_server(cpu_farm, matmul_build, tmp_path):
    """The Comparator in this process, all rows run first, then compared: the TVM build through the agent's TVM
    runner, checked against PyTorch; a stock tvm.rpc server on another key is "not available" with the reason."""
    import io
    import subprocess
    import sys

    from rich.console import Console

    from tunefarm.core.jobspec import ModelSpec
    from tunefarm.host.comparator import (NOT_AVAILABLE, OK, Comparator, FarmAgents, MeasureSettings, ModelArtifacts,
                                          Row)

    console = Console(file=io.StringIO())
    port = free_port(HOST)
    with open(tmp_path / "stock.log", "wb") as log:
        stock = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server",
                                  "--tracker", f"{HOST}:{cpu_farm['port']}", "--key", "stock", "--host", HOST,
                                  "--port", str(port), "--port-end", str(port + 50)],
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    agents = None
    try:
        agents = FarmAgents((HOST, cpu_farm["port"]), 60, console)
        wait_until(lambda: stock.poll() is not None or agents.client.servers_for_key("stock") > 0, 60,
                   what="the stock server on key 'stock'")
        assert stock.poll() is None, (tmp_path / "stock.log").read_text()
        art = ModelArtifacts(matmul_build["model"], ModelSpec(source="builtin", name="matmul"), tmp_path, console,
                             reference=matmul_build["reference"])
        lib = str(matmul_build["lib"])
        rows = [Row("tvm-untuned", "cpu", options={"device": "cpu"}, model_file=lib, details={"built": "here"}),
                Row("tvm-untuned", "stock", model_file=lib)]
        comparator = Comparator(agents, MeasureSettings(warmup=2, repeat=8, budget_s=30), console)
        ran = comparator.run(art, rows)
        assert [r.numerics for r in ran] == [None, None]  # run first, compare after
        tvm_row, stock_row = comparator.compare(ran, art.reference)
    finally:
        stop_process(stock)
        if agents is not None:
            agents.close()
    assert tvm_row.status == OK and tvm_row.where == f"agent {agent_id_of(cpu_farm['agent'])}", tvm_row
    assert tvm_row.numerics["ok"] and tvm_row.numerics["max_abs_err"] < 1e-4
    assert tvm_row.threads == matmul_build["info"].threads and tvm_row.precision == "fp32"
    assert tvm_row.latency["timer"] == "time_evaluator" and tvm_row.latency["samples"] == 8
    assert tvm_row.details["built"] == "here" and tvm_row.version.startswith("tvm-untuned 0.27")
    assert stock_row.status == NOT_AVAILABLE and "not a tunefarm agent" in stock_row.reason, stock_row
    assert stock_row.latency is None and stock_row.numerics is None
    assert agents.seen["cpu"][0]["threads"] == tvm_row.threads and agents.seen["stock"] == []


@pytest.mark.parametrize("change, message", [
    ({"rows": [{"backend": "tvm", "key": "cpu"}]}, "rows[0].backend must be one of"),
    ({"rows": [{"backend": "torch"}]}, "rows[0].key is required"),
    ({"rows": [{"backend": "tvm-tuned", "key": "cpu"}]}, "needs logs"),
    ({"baseline": "nope@cpu"}, "baseline 'nope@cpu' is not a row label"),
    ({"rows": [{"backend": "torch", "key": "cpu"}, {"backend": "torch", "key": "cpu"}]}, "labels must be unique"),
    ({"models": []}, "'models' must be a non-empty list"),
    ({"evaluate": {"repeat": "many"}}, "evaluate.repeat: expected int"),
])
def test_bad_compare_config_is_one_line_error(change, message):
    cfg = yaml.safe_load((REPO / "configs" / "compare" / "smoke.yaml").read_text())
    cfg.update(change)
    with pytest.raises(TunefarmError) as err:
        compare_from_dict(cfg, "smoke.yaml")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_compare_cli_errors_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodels: [{source: builtin, name: convnet}]\nrows: [{backend: tensorrt}]\n")
    code, out, _ = run_cli(["compare", bad], tmp_path / "out.log", 120)
    assert code == 2
    lines = [l for l in out.splitlines() if l.strip()]
    assert lines == ["tunefarm: error: " + str(bad) + ": rows[0].key is required (the key agents registered under)"]
    code, out, _ = run_cli(["compare", REPO / "configs" / "compare" / "smoke.yaml", "--tracker", f"{HOST}:{free_port()}"],
                           tmp_path / "out2.log", 120)
    assert code == 2 and "tunefarm: error: cannot reach tracker" in out and "Traceback" not in out, out


def test_seed_config_names_every_backend_of_the_study():
    from tunefarm.core.comparespec import load_compare

    cfg = load_compare(REPO / "configs" / "compare" / "seed-resnet.yaml")
    assert [m.name for m in cfg.models] == ["resnet18", "resnet50"]
    labels = [r.label for r in cfg.rows]
    assert {"tvm-tuned@cpu", "tvm-untuned@cpu", "torch@cpu", "onnxruntime@cpu", "tensorrt-fp16@gpu",
            "tensorrt-fp32@gpu", "torch-cuda@gpu"} <= set(labels)
    assert cfg.rows[0].logs_for("resnet18") == Path("logs/resnet18-cpu")


@pytest.mark.slow
def test_seed_resnet_compare_on_this_cpu(cpu_farm, tmp_path):
    """ResNet-18 and ResNet-50 on the local CPU agent: each tuned here first (a job of 8 trials: a few of its
    tasks get schedules, the rest keep TVM's defaults), then the seed compare: tuned TVM from those jobs, untuned TVM,
    PyTorch and ONNX Runtime, numerics checked; the GPU rows are marked, never numbered."""
    cfg = yaml.safe_load((REPO / "configs" / "compare" / "seed-resnet.yaml").read_text())
    cfg["tracker"] = f"{HOST}:{cpu_farm['port']}"
    cfg["device_wait_sec"] = 10
    cfg["evaluate"].update({"warmup": 3, "repeat": 20, "budget_s": 30})
    (tuned_row,) = [row for row in cfg["rows"] if row.get("logs")]
    tuned_row["logs"] = str(tmp_path / tuned_row["logs"])  # logs/{model}-cpu: the jobs below
    for model in cfg["models"]:
        job = {"name": f"{model['name']}-cpu", "model": model,
               "device": {"key": "cpu", "tracker": f"{HOST}:{cpu_farm['port']}"}, "target": "from-agent",
               "tuning": {"max_trials_global": 8, "num_trials_per_iter": 4, "population_size": 64},
               "builder": {"workers": 2, "timeout_sec": 60},
               "runner": {"timeout_sec": 30, "device_wait_sec": 30, "number": 2, "min_repeat_ms": 5}}
        (tmp_path / f"{model['name']}.yaml").write_text(yaml.safe_dump(job))
        code, out, _ = run_cli(["tune", tmp_path / f"{model['name']}.yaml", "--logs-dir", tmp_path / "logs",
                                "--skip-eval"], tmp_path / f"tune-{model['name']}.log", TUNE_TIMEOUT_S)
        assert code == 0, out
    (tmp_path / "seed.yaml").write_text(yaml.safe_dump(cfg))
    code, out, _ = run_cli(["compare", tmp_path / "seed.yaml", "-o", tmp_path / "out"], tmp_path / "compare.log",
                           1800)
    assert code == 0, out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [m["name"] for m in report["models"]] == ["resnet18", "resnet50"]
    for model in report["models"]:
        rows = {r["label"]: r for r in model["rows"]}
        for label in ("tvm-untuned@cpu", "torch@cpu", "onnxruntime@cpu"):
            assert rows[label]["status"] == "ok" and rows[label]["numerics"]["ok"], rows[label]
        # The tuned row ran on the agent the build of this model's own job (its records applied, its 8 trials
        # reported) and matched PyTorch within the config's tolerances.
        tuned = rows["tvm-tuned@cpu"]
        assert tuned["status"] == "ok" and tuned["numerics"]["ok"], tuned
        assert tuned["where"] == f"agent {agent_id_of(cpu_farm['agent'])}" and tuned["latency"]["min_ms"] > 0, tuned
        assert tuned["latency"]["timer"] == "time_evaluator", tuned
        assert tuned["details"]["logs"] == str(tmp_path / "logs" / f"{model['name']}-cpu"), tuned
        assert tuned["details"]["tuned_functions"] >= 1 and tuned["details"]["trials"] == 8, tuned
        for label in ("tensorrt-fp16@gpu", "tensorrt-fp32@gpu", "torch-cuda@gpu"):
            assert rows[label]["status"] in ("no agent", "not available") and "latency" not in rows[label]
    _assert_real_png(tmp_path / "out" / "latency.png")
