"""oneDNN as a farm backend (issue 31, item 1), for real: TVM's DNNL runtime plugin built for the PyPI wheel from
the wheel's own sources against Debian's libdnnl-dev 2.6.x, the farm's Python ``relax.ext.dnnl`` codegen, modules
mixing oneDNN and TVM kernels checked against PyTorch, and an agent that loads the plugin, reports it and runs
such a module in its model runner.

.ci/run installs libdnnl-dev; where it is missing (or no C++ compiler is there) the module skips with the reason.
The plugin is built once per session (``onednn_cache``) into a private cache (``XDG_CACHE_HOME``).
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import ONEDNN_WHY_NOT, listed_agents, run_cli
from tunefarm.core.errors import TunefarmError


WHY_NOT = ONEDNN_WHY_NOT
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")
RTOL = 1e-4


def test_the_plugin_builds_from_the_wheel_sources_checks_a_conv_and_is_cached(onednn_cache, tmp_path):
    cache, lib, out = onednn_cache
    assert "building libtvm_dnnl_plugin.so" in out and "against oneDNN 2." in out, out
    meta = json.loads((lib.parent / "build.json").read_text())
    assert meta["build_s"] > 0 and meta["onednn_headers"].startswith("2."), meta
    assert meta["sources"].endswith("tvm/src/runtime/extra/contrib/dnnl"), meta
    err = float(out.split("matched numpy to ", 1)[1].split()[0])
    assert err <= RTOL, out
    assert "oneDNN 2." in out and "omp threads" in out, out
    # No temporary build directory is left beside the cache entry.
    assert [p.name for p in lib.parent.parent.iterdir()] == [lib.parent.name]

    code, again, _ = run_cli(["runtime", "onednn"], tmp_path / "again.log", 300, env={"XDG_CACHE_HOME": str(cache)})
    assert code == 0 and "using " in again and "building" not in again, again
    assert f"plugin: {lib}" in again, again


def _one_error(code: int, out: str) -> str:
    errors = [l for l in out.splitlines() if l.startswith("tunefarm: error:")]
    assert code != 0 and len(errors) == 1, out
    return errors[0]


def test_no_compiler_no_libdnnl_dev_and_a_wheel_without_sources_are_one_line_errors(tmp_path, monkeypatch):
    cache = tmp_path / "cache"

    def run(name: str, **env) -> str:
        code, out, _ = run_cli(["runtime", "onednn"], tmp_path / f"{name}.log", 300,
                               env={"XDG_CACHE_HOME": str(cache), **env})
        return _one_error(code, out)

    err = run("nocxx", CXX="no-such-c++-compiler")
    assert "no C++ compiler" in err and "no-such-c++-compiler" in err, err
    # A real compiler that looks for headers in an empty system root: dnnl.hpp is not there (no libdnnl-dev).
    empty = tmp_path / "empty-root"
    empty.mkdir()
    wrapper = tmp_path / "cxx-without-dnnl"
    wrapper.write_text(f"#!/bin/sh\nexec {shutil.which('c++')} --sysroot={empty} \"$@\"\n")
    wrapper.chmod(0o755)
    err = run("nodnnl", CXX=str(wrapper))
    assert "no oneDNN development files" in err and "apt install libdnnl-dev" in err, err
    assert not list(cache.glob("tunefarm/onednn/tvm-*/libtvm_dnnl_plugin.so")), "a failed build left a plugin"

    # A TVM install without the DNNL sources (anything but the PyPI wheel): the build refuses in one line.
    import tvm

    from tunefarm.device_agents import onednn_runtime

    fake = tmp_path / "site" / "tvm"
    (fake / "lib").mkdir(parents=True)
    monkeypatch.setattr(tvm, "__file__", str(fake / "__init__.py"))
    with pytest.raises(TunefarmError) as info:
        onednn_runtime.build(tmp_path / "out")
    msg = str(info.value)
    assert "\n" not in msg and "does not ship the DNNL runtime's sources" in msg and "USE_DNNL=ON" in msg, msg


def _torch_ref(fn):
    import torch

    with torch.no_grad():
        return fn(torch.nn.functional, torch.from_numpy).numpy()


def _rel_err(out, ref) -> float:
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def _mixed_module():
    """conv+bias+relu -> max_pool -> conv -> add(input): the task's mixed module, weights bound as constants."""
    import tvm
    from tvm import relax
    from tvm.script import ir as I
    from tvm.script import relax as R

    @I.ir_module
    class Net:  # pylint: disable=too-few-public-methods
        @R.function
        def main(data: R.Tensor((1, 8, 12, 12), "float32"), w1: R.Tensor((16, 8, 3, 3), "float32"),
                 b1: R.Tensor((1, 16, 1, 1), "float32"), w2: R.Tensor((8, 16, 3, 3), "float32")):
            with R.dataflow():
                c = R.nn.relu(R.add(R.nn.conv2d(data, w1, padding=(1, 1)), b1))
                p = R.nn.max_pool2d(c, pool_size=(3, 3), strides=(1, 1), padding=(1, 1))
                c2 = R.nn.conv2d(p, w2, padding=(1, 1))
                o = R.add(c2, data)
                R.output(o)
            return o

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 8, 12, 12), dtype=np.float32)
    params = {"w1": rng.standard_normal((16, 8, 3, 3), dtype=np.float32) * 0.2,
              "b1": rng.standard_normal((1, 16, 1, 1), dtype=np.float32),
              "w2": rng.standard_normal((8, 16, 3, 3), dtype=np.float32) * 0.2}
    mod = relax.transform.BindParams("main", {k: tvm.runtime.tensor(v) for k, v in params.items()})(Net)
    ref = _torch_ref(lambda F, t: F.conv2d(F.max_pool2d(F.relu(F.conv2d(t(x), t(params["w1"]), padding=1)
                                                                 + t(params["b1"])), 3, 1, 1),
                                           t(params["w2"]), padding=1) + t(x))
    return mod, x, ref


