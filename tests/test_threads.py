"""Threads: every agent decides its TVM runtime's thread count, sets it, reports it, and its peers use it."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import HOST, listed_agents, run_cli
from tunefarm.core import threads
from tunefarm.core.threads import THREADS_ENV, core_order, parse_threads, resolve_threads, threads_per_core, usable_cores


def test_usable_cores_counts_the_affinity_mask():
    cores = usable_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert usable_cores() == 1
    finally:
        os.sched_setaffinity(0, before)


def test_core_order_keeps_a_cores_hardware_threads_side_by_side(monkeypatch):
    # this machine's own topology: a permutation in which each physical core's CPUs are contiguous
    cpus = sorted(os.sched_getaffinity(0))
    order = core_order(cpus)
    assert sorted(order) == cpus
    cores = [threads.core_of(cpu) for cpu in order]
    assert all(cores.index(c) + cores.count(c) - 1 == len(cores) - 1 - cores[::-1].index(c) for c in cores)
    # SMT numbered as Linux often does (siblings N and N + 4 on 4 cores): slices of two are whole cores
    monkeypatch.setattr(threads, "core_of", lambda cpu: ("0", str(cpu % 4)))
    assert core_order(range(8)) == [0, 4, 1, 5, 2, 6, 3, 7]
    assert core_order([5, 1, 2]) == [1, 5, 2]
    assert threads_per_core(range(8)) == 2 and threads_per_core([0, 1]) == 1


def test_resolve_threads_order(monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert resolve_threads(None) == (usable_cores(), "the cores this process may run on")
    assert resolve_threads(None, {"kind": "llvm", "num-cores": 3}) == (3, "the target's num-cores")
    assert resolve_threads(None, {"kind": "cuda", "num-cores": 3})[0] == usable_cores()
    monkeypatch.setenv(THREADS_ENV, "5")
    assert resolve_threads(None, {"kind": "llvm", "num-cores": 3}) == (5, f"${THREADS_ENV}")
    assert resolve_threads(7, {"kind": "llvm", "num-cores": 3}) == (7, "--threads")
    for bad in ("0", "-2", "two", "1e9"):
        with pytest.raises(ValueError, match="must be"):
            parse_threads(bad, "--threads")


def _tiny_onnx(path):
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "relu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_agents_set_report_and_use_their_threads(tracker, start_agent, tmp_path, monkeypatch):
    """The runtime's own thread count, asked over RPC, is what the agent reports, its target's num-cores,
    and what its ONNX Runtime runner uses; --threads overrides the machine's count."""
    from tunefarm.tracker.client import request_rpc_session

    monkeypatch.delenv(THREADS_ENV, raising=False)
    host, port = tracker
    start_agent(host, port, "all-cores", tmp_path / "all.log")
    start_agent(host, port, "one-thread", tmp_path / "one.log", extra_args=["--threads", "1"])
    onnx_file = tmp_path / "relu.onnx"
    _tiny_onnx(onnx_file)
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=np.linspace(-1, 1, 8, dtype=np.float32).reshape(1, 8))
    for key, want in (("all-cores", usable_cores()), ("one-thread", 1)):
        (info,) = listed_agents(host, port, key)
        assert info.threads == want and info.target["num-cores"] == want
        session = request_rpc_session(host, port, key, priority=1, session_timeout=60)
        try:
            assert int(session.get_function("runtime.NumThreads")()) == want
            session.upload(str(onnx_file), "model.onnx")
            session.upload(str(inputs), "inputs.npz")
            result = json.loads(session.get_function("tunefarm.runner.run")("onnxruntime", "model.onnx", "inputs.npz",
                                                                              1, 5, "{}"))
            assert result["threads"] == want, result
        finally:
            del session
    assert "threads  1 (--threads;" in (tmp_path / "one.log").read_text()

    code, table, _ = run_cli(["devices", "--tracker", f"{host}:{port}"], tmp_path / "devices.txt")
    assert code == 0 and "1 threads" in table and f"{usable_cores()} threads" in table
    code, output, _ = run_cli(["agent", "--tracker", f"{host}:{port}", "--key", "bad", "--host", HOST,
                               "--threads", "0"], tmp_path / "bad.log")
    assert code != 0
    assert [l for l in output.splitlines() if l.strip()] == [
        "tunefarm: error: --threads must be between 1 and 4096, got 0"]


