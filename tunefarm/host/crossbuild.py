"""Build a model on the host for a device target, without the device: tuned records or default schedules.

Used for devices whose kernels this host can compile but not run, such as an Intel iGPU through OpenCL
(the PyPI wheel's compiler emits OpenCL C while its runtime cannot run it). The module is fused as the
farm fuses it for tuning (``tuning.fuse_for_tuning``); a tuning job's database is applied to exactly
that module when given, and every TIR function left without a record gets dlight's default GPU
schedule (GPU targets); then ``tvm.compile`` and ``export_library``. The device loads the library with a
TVM runtime that has the target's runtime (for OpenCL: built with ``USE_OPENCL=ON``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def default_gpu_schedules(mod, target):
    """dlight's default GPU schedules for every TIR function that has none yet."""
    from tvm.s_tir import dlight as dl  # pylint: disable=import-outside-toplevel

    with target:
        return dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                       dl.gpu.GeneralReduction(), dl.gpu.Fallback())(mod)


def device_sources(executable) -> dict[str, str]:
    """Device code kind (``opencl``, ``cuda``, ...) -> its generated source, from a compiled executable."""
    sources: dict[str, str] = {}
    todo = list(executable.mod.imports)
    while todo:
        module = todo.pop()
        todo.extend(module.imports)
        if module.kind not in ("llvm", "c", "relax.VMExecutable", "static_library"):
            sources[module.kind] = sources.get(module.kind, "") + module.inspect_source()
    return sources


def cross_build(mod, target, output: str | Path, database=None) -> dict[str, Any]:
    """Compile the fused module ``mod`` for ``target`` and export it to ``output`` (a ``.so``).

    Returns ``{"path", "scheduled", "unscheduled", "tuned", "sources"}``: which TIR functions carry a
    schedule (tuned or default) and the generated device source by kind.
    """
    # pylint: disable=import-outside-toplevel
    import tvm

    from tunefarm.host.tuning.evaluate import apply_database

    tuned: list[str] = []
    if database is not None:
        mod, tuned, _ = apply_database(mod, target, database)
    if "gpu" in target.keys:
        mod = default_gpu_schedules(mod, target)
    scheduled, unscheduled = [], []
    for gvar, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc):
            flag = func.attrs is not None and "tirx.is_scheduled" in func.attrs and bool(func.attrs["tirx.is_scheduled"])
            (scheduled if flag else unscheduled).append(gvar.name_hint)
    executable = tvm.compile(mod, target)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    executable.export_library(str(output))
    return {"path": str(output), "scheduled": sorted(scheduled), "unscheduled": sorted(unscheduled),
            "tuned": tuned, "sources": device_sources(executable)}
