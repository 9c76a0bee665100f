"""OpenCL without the backend: agents detect a real OpenCL platform (PoCL in CI), say their TVM runtime cannot
run it until started with --opencl, and the host cross-compiles OpenCL kernels for the Intel iGPU preset.
(With the backend: tests/test_opencl_runtime.py.)

.ci/run installs PoCL (``pocl-opencl-icd``) and ``clinfo``; the detection test skips where clinfo is absent.
The cross-compilation test needs no OpenCL at all: TVM's compiler emits OpenCL C on any host.
"""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from conftest import listed_agents, run_cli
from tunefarm.core.targets import OPENCL_RUNTIME_HINT


def _clinfo_platforms() -> list[str]:
    if not shutil.which("clinfo"):
        return []
    out = subprocess.run(["clinfo", "-l"], capture_output=True, text=True, timeout=60, check=False).stdout
    return [line.split(":", 1)[1].strip() for line in out.splitlines() if "Platform #" in line]


needs_opencl_platform = pytest.mark.skipif(
    not _clinfo_platforms(),
    reason="clinfo is not installed or lists no OpenCL platform (.ci/run installs PoCL + clinfo: "
           "apt-get install pocl-opencl-icd clinfo ocl-icd-libopencl1)")


@needs_opencl_platform
def test_agent_lists_the_opencl_platform_and_says_tvm_cannot_run_it(tracker, start_agent, tmp_path):
    host, port = tracker
    start_agent(host, port, "nuc", tmp_path / "agent.log", target="intel-igpu-opencl")
    (info,) = listed_agents(host, port, "nuc")
    opencl = info.opencl
    assert opencl["source"] == "clinfo"
    names = [p["name"] for p in opencl["platforms"]]
    assert names == _clinfo_platforms() and names, opencl
    assert all(p["devices"] and all(d["name"] for d in p["devices"]) for p in opencl["platforms"]), opencl
    # The PyPI wheel is built with USE_OPENCL=OFF and this agent was not started with --opencl: it sees the
    # platform through clinfo, not through TVM, and says what to do.
    assert opencl["tvm_built_with_opencl"] is False and opencl["tvm_runtime_opencl"] is False
    assert opencl["tvm_opencl_backend"] is False and "--opencl" in opencl["note"], opencl
    assert info.target["kind"] == "opencl"
    log = (tmp_path / "agent.log").read_text()
    assert "TVM runtime OpenCL: no" in log and "--opencl" in log, log

    code, out, _ = run_cli(["devices", "--tracker", f"{host}:{port}", "--json"], tmp_path / "devices.log")
    assert code == 0, out
    (entry,) = [d for d in json.loads(out[out.index("["):]) if d["key"] == "nuc"]
    assert entry["agents"][0]["opencl"]["platforms"][0]["name"] == names[0]

    # Tuning for that agent stops at once with the reason and the build flag, not after failed candidates.
    job = {"name": "ocl", "model": {"source": "builtin", "name": "matmul"},
           "device": {"key": "nuc", "tracker": f"{host}:{port}"}, "target": "from-agent",
           "tuning": {"max_trials_global": 4, "num_trials_per_iter": 4}, "runner": {"device_wait_sec": 10}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    code, out, _ = run_cli(["tune", tmp_path / "job.yaml", "--logs-dir", tmp_path / "logs"], tmp_path / "tune.log", 300)
    errors = [l for l in out.splitlines() if l.startswith("tunefarm: error:")]
    assert code == 2 and len(errors) == 1, out
    assert "cannot run OpenCL kernels" in errors[0] and "tunefarm agent --opencl" in errors[0], errors[0]
    assert names[0] in errors[0] or info.opencl["platforms"][0]["devices"][0]["name"] in errors[0]


def test_opencl_kernels_are_cross_compiled_and_exported(tmp_path):
    """The intel-igpu-opencl preset: every TIR function gets a (default GPU) schedule, the OpenCL C source is
    generated, and the exported library carries it for a device runtime built with USE_OPENCL=ON."""
    import tvm

    from tunefarm.core.jobspec import ModelSpec
    from tunefarm.core.targets import runtime_problem, target_from_spec, target_to_json
    from tunefarm.core.wire import DeviceInfo
    from tunefarm.host.crossbuild import cross_build
    from tunefarm.host.models import load_model, to_relax
    from tunefarm.host.tuning.job import fuse_for_tuning

    target = target_from_spec("intel-igpu-opencl")
    assert target.kind.name == "opencl" and target.host.kind.name == "llvm"
    mod = fuse_for_tuning(to_relax(load_model(ModelSpec(source="builtin", name="convnet"))), target)
    built = cross_build(mod, target, tmp_path / "convnet-igpu.so")
    assert built["scheduled"] and not built["unscheduled"], built
    source = built["sources"]["opencl"]
    kernels = [line for line in source.splitlines() if line.startswith("__kernel void")]
    assert len(kernels) >= len(built["scheduled"]), source[:500]
    assert all(any(name in k for k in kernels) for name in built["scheduled"])
    blob = (tmp_path / "convnet-igpu.so").read_bytes()
    assert blob.count(b"__kernel void") >= len(built["scheduled"])  # the source travels inside the library

    # This host's runtime (the PyPI wheel) cannot load OpenCL kernels; the farm says why and what to build.
    assert not str(tvm.support.libinfo().get("USE_OPENCL", "OFF")).upper() in ("ON", "1")
    info = DeviceInfo(key="nuc", agent_id="nuc:1", opencl={"platforms": [], "tvm_runtime_opencl": False})
    problem = runtime_problem(target_to_json(target), info)
    assert problem and OPENCL_RUNTIME_HINT in problem and "--opencl" in problem
    assert runtime_problem(target_to_json(target), DeviceInfo(key="nuc", opencl={"tvm_runtime_opencl": True})) is None
