"""The TensorRT runner: real engines where TensorRT and an NVIDIA GPU exist; an honest "not available" elsewhere.

The GPU tests run the runner in this process (ONNX -> engine -> measured, checked against ONNX Runtime)
and through an agent's RPC session. Where TensorRT is not installed (as on this project's CPU machines),
they skip with the reason, and the test at the end checks what such an agent says instead of a number.
"""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import yaml

from conftest import HOST, listed_agents, run_cli
from tunefarm.device_agents.runners import available, run
from tunefarm.device_agents.runners.tensorrt import TensorRTRunner

TRT_REASON = TensorRTRunner.unavailable_reason()
needs_tensorrt = pytest.mark.skipif(
    TRT_REASON is not None, reason=f"TensorRT runner cannot run on this machine: {TRT_REASON}")


@pytest.fixture(scope="module")
def convnet_files(tmp_path_factory):
    """The builtin convnet as ONNX, its inputs as .npz, and ONNX Runtime's outputs as the reference."""
    import onnxruntime as ort

    from tunefarm.core.jobspec import ModelSpec
    from tunefarm.host.models import export_onnx, load_model

    base = tmp_path_factory.mktemp("trt")
    model = load_model(ModelSpec(source="builtin", name="convnet"))
    onnx_path = export_onnx(model, base / "convnet.onnx")
    np.savez(base / "inputs.npz", input0=model.inputs[0])
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    reference = sess.run(None, {sess.get_inputs()[0].name: model.inputs[0]})
    return {"base": base, "onnx": onnx_path, "inputs": str(base / "inputs.npz"), "reference": reference}


def _outputs(path):
    with np.load(path) as data:
        return [data[name] for name in data.files]


@needs_tensorrt
@pytest.mark.parametrize("precision, tol", [("fp32", 1e-3), ("fp16", 5e-2)])
def test_engine_matches_onnxruntime_and_is_cached(convnet_files, tmp_path, precision, tol):
    options = {"precision": precision, "cache_dir": str(tmp_path / "cache")}
    out = tmp_path / "out.npz"
    first = run("tensorrt", convnet_files["onnx"], convnet_files["inputs"], str(out), 10, 200, options)
    assert first["available"] and "error" not in first, first
    got = _outputs(out)
    np.testing.assert_allclose(got[0], convnet_files["reference"][0], rtol=tol, atol=tol)
    lat, gpu = first["latency"], first["gpu_compute"]
    assert lat["samples"] >= 200 and lat["p99_ms"] >= lat["p90_ms"] >= lat["median_ms"] >= lat["min_ms"] > 0
    assert 0 < gpu["median_ms"] <= lat["median_ms"]  # compute alone is part of copies + compute
    assert first["throughput_per_s"] > 0 and first["precision"] == precision
    assert not first["engine_cache_hit"] and first["build_s"] > 0
    engines = list((tmp_path / "cache" / "tensorrt").glob("*.engine"))
    assert len(engines) == 1 and list((tmp_path / "cache" / "tensorrt").glob("timing-*.cache"))

    again = run("tensorrt", convnet_files["onnx"], convnet_files["inputs"], str(out), 5, 50, options)
    assert again["engine_cache_hit"] and again["build_s"] == 0.0, again
    np.testing.assert_allclose(_outputs(out)[0], got[0], rtol=1e-6, atol=1e-6)


@needs_tensorrt
def test_cuda_graphs_and_duration(convnet_files, tmp_path):
    options = {"precision": "fp32", "cuda_graphs": True, "duration_s": 1.0, "cache_dir": str(tmp_path / "cache")}
    res = run("tensorrt", convnet_files["onnx"], convnet_files["inputs"], str(tmp_path / "o.npz"), 10, 10, options)
    assert res["cuda_graphs"] and "CUDA graph" in res["timing"], res
    assert res["host_wall"]["mean_ms"] * res["host_wall"]["samples"] >= 900  # ran for duration_s
    np.testing.assert_allclose(_outputs(tmp_path / "o.npz")[0], convnet_files["reference"][0], rtol=1e-3, atol=1e-3)


