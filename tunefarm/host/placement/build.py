"""Building a model with some operator groups on vendor libraries and the rest as the job's tuned TVM kernels.

:func:`build_model` is the one way the farm builds a placed model: the job's evaluation (every row: all-TVM,
all-vendor, placed) and :func:`tunefarm.host.placement.apply.compile_pulled` (a pulled job) both call it, so a
pulled model is built exactly as the evaluation timed it.
"""
from __future__ import annotations

from typing import Any, Callable

from tunefarm.host.placement.vendors import VENDORS


def offload(graph_mod, chosen: dict[str, Callable[[Any], bool] | None]):
    """``graph_mod`` (a pipeline's graph-level module, weights bound) with the groups each vendor's ``select``
    accepts (None: every group it can run) partitioned to that vendor and its codegen run; ``chosen`` maps vendor
    names to selects. An empty ``chosen`` returns the module unchanged."""
    # pylint: disable=import-outside-toplevel
    from tvm import relax

    if not chosen:
        return graph_mod
    mod = graph_mod
    for name, select in chosen.items():
        codegen = VENDORS[name].codegen()
        codegen.register()
        mod = codegen.partition(mod, select)
    return relax.transform.RunCodegen()(mod)


def selecting(keys) -> Callable[[Any], bool]:
    """A select that accepts exactly the groups whose ``key()`` is in ``keys``."""
    wanted = set(keys)
    return lambda group: group.key() in wanted


def build_model(graph_mod, target, pipeline, database, offloaded: dict[str, list[str] | None]):
    """Compile ``graph_mod`` with ``offloaded`` (vendor -> group keys, None: all it can run) on the vendors and the
    rest lowered by ``pipeline`` with ``database``'s records applied: (executable, scheduled names, unscheduled
    names, number of vendor modules)."""
    from tunefarm.host.tuning.pipeline import apply_records, compile_module  # pylint: disable=import-outside-toplevel

    chosen = {name: (None if keys is None else selecting(keys)) for name, keys in offloaded.items()}
    mod = offload(graph_mod, chosen)
    external = len(mod.attrs["external_mods"]) if mod.attrs and "external_mods" in mod.attrs else 0
    applied, scheduled, unscheduled = apply_records(pipeline.lower(mod, target), target, database)
    # On a CUDA target with Relax's CUDA graphs: a vendor call through its JSON runtime costs 0.13-0.28 ms of host
    # time per call against 5-10 us of kernel (cuDNN on an H100: bench/results/gpu-cuda-libs-*-resnet18.md); in a
    # graph the launches are replayed and the kernels are what is timed, for the groups and the whole builds alike.
    return compile_module(applied, target, cuda_graph=True), scheduled, unscheduled, external