def _offload_mixed():
    """The mixed module with the residual add left to TVM (``select``: the placement step's hook)."""
    from tunefarm.host.byoc import dnnl

    mod, x, ref = _mixed_module()
    groups = dnnl.candidate_groups(mod)
    offloaded = dnnl.offload(mod, select=lambda g: "_sum" not in g.composite)
    return groups, offloaded, x, ref


def test_a_weight_computed_from_constants_is_folded_into_one_constant_for_onednn(plugin):
    """A conv whose weight is w * scale (how a folded BatchNorm arrives) gets one constant weight, which oneDNN
    reorders once at load; without folding it would be an input reordered on every call."""
    import tvm
    from tvm import relax
    from tvm.script import ir as I
    from tvm.script import relax as R

    from tunefarm.host.byoc import dnnl

    @I.ir_module
    class Net:  # pylint: disable=too-few-public-methods
        @R.function
        def main(data: R.Tensor((1, 4, 8, 8), "float32"), w: R.Tensor((8, 4, 3, 3), "float32"),
                 s: R.Tensor((8, 1, 1, 1), "float32")):
            with R.dataflow():
                o = R.nn.conv2d(data, R.multiply(w, s), padding=(1, 1))
                R.output(o)
            return o

    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 4, 8, 8), dtype=np.float32)
    w = rng.standard_normal((8, 4, 3, 3), dtype=np.float32)
    scale = rng.standard_normal((8, 1, 1, 1), dtype=np.float32)
    mod = relax.transform.BindParams("main", {"w": tvm.runtime.tensor(w), "s": tvm.runtime.tensor(scale)})(Net)
    (unfolded,) = dnnl.candidate_groups(mod, fold_constants=False)
    (folded,) = dnnl.candidate_groups(mod)
    assert not unfolded.const_weight and folded.const_weight
    offloaded = dnnl.offload(mod)
    assert len(offloaded.attrs["const_name_to_constant"]) == 1
    out = relax.VirtualMachine(tvm.compile(offloaded, tvm.target.Target({"kind": "llvm"})), tvm.cpu())["main"](
        tvm.runtime.tensor(x)).numpy()
    assert _rel_err(out, _torch_ref(lambda F, t: F.conv2d(t(x), t(w * scale), padding=1))) <= RTOL