_THREAD_MASKS = r'''
import os, numpy as np, tvm
from tvm import te
a = te.placeholder((1 << 20,), name="a")
b = te.compute(a.shape, lambda i: a[i] * 2.0, name="b")
sch = tvm.s_tir.Schedule(te.create_prim_func([a, b]))
sch.parallel(sch.get_loops(sch.get_sblock("b"))[0])
lib = tvm.compile(sch.mod, target="llvm")
x = tvm.runtime.tensor(np.ones(1 << 20, "float32")); y = tvm.runtime.tensor(np.zeros(1 << 20, "float32"))
lib["main"](x, y)
assert float(y.numpy()[0]) == 2.0
for tid in os.listdir("/proc/self/task"):
    status = open(f"/proc/self/task/{tid}/status").read()
    print(next(l.split(":", 1)[1].strip() for l in status.splitlines() if l.startswith("Cpus_allowed_list")))
'''


def test_a_pinned_tvm_process_keeps_its_threads_on_its_cpus():
    """TVM binds its pool's threads to CPUs of its own choosing, outside the process's mask (with 2 threads
    under ``taskset -c 0``: the main thread widened to every CPU, the pool's bound to CPU 1); the environment
    the farm gives a pinned process keeps them inside."""
    import subprocess
    import sys

    from tunefarm.core.threads import BIND_ENV, confined, keep_tvm_threads_inside

    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or len(cpus) < (os.cpu_count() or 0):
        pytest.skip("needs a process that may run on every CPU of a machine of 2 or more")
    assert not confined() and confined({cpus[0]})
    assert BIND_ENV not in keep_tvm_threads_inside({}, set(cpus))  # the whole machine: TVM's own binding
    assert keep_tvm_threads_inside({BIND_ENV: "1"}, {cpus[0]})[BIND_ENV] == "1"  # the user's word stands
    pinned = cpus[0]
    env = keep_tvm_threads_inside(dict(os.environ, **{THREADS_ENV: "2"}), {pinned})
    out = subprocess.run([sys.executable, "-c", _THREAD_MASKS], env=env, capture_output=True, text=True,
                         timeout=300, preexec_fn=lambda: os.sched_setaffinity(0, {pinned}), check=True).stdout
    masks = out.split()
    assert len(masks) >= 2, out  # the main thread and TVM's pool thread at least
    assert set(masks) == {str(pinned)}, masks


def test_a_model_mixing_onednn_and_tvm_gets_short_spins_and_the_runner_finds_its_onednn_parts(tmp_path):
    """thread_env sizes both pools and leaves their waiting alone; a model with oneDNN parts (found by the DNNL
    runtime's module kind in the library, across a read-chunk boundary too) gets MIXED_POOLS, where the environment
    does not set them itself."""
    from tunefarm.device_agents.runners.tvm import ONEDNN_MODULE_KIND, file_mentions

    assert threads.thread_env(3) == {"TVM_NUM_THREADS": "3", "OMP_NUM_THREADS": "3"}
    assert threads.mixed_pool_env({}) == {"TVM_THREAD_POOL_SPIN_COUNT": "0", "GOMP_SPINCOUNT": "3000"}
    assert threads.mixed_pool_env({"GOMP_SPINCOUNT": "0"}) == {"TVM_THREAD_POOL_SPIN_COUNT": "0",
                                                               "GOMP_SPINCOUNT": "0"}
    lib = tmp_path / "lib.so"
    for at in (0, 5, 9, 10, 11, 30):  # chunk of 10 bytes: the kind starts before, at and after a boundary
        lib.write_bytes(b"x" * at + ONEDNN_MODULE_KIND + b"y" * 7)
        assert file_mentions(str(lib), ONEDNN_MODULE_KIND, chunk=10), at
    lib.write_bytes(b"dnnl_jso" + b"N" * 3 + b"dnnl_" * 20)
    assert not file_mentions(str(lib), ONEDNN_MODULE_KIND, chunk=10)
    assert not file_mentions(str(tmp_path / "missing.so"), ONEDNN_MODULE_KIND)


def test_a_row_may_ask_for_the_libraries_own_spins_and_nothing_else():
    """``pool_spin`` (the placement's spin probe): ``mixed`` (the default for a oneDNN model) or ``stock``; any other
    value is refused before a session starts, in one line."""
    from tunefarm.core.threads import POOL_SPINS
    from tunefarm.device_agents.runners.tvm import TVMRunner

    assert POOL_SPINS == ("mixed", "stock")
    for spin in POOL_SPINS:
        assert TVMRunner.unavailable_reason({"pool_spin": spin}) is None
    for bad in ("spin", "", None, ["mixed"], "mixed; rm -rf /"):
        why = TVMRunner.unavailable_reason({"pool_spin": bad})
        assert why == "unknown pool_spin for a TVM build (mixed or stock)", (bad, why)