@needs_tensorrt
def test_tensorrt_through_an_agent(tracker, start_agent, convnet_files, tmp_path):
    from tunefarm.tracker.client import request_session

    host, port = tracker
    start_agent(host, port, "gpu", tmp_path / "agent.log")
    (info,) = listed_agents(host, port, "gpu")
    assert "tensorrt" in info.runners
    sess = request_session((host, port), "gpu", 60, 600)
    sess.upload(convnet_files["onnx"], "model.onnx")
    sess.upload(convnet_files["inputs"], "inputs.npz")
    res = json.loads(sess.get_function("tunefarm.runner.run")("tensorrt", "model.onnx", "inputs.npz", 5, 50,
                                                               json.dumps({"precision": "fp16"})))
    assert res["available"] and res["latency"]["samples"] >= 50, res
    (tmp_path / "o.npz").write_bytes(bytes(sess.download(res["outputs_file"])))
    np.testing.assert_allclose(_outputs(tmp_path / "o.npz")[0], convnet_files["reference"][0], rtol=5e-2, atol=5e-2)


@pytest.mark.skipif(TRT_REASON is None, reason="TensorRT is usable here: the tests above cover it")
def test_agent_without_tensorrt_says_not_available(tracker, start_agent, convnet_files, tmp_path):
    """Runs where TensorRT cannot: the agent says so in its DeviceInfo, in the RPC session, and `compare`
    shows the row as "not available on this device", never as a number."""
    assert "tensorrt" not in [name for name, why in available().items() if why is None]
    host, port = tracker
    start_agent(host, port, "cpu", tmp_path / "agent.log")
    (info,) = listed_agents(host, port, "cpu")
    assert "tensorrt" not in info.runners and {"tvm", "onnxruntime"} <= set(info.runners), info.runners

    why, res = _ask_agent_about_tensorrt((host, port), convnet_files)
    assert why == TRT_REASON
    assert res == {"backend": "tensorrt", "available": False, "reason": TRT_REASON}

    cfg = {"name": "trt-row", "tracker": f"{host}:{port}", "device_wait_sec": 10,
           "evaluate": {"warmup": 2, "repeat": 10},
           "models": [{"source": "builtin", "name": "convnet"}], "baseline": "onnxruntime@cpu",
           "rows": [{"backend": "onnxruntime", "key": "cpu"},
                    {"backend": "tensorrt", "key": "cpu", "options": {"precision": "fp16"}}]}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    code, out, _ = run_cli(["compare", tmp_path / "cfg.yaml", "-o", tmp_path / "out"], tmp_path / "cmp.log", 600)
    assert code == 0, out
    rows = json.loads((tmp_path / "out" / "report.json").read_text())["models"][0]["rows"]
    assert rows[0]["status"] == "ok" and rows[0]["numerics"]["ok"]
    assert rows[1]["status"] == "not available" and "latency" not in rows[1] and rows[1]["speedup_vs_baseline"] is None
    line = [l for l in (tmp_path / "out" / "report.md").read_text().splitlines() if l.startswith("| tensorrt")]
    assert len(line) == 1 and "not available on this device: TensorRT is not installed" in line[0], line
    assert not any(ch.isdigit() for ch in line[0].split("|")[3]), line  # no number in the median column


def _ask_agent_about_tensorrt(tracker_addr, files):
    """In one RPC session (closed on return, so the agent is free again): the reason and a run's answer."""
    from tunefarm.tracker.client import request_session

    sess = request_session(tracker_addr, "cpu", 60, 120)
    why = json.loads(sess.get_function("tunefarm.runner.available")("{}"))["tensorrt"]
    sess.upload(files["onnx"], "model.onnx")
    sess.upload(files["inputs"], "inputs.npz")
    res = json.loads(sess.get_function("tunefarm.runner.run")("tensorrt", "model.onnx", "inputs.npz", 1, 5, "{}"))
    return why, res


def test_runner_modules_import_without_their_frameworks():
    """Lazy imports: listing runners and their availability imports no framework."""
    import subprocess
    import sys

    code = ("import sys; from tunefarm.device_agents.runners import available; available(); "
            "print(sorted(m for m in ('torch', 'onnxruntime', 'tensorrt') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    assert importlib.util.find_spec("tunefarm.device_agents.runners.tensorrt") is not None