def test_a_mixed_module_matches_pytorch_and_runs_again_after_export_and_reload(plugin, tmp_path):
    import tvm
    from tvm import relax

    from tunefarm.host.byoc import dnnl

    groups, mod, x, ref = _offload_mixed()
    # Everything oneDNN could take: conv+bias+relu, and the second conv with the residual add fused.
    assert sorted(g.composite for g in groups) == ["dnnl.conv2d_bias_relu", "dnnl.conv2d_sum"], groups
    conv1 = next(g for g in groups if g.composite == "dnnl.conv2d_bias_relu")
    assert conv1.shapes["weight"] == (16, 8, 3, 3) and conv1.flops == 2 * 16 * 12 * 12 * 8 * 9, conv1
    assert conv1.key() != next(g for g in groups if g is not conv1).key()
    # Offloaded: two oneDNN functions (not neighbours: TVM's max_pool sits between them), max_pool and add in TVM.
    assert dnnl.offloaded_functions(mod) == 2
    text = mod.script()
    assert "R.nn.max_pool2d" in text and "R.add(" in text and text.count("call_dps_packed") >= 2, text
    assert "const_name_to_constant" in mod.attrs and len(mod.attrs["const_name_to_constant"]) == 3  # w1, b1, w2

    ex = tvm.compile(mod, tvm.target.Target({"kind": "llvm"}))
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    assert _rel_err(out, ref) <= RTOL
    path = tmp_path / "mixed.so"
    ex.export_library(str(path))
    again = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    assert _rel_err(again, ref) <= RTOL


def test_fused_residual_dense_and_matmul_groups_match_pytorch(plugin):
    """conv+bias+residual+relu (a ResNet block's tail), Linear+bias+relu as PyTorch exports it
    (matmul(x, permute_dims(w)), kept with fold_constants=False) and a plain 2-D matmul (its bias add stays with
    TVM): numerics against PyTorch."""
    import tvm
    from tvm import relax
    from tvm.script import ir as I
    from tvm.script import relax as R

    from tunefarm.host.byoc import dnnl

    @I.ir_module
    class Net:  # pylint: disable=too-few-public-methods
        @R.function
        def main(data: R.Tensor((1, 8, 6, 6), "float32"), w: R.Tensor((8, 8, 3, 3), "float32"),
                 b: R.Tensor((1, 8, 1, 1), "float32"), fw: R.Tensor((16, 288), "float32"),
                 fb: R.Tensor((16,), "float32"), mw: R.Tensor((16, 10), "float32"), mb: R.Tensor((10,), "float32")):
            with R.dataflow():
                c = R.nn.relu(R.add(R.add(R.nn.conv2d(data, w, padding=(1, 1)), b), data))
                flat = R.reshape(c, (1, 288))
                h = R.nn.relu(R.add(R.matmul(flat, R.permute_dims(fw)), fb))
                o = R.add(R.matmul(h, mw), mb)
                R.output(o)
            return o

    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 8, 6, 6), dtype=np.float32)
    p = {"w": rng.standard_normal((8, 8, 3, 3), dtype=np.float32) * 0.2,
         "b": rng.standard_normal((1, 8, 1, 1), dtype=np.float32),
         "fw": rng.standard_normal((16, 288), dtype=np.float32) * 0.1, "fb": rng.standard_normal(16, dtype=np.float32),
         "mw": rng.standard_normal((16, 10), dtype=np.float32) * 0.3, "mb": rng.standard_normal(10, dtype=np.float32)}
    mod = relax.transform.BindParams("main", {k: tvm.runtime.tensor(v) for k, v in p.items()})(Net)
    groups = dnnl.candidate_groups(mod, fold_constants=False)
    assert sorted(g.composite for g in groups) == ["dnnl.conv2d_bias_sum_relu", "dnnl.dense_bias_relu", "dnnl.matmul"]
    offloaded = dnnl.offload(mod, fold_constants=False)
    assert dnnl.offloaded_functions(offloaded) >= 2  # the reshape (TVM) splits conv from the dense+matmul pair
    ex = tvm.compile(offloaded, tvm.target.Target({"kind": "llvm"}))
    out = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()

    def ref(F, t):
        c = F.relu(F.conv2d(t(x), t(p["w"]), padding=1) + t(p["b"]) + t(x))
        h = F.relu(F.linear(c.reshape(1, 288), t(p["fw"]), t(p["fb"])))
        return h @ t(p["mw"]) + t(p["mb"])

    assert _rel_err(out, _torch_ref(ref)) <= RTOL


