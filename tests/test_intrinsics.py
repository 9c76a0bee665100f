"""tunefarm.host.tuning.intrinsics: a target's tensor intrinsics loaded instead of every architecture's.

Each check runs in a fresh interpreter (the test process may have imported TVM's whole package already): real
TVM, real design-space generation by MetaSchedule's default rules for this machine's CPU."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

CHECK = r"""
import json, sys, time
import tvm
from tvm import te
from tvm.s_tir import TensorIntrin, meta_schedule as ms
from tunefarm.host.tuning import intrinsics

cpu = tvm.target.Target({"kind": "llvm", "num-cores": 1})
out = {"names": intrinsics.submodules_for(cpu)}
t0 = time.monotonic()
out["loaded_for_cpu"] = intrinsics.load_for(cpu)
out["load_s"] = time.monotonic() - t0
out["after_cpu"] = intrinsics.loaded()
out["avx512"] = TensorIntrin.get("dot_16x4_avx512", allow_missing=True) is not None
out["wmma_before"] = TensorIntrin.get("wmma_sync_16x16x16_f16f16f32", allow_missing=True) is not None
# MetaSchedule's stock import (TuneContext runs it) is now a no-op; the default CPU space still generates.
a = te.placeholder((16, 16), name="a")
b = te.placeholder((16, 16), name="b")
k = te.reduce_axis((0, 16), name="k")
c = te.compute((16, 16), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="c")
mod = tvm.IRModule({"main": te.create_prim_func([a, b, c])})
ctx = ms.TuneContext(mod=mod, target=cpu, space_generator="post-order-apply", search_strategy="replay-trace",
                     task_name="mm")
out["spaces"] = len(ctx.generate_design_space())
out["after_context"] = intrinsics.loaded()
out["metal"] = intrinsics.load_for(tvm.target.Target("metal"))
out["after_metal"] = intrinsics.loaded()
print(json.dumps(out))
"""


def _run(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_cpu_target_loads_its_own_intrinsics_and_tuning_contexts_work():
    import tvm

    from tunefarm.host.tuning.intrinsics import submodules_for

    if submodules_for(tvm.target.Target("llvm")) != ("x86",):
        pytest.skip("this check names x86's intrinsics; this machine is not x86")
    got = _run(CHECK)
    assert got["names"] == ["x86"] and got["loaded_for_cpu"] == ["x86"]
    assert got["after_cpu"] == ["x86"] and got["avx512"] and not got["wmma_before"]
    assert got["spaces"] >= 1 and got["after_context"] == ["x86"]  # TuneContext imported nothing more
    assert got["metal"] == ["metal"] and got["after_metal"] == ["metal", "x86"]  # each target adds its own


def test_kinds_and_triples_map_to_submodules_or_to_the_whole_package():
    import tvm

    from tunefarm.host.tuning.intrinsics import submodules_for

    assert submodules_for(tvm.target.Target("cuda")) == ("cuda",)
    assert submodules_for(tvm.target.Target("rocm")) == ("rocm",)
    assert submodules_for(tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"})) == ("arm_cpu",)
    assert submodules_for(tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-pc-linux-gnu"})) == ("x86",)
    assert submodules_for(tvm.target.Target({"kind": "llvm", "mtriple": "riscv64-unknown-linux-gnu"})) == (
        "riscv_cpu",)
    assert submodules_for(tvm.target.Target({"kind": "llvm", "mtriple": "powerpc64le-linux-gnu"})) is None
    assert submodules_for(tvm.target.Target("opencl")) is None  # anything else: stock, every architecture
