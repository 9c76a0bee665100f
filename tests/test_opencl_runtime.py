"""OpenCL for real (issue 14): TVM's OpenCL backend built for the PyPI wheel from TVM's source, an agent serving
PoCL with it, and a tiny model tuned through the farm for that OpenCL device, numerics checked.

The source is ../shared/tvm-opencl-src (TVM's OpenCL runtime files, kept beside the project for machines without
network access; ``$TUNEFARM_TVM_SOURCE`` names another tree). .ci/run installs PoCL, clinfo and opencl-headers.
Every test builds into its own cache (``XDG_CACHE_HOME``) except the module's shared build, which the tuning
test reuses.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import listed_agents, run_cli
from test_opencl import _clinfo_platforms

REPO = Path(__file__).resolve().parents[1]
SOURCE = Path(os.environ.get("TUNEFARM_TVM_SOURCE") or REPO.parent / "shared" / "tvm-opencl-src")

pytestmark = [
    pytest.mark.skipif(not SOURCE.is_dir(), reason=f"no TVM OpenCL source tree at {SOURCE} (set TUNEFARM_TVM_SOURCE)"),
    pytest.mark.skipif(not _clinfo_platforms(),
                       reason="clinfo is not installed or lists no OpenCL platform (.ci/run installs PoCL + clinfo: "
                              "apt-get install pocl-opencl-icd clinfo ocl-icd-libopencl1 opencl-headers)"),
]


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory):
    """A cache directory holding the backend, built once by ``tunefarm runtime opencl``."""
    cache = tmp_path_factory.mktemp("xdg-cache")
    log = cache / "runtime.log"
    code, out, _ = run_cli(["runtime", "opencl", "--tvm-source", SOURCE], log, 600, env={"XDG_CACHE_HOME": str(cache)})
    assert code == 0, out
    return cache, out


def test_the_backend_builds_loads_and_runs_a_kernel_on_pocl(built_cache, tmp_path):
    cache, out = built_cache
    libs = list((cache / "tunefarm" / "opencl").glob("tvm-*/libtvm_runtime_opencl.so"))
    assert len(libs) == 1, out
    meta = json.loads((libs[0].parent / "build.json").read_text())
    assert meta["source"] == str(SOURCE.resolve()) and meta["build_s"] > 0, meta
    assert "a test kernel ran with exact results" in out, out
    device_names = [d for p in _clinfo_platforms() for d in [p]]
    assert device_names and "OpenCL device: " in out, out
    target = json.loads(out.split("target: ", 1)[1].splitlines()[0])
    assert target["kind"] == "opencl" and target["host"]["kind"] == "llvm"
    assert target["max_threads_per_block"] > 0 and target["max_shared_memory_per_block"] > 0

    # A target is checked against what the device reports (the agent warns with these lines).
    from tunefarm.core.targets import load_preset
    from tunefarm.device_agents.opencl_runtime import target_problems

    device = {"name": "pocl", "max_threads_per_block": target["max_threads_per_block"],
              "max_shared_memory_per_block": target["max_shared_memory_per_block"], "warp_size": 1}
    preset = load_preset("intel-igpu-opencl")
    fits = preset["max_threads_per_block"] <= device["max_threads_per_block"]
    assert bool(target_problems(preset, device)) == (not fits or preset["max_shared_memory_per_block"] >
                                                      device["max_shared_memory_per_block"])
    too_big = dict(target, max_threads_per_block=device["max_threads_per_block"] * 2, thread_warp_size=16)
    problems = target_problems(too_big, device)
    assert len(problems) == 2 and "exceeds" in problems[0] and "TVM_OPENCL_WARP_SIZE=16" in problems[1], problems

    # The second time it comes from the cache (no source needed), and is checked again.
    code, again, seconds = run_cli(["runtime", "opencl"], tmp_path / "again.log", 300,
                                   env={"XDG_CACHE_HOME": str(cache), "TUNEFARM_TVM_SOURCE": ""})
    assert code == 0 and "using " in again and "building" not in again, again
    assert "a test kernel ran with exact results" in again


def _one_error(code: int, out: str) -> str:
    errors = [l for l in out.splitlines() if l.startswith("tunefarm: error:")]
    assert code != 0 and len(errors) == 1, out
    return errors[0]


def test_bad_environments_are_one_line_errors(tmp_path):
    """No C++ compiler, no OpenCL headers, no OpenCL platform, a source tree of another TVM version or an
    older layout, no source at all: each one line and a non-zero exit, nothing half-built in the cache."""
    cache = tmp_path / "cache"
    base = {"XDG_CACHE_HOME": str(cache), "TUNEFARM_TVM_SOURCE": ""}

    def run(name: str, args: list, **env) -> str:
        code, out, _ = run_cli(["runtime", "opencl", *args], tmp_path / f"{name}.log", 300, env={**base, **env})
        return _one_error(code, out)

    err = run("nocxx", ["--tvm-source", SOURCE], CXX="no-such-c++-compiler")
    assert "no C++ compiler" in err and "no-such-c++-compiler" in err, err

    # A real compiler that looks for headers in an empty system root: CL/cl.h is not there.
    empty = tmp_path / "empty-root"
    empty.mkdir()
    wrapper = tmp_path / "cxx-without-headers"
    wrapper.write_text(f"#!/bin/sh\nexec {shutil.which('c++')} --sysroot={empty} \"$@\"\n")
    wrapper.chmod(0o755)
    err = run("noheaders", ["--tvm-source", SOURCE], CXX=str(wrapper))
    assert "no OpenCL headers" in err and "opencl-headers" in err, err

    # Another TVM version's tree, and an older TVM's layout.
    other = tmp_path / "tvm-0.19"
    shutil.copytree(SOURCE, other)
    (other / "version.py").write_text('__version__ = "0.19.0"\n')
    err = run("version", ["--tvm-source", other])
    assert "is TVM 0.19.0" in err and "v0.27.0" in err and "git clone" in err, err
    old = tmp_path / "tvm-old-layout"
    (old / "src" / "runtime" / "opencl").mkdir(parents=True)
    (old / "src" / "runtime" / "opencl" / "opencl_module.cc").write_text("// an older TVM's OpenCL runtime\n")
    err = run("layout", ["--tvm-source", old])
    assert "older TVM" in err and "src/runtime/opencl" in err, err
    err = run("nosource", [])
    assert "no OpenCL backend" in err and "--tvm-source" in err and "git clone" in err, err
    err = run("notadir", ["--tvm-source", tmp_path / "missing"])
    assert "is not a directory" in err, err
    assert not list(cache.glob("tunefarm/opencl/tvm-*/libtvm_runtime_opencl.so")), "a failed build left a library"

    # Built and loaded, but the ICD loader finds no platform (no vendor files): the device check says so.
    err = run("noplatform", ["--tvm-source", SOURCE], OCL_ICD_VENDORS=str(empty))
    assert "sees no OpenCL device" in err and "pocl-opencl-icd" in err, err


@pytest.mark.timeout(1500)
def test_opencl_tuning_through_the_farm_on_pocl(built_cache, tracker, start_agent, tmp_path):
    """An agent started with --opencl serves PoCL with the device's own limits; a tiny model is tuned for it
    through the farm, every candidate measured on the OpenCL device, and the tuned and untuned builds run
    there with outputs matching the CPU reference (tune's evaluation: numerics checked per row)."""
    cache, _ = built_cache
    host, port = tracker
    env = {"XDG_CACHE_HOME": str(cache), "TUNEFARM_TVM_SOURCE": ""}
    start_agent(host, port, "pocl", tmp_path / "agent.log", extra_args=["--opencl"], env=env)
    (info,) = listed_agents(host, port, "pocl")
    assert info.target["kind"] == "opencl" and info.opencl["tvm_runtime_opencl"] is True, info.opencl
    device = info.opencl["device"]
    assert device["name"] and info.target["max_threads_per_block"] == device["max_threads_per_block"], info.target
    log = (tmp_path / "agent.log").read_text()
    assert "TVM runtime OpenCL: yes" in log and "work-items per work-group" in log, log

    code, out, _ = run_cli(["devices", "--tracker", f"{host}:{port}"], tmp_path / "devices.log")
    assert code == 0 and "runtime yes" in out and "work-items/group" in out, out

    job = {"name": "ocl", "model": {"source": "builtin", "name": "matmul"},
           "device": {"key": "pocl", "tracker": f"{host}:{port}"}, "target": "from-agent",
           "tuning": {"max_trials_global": 8, "num_trials_per_iter": 4},
           "evaluate": {"repeat": 5, "warmup": 1}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    code, out, _ = run_cli(["tune", tmp_path / "job.yaml", "--logs-dir", tmp_path / "logs"], tmp_path / "tune.log",
                           1200, env=env)
    assert code == 0, out
    report = json.loads((tmp_path / "logs" / "ocl" / "report.json").read_text())
    assert report["ok"], report["problems"]
    assert report["target"]["kind"] == "opencl", report["target"]
    tuning = report["tuning"]
    assert tuning["trials_this_run"] >= 8 and tuning["failed_this_run"] < tuning["trials_this_run"], tuning
    assert report["schedules"]["tuned"] > 0 and report["schedules"]["tasks_without_record"] == [], report["schedules"]
    for name in ("tvm-tuned", "tvm-untuned"):
        row = report["results"][name]
        assert row["numerics"]["ok"] and row["latency"]["median_ms"] > 0, row
        assert row["where"] == f"agent {info.agent_id}", row

    # tunefarm compare: the tuned and untuned OpenCL builds and ONNX Runtime on the same agent (its CPU).
    config = {"name": "ocl", "tracker": f"{host}:{port}", "device_wait_sec": 30,
              "evaluate": {"warmup": 1, "repeat": 5, "budget_s": 20, "rtol": 1e-3, "atol": 1e-3},
              "baseline": "onnxruntime@pocl", "models": [{"source": "builtin", "name": "matmul"}],
              "rows": [{"backend": "tvm-tuned", "key": "pocl", "logs": str(tmp_path / "logs" / "ocl")},
                       {"backend": "tvm-untuned", "key": "pocl"}, {"backend": "onnxruntime", "key": "pocl"}]}
    (tmp_path / "compare.yaml").write_text(yaml.safe_dump(config))
    code, out, _ = run_cli(["compare", tmp_path / "compare.yaml", "-o", tmp_path / "compare"], tmp_path / "compare.log",
                           600, env=env)
    assert code == 0, out
    (model,) = json.loads((tmp_path / "compare" / "report.json").read_text())["models"]
    rows = {r["label"]: r for r in model["rows"]}
    for label in ("tvm-tuned@pocl", "tvm-untuned@pocl", "onnxruntime@pocl"):
        assert rows[label]["status"] == "ok" and rows[label]["numerics"]["ok"], rows[label]
    assert rows["tvm-tuned@pocl"]["details"]["tuned_functions"] >= 1, rows["tvm-tuned@pocl"]["details"]