@pytest.mark.parametrize("layout", ["NCHW", "NCHWc"])
def test_relu6_as_a_clip_post_op_and_a_depthwise_conv_match_pytorch(plugin, layout):
    """MobileNet's blocks: a depthwise conv (groups = channels) + bias + ReLU6 (``clip(x, 0, 6)``: the runtime's
    eltwise_clip post-op, bounds from the composite) and a pointwise conv + bias + residual. Inputs scaled so that
    about half the ReLU6 outputs are clipped at 6 (a clip that was not applied would fail the check). In NCHWc (the
    CPU pipeline's layout: channel blocks of 8 here, OIHW1i8o depthwise weights) both convs go to oneDNN too."""
    import tvm
    from tvm import relax
    from tvm.script import ir as I
    from tvm.script import relax as R

    from tunefarm.host.byoc import dnnl
    from tunefarm.host.tuning.pipeline import Pipeline

    @I.ir_module
    class Net:  # pylint: disable=too-few-public-methods
        @R.function
        def main(x: R.Tensor((1, 16, 10, 10), "float32"), dw: R.Tensor((16, 1, 3, 3), "float32"),
                 db: R.Tensor((1, 16, 1, 1), "float32"), pw: R.Tensor((16, 16, 1, 1), "float32"),
                 pb: R.Tensor((1, 16, 1, 1), "float32")):
            with R.dataflow():
                d = R.clip(R.add(R.nn.conv2d(x, dw, padding=(1, 1), groups=16), db), R.prim_value(0.0),
                           R.prim_value(6.0))
                o = R.add(R.add(R.nn.conv2d(d, pw), pb), x)
                R.output(o)
            return o

    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 16, 10, 10), dtype=np.float32) * 8
    p = {"dw": rng.standard_normal((16, 1, 3, 3), dtype=np.float32),
         "db": rng.standard_normal((1, 16, 1, 1), dtype=np.float32),
         "pw": rng.standard_normal((16, 16, 1, 1), dtype=np.float32) * 0.3,
         "pb": rng.standard_normal((1, 16, 1, 1), dtype=np.float32)}
    mod = relax.transform.BindParams("main", {k: tvm.runtime.tensor(v) for k, v in p.items()})(Net)
    target = tvm.target.Target({"kind": "llvm"})
    if layout == "NCHWc":
        mod = Pipeline(layout="NCHWc").graph(mod, target)
        convs = [c for c in dnnl.calls_of(mod["main"], "relax.nn.conv2d")]
        assert sorted(str(c.attrs.kernel_layout) for c in convs) == ["OIHW1i8o", "OIHW8i8o"], mod.script()
    groups = dnnl.candidate_groups(mod)
    assert sorted(g.composite for g in groups) == ["dnnl.conv2d_bias_clip", "dnnl.conv2d_bias_sum"], groups
    clip = next(g for g in groups if g.composite.endswith("_clip"))
    assert clip.attrs["groups"] == 16 and clip.attrs["clip"] == (0.0, 6.0), clip
    assert clip.flops == 2 * 16 * 10 * 10 * 9, clip  # one input channel per output channel
    offloaded = dnnl.offload(mod)
    assert dnnl.offloaded_functions(offloaded) == 1 and "R.clip" not in offloaded.script()
    assert "R.nn.conv2d" not in offloaded.script()  # both convs on oneDNN
    out = relax.VirtualMachine(tvm.compile(offloaded, target), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()

    def depthwise(F, t):
        return F.relu6(F.conv2d(t(x), t(p["dw"]), t(p["db"].reshape(16)), padding=1, groups=16))

    assert 0.2 < float((_torch_ref(depthwise) == 6).mean()) < 0.8  # the clip matters
    ref = _torch_ref(lambda F, t: F.conv2d(depthwise(F, t), t(p["pw"]), t(p["pb"].reshape(16))) + t(x))
    assert out.shape == ref.shape and _rel_err(out, ref) <= RTOL


@pytest.mark.timeout(600)
def test_an_agent_loads_the_plugin_reports_it_and_runs_a_module_with_onednn_parts(onednn_cache, plugin, tracker,
                                                                                   start_agent, tmp_path):
    """An agent that finds the cached plugin loads it, reports oneDNN in its DeviceInfo, its start-up summary and
    `tunefarm devices`; a module with oneDNN parts compiled on the host runs on it through the farm's model runner
    (the path compare rows take) with both thread pools at the agent's count, outputs matching PyTorch."""
    import tvm
    from rich.console import Console

    from tunefarm.core.wire import RUNNER_RUN_FUNC
    from tunefarm.host.comparator import FarmAgents

    cache, lib, _ = onednn_cache
    host, port = tracker
    start_agent(host, port, "dnnl", tmp_path / "agent.log", env={"XDG_CACHE_HOME": str(cache)})
    (info,) = listed_agents(host, port, "dnnl")
    entry = info.vendor["onednn"]
    assert entry["available"] is True and entry["plugin"] == str(lib), entry
    assert entry["version"].startswith("2.") and entry["cpu_runtime"] == "omp" and entry["isa"], entry
    log = (tmp_path / "agent.log").read_text()
    assert "onednn   yes (oneDNN 2." in log and f"OMP_NUM_THREADS={info.threads}" in log, log
    code, out, _ = run_cli(["devices", "--tracker", f"{host}:{port}"], tmp_path / "devices.log")
    assert code == 0 and f"onednn {entry['version']}" in out, out

    _, mod, x, ref = _offload_mixed()
    model = tmp_path / "mixed.so"
    tvm.compile(mod, tvm.target.Target({"kind": "llvm"})).export_library(str(model))
    np.savez(tmp_path / "inputs.npz", data=x)
    agents = FarmAgents((host, port), 60, Console(file=io.StringIO()))
    sess, agent_id, _ = agents.session_on("dnnl", 120)
    assert agent_id == info.agent_id
    sess.upload(str(model), "model-mixed.so")
    sess.upload(str(tmp_path / "inputs.npz"), "inputs.npz")
    answer = json.loads(str(sess.get_function(RUNNER_RUN_FUNC)("tvm", "model-mixed.so", "inputs.npz", 2, 5,
                                                                 json.dumps({"budget_s": 20}))))
    assert "error" not in answer and answer.get("available") is True, answer
    with np.load(io.BytesIO(bytes(sess.download(answer["outputs_file"])))) as data:
        (out,) = [data[name] for name in data.files]
    del sess
    agents.close()
    assert _rel_err(out, ref) <= RTOL
    assert answer["latency"]["median_ms"] > 0, answer
    assert answer["threads"] == info.threads, answer
    assert answer["onednn"] == {"plugin": str(lib), "omp_threads": str(info.threads)}, answer
    # A model mixing oneDNN and TVM kernels: neither pool's idle threads spin on the other's cores (set in the
    # session before the plugin loaded libgomp; core.threads.MIXED_POOLS).
    assert answer["pool_spin"] == {"TVM_THREAD_POOL_SPIN_COUNT": "0", "GOMP_SPINCOUNT": "3000"}, answer


def test_without_the_plugin_an_agent_says_so_and_its_runner_refuses_a_onednn_model(plugin, tmp_path):
    """No plugin (none built, or TUNEFARM_ONEDNN_PLUGIN=off): the agent's probe reports oneDNN unavailable with the
    reason, and the TVM runner answers 'not available' with what to do for a library with oneDNN parts, instead
    of a loader error from deep inside TVM."""
    import subprocess
    import sys

    import tvm

    _, mod, x, _ = _offload_mixed()
    model = tmp_path / "mixed.so"
    tvm.compile(mod, tvm.target.Target({"kind": "llvm"})).export_library(str(model))
    np.savez(tmp_path / "inputs.npz", data=x)
    script = ("import json, sys\n"
              "from tunefarm.core import onednn\n"
              "from tunefarm.device_agents import runners\n"
              "print(json.dumps([onednn.probe(), runners.run('tvm', sys.argv[1], sys.argv[2], sys.argv[3], 1, 1, {})]))\n")
    answers = {}
    for name, env in (("none built", {"XDG_CACHE_HOME": str(tmp_path / "empty-cache")}),
                      ("off", {"TUNEFARM_ONEDNN_PLUGIN": "off"})):
        proc = subprocess.run([sys.executable, "-c", script, str(model), str(tmp_path / "inputs.npz"),
                               str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=300,
                              env={**__import__("os").environ, **env}, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        answers[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    probe, run = answers["none built"]
    assert probe == {"available": False, "reason": "no plugin built for this TVM (tunefarm runtime onednn)"}, probe
    assert run["available"] is False and "no oneDNN plugin" in run["reason"], run
    probe, run = answers["off"]
    assert probe["available"] is False and "TUNEFARM_ONEDNN_PLUGIN=off" in probe["reason"], probe
    assert run["available"] is False and "tunefarm runtime onednn" in run["reason"], run
