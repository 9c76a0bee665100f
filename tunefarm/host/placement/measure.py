"""Per-group measurement: every distinct group a vendor can run, built on the vendor and as TVM's tuned kernel,
both run on the comparison's agent, checked against a host reference, and placed on the faster (see the
package's text)."""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tunefarm.host.comparator import MeasureSettings, Row, RowResult

GROUP_SETTINGS = MeasureSettings(warmup=5, repeat=30, budget_s=15.0)  # per build of one group
ON_TVM, NO_RECORD, UNTUNED = "tvm", "no record", "untuned"


@dataclasses.dataclass
class GroupModule:
    """One distinct group: its codegen's description, how often the model has it, and a module of just it."""

    vendor: str
    key: str
    group: Any  # the codegen's Group (composite, op, shapes, attrs, flops)
    count: int
    mod: Any  # tvm.IRModule whose main runs the group's operators (weights as constants)


def group_modules(graph_mod, vendor) -> list[GroupModule]:
    """The distinct groups of ``graph_mod`` that ``vendor`` can run, in the model's order."""
    # pylint: disable=import-outside-toplevel
    import tvm
    from tvm import relax

    codegen = vendor.codegen()
    folded = relax.transform.FoldConstant()(graph_mod)
    part = relax.transform.FuseOpsByPattern(codegen.patterns(), bind_constants=True, annotate_codegen=False)(folded)
    calls: dict[str, int] = {}

    def count(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.GlobalVar):
            calls[expr.op.name_hint] = calls.get(expr.op.name_hint, 0) + 1

    relax.analysis.post_order_visit(part["main"].body, count)
    order = {name: i for i, name in enumerate(calls)}  # first call of each function, in the model's order
    found: dict[str, GroupModule] = {}
    first: dict[str, int] = {}
    for gvar, func in part.functions.items():
        if not isinstance(func, relax.Function) or func.attrs is None or "Composite" not in func.attrs:
            continue
        fn = func.without_attr("Composite").without_attr("Primitive").with_attr("global_symbol", "main")
        mod = tvm.IRModule({"main": fn})
        groups = codegen.candidate_groups(mod, fold_constants=False)
        if len(groups) != 1:
            continue
        key = groups[0].key()
        n = calls.get(gvar.name_hint, 0)
        if key in found:
            found[key].count += n
        else:
            found[key] = GroupModule(vendor.name, key, groups[0], n, mod)
            first[key] = order.get(gvar.name_hint, len(order))
    return sorted(found.values(), key=lambda g: first[g.key])


CAPTURE_PREFIX = "placement_negate"  # the kernels :func:`captured` adds around a group (never tuned, not the group's)


def _negate(shape: list[int], dtype: str):
    """A kernel that negates a tensor (exact in floating point; opaque, so FuseOps keeps it apart from the group)."""
    from tvm import te  # pylint: disable=import-outside-toplevel

    src = te.placeholder(shape, dtype, name="src")
    dst = te.compute(shape, lambda *i: -src(*i), name="dst")
    return te.create_prim_func([src, dst]).with_attr("op_pattern", 8).without_attr("global_symbol")


def captured(mod):
    """A group module for timing on a CUDA device, where the builds replay Relax CUDA graphs: each input and the
    output negated twice by kernels of their own around the group, so that the group's launches read and write
    static buffers and Relax's CUDA-graph rewriting captures them (with one negation each side). A group alone is one
    call on the function's own input and output, which the rewriting never captures: timed so, a cuDNN call costs
    its per-call host setup (0.1-0.3 ms on an H100, against 5-10 us of kernel) that the captured whole model does
    not pay (bench/results/gpu-nvidia-h100-80gb-hbm3-resnet18-fp16-nhwc.md). Both sides of a group get the same
    four extra kernels; the outputs are the group's, exactly."""
    # pylint: disable=import-outside-toplevel
    import tvm
    from tvm import relax

    from tunefarm.host.byoc.json_codegen import static_shape

    fn = mod["main"]
    b = relax.BlockBuilder(tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv.name_hint != "main"}))
    body = b.add_func(fn.without_attr("global_symbol"), "placement_group")
    negates: dict[tuple, Any] = {}

    def negate(expr, ty):
        key = (tuple(int(d) for d in static_shape(ty)), str(ty.dtype))
        if key not in negates:
            negates[key] = b.add_func(_negate(list(key[0]), key[1]), f"{CAPTURE_PREFIX}{len(negates)}")
        return b.emit(relax.call_tir(negates[key], [expr], relax.TensorType(list(key[0]), key[1])))

    params = [relax.Var(p.name, p.ty) for p in fn.params]
    with b.function("main", params):
        with b.dataflow():
            out = b.emit(relax.Call(body, [negate(negate(p, p.ty), p.ty) for p in params]))
            out = b.emit_output(negate(negate(out, out.ty), out.ty))
        b.emit_func_output(out)
    return relax.transform.InlinePrivateFunctions()(b.get())


def for_device(gm: GroupModule, device: str) -> GroupModule:
    """``gm`` as it is timed on ``device`` (:func:`captured` on CUDA, where the builds use CUDA graphs)."""
    return dataclasses.replace(gm, mod=captured(gm.mod)) if device == "cuda" else gm


def _inputs(mod, seed: int) -> list[np.ndarray]:
    from tunefarm.host.byoc.json_codegen import static_shape  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(seed)
    return [rng.standard_normal(static_shape(p.ty)).astype(str(p.ty.dtype)) for p in mod["main"].params]


def _reference(mod, pipeline, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """The group's outputs on this host: TVM's plain legalised build (no records, no vendor) for the host's
    own CPU, an implementation apart from both that are measured."""
    # pylint: disable=import-outside-toplevel
    import tvm
    from tvm import relax

    from tunefarm.host.tuning.pipeline import compile_module

    host = tvm.target.Target("llvm")
    ex = compile_module(pipeline.lower(mod, host), host)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(x) for x in inputs])
    return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]


class GroupArtifacts:
    """What the Comparator needs of a "model" for a group's rows: a name, an inputs file, a reference."""

    def __init__(self, name: str, inputs: list[np.ndarray], reference: list[np.ndarray], work_dir: Path):
        self.name = name
        self.reference = reference
        self._inputs = work_dir / f"{name}-inputs.npz"
        np.savez(self._inputs, **{f"input{i}": x for i, x in enumerate(inputs)})

    def inputs_file(self) -> str:
        return str(self._inputs)

    def model_file(self, fmt: str) -> str:  # pragma: no cover - group rows always bring their build
        raise ValueError(f"a group row brings its own build (asked for {fmt})")


def _median(res: RowResult) -> float | None:
    ok = res.ok and res.numerics is not None and res.numerics.get("ok")
    return float(res.latency["median_ms"]) if ok else None


def _why_not(res: RowResult) -> str:
    if not res.ok:
        return f"{res.status}: {res.reason}"
    return "output differs from the reference"


def _group_rows(comparator, key: str, name: str, gm: GroupModule, index: int, builds: dict[str, Any], work: Path,
                pipeline, *, device: str, rtol: float, atol: float) -> list[RowResult]:
    """Run ``builds`` (side -> executable: "tvm", "vendor") of one group as rows of one comparison on the
    comparator's pinned agent of ``key``, checked against the host's reference: their results, in that order."""
    inputs = _inputs(gm.mod, seed=index)
    reference = _reference(gm.mod, pipeline, inputs)
    rows = []
    for side, ex in builds.items():
        lib = str(work / f"{name}-{side}.so")
        ex.export_library(lib)
        label = f"{name} tvm" if side == "tvm" else f"{name} {gm.vendor}"
        rows.append(Row("tvm-tuned" if side == "tvm" else "tvm-vendor", key, label=label,
                        options={"device": device, "precision": pipeline.precision}, rtol=rtol, atol=atol, model_file=lib))
    return comparator.run_and_compare(GroupArtifacts(name, inputs, reference, work), rows)


def group_comparator(comparator):
    """A comparator for group rows: :data:`GROUP_SETTINGS`, the same agents and pinned agent as ``comparator``."""
    from tunefarm.host.comparator import Comparator  # pylint: disable=import-outside-toplevel

    out = Comparator(comparator.agents, GROUP_SETTINGS, comparator.console)
    out.pins = comparator.pins  # the same agent as the comparison's rows
    return out


def vendor_build(gm: GroupModule, target):
    """The group offloaded whole to its vendor, compiled for ``target``."""
    # pylint: disable=import-outside-toplevel
    from tunefarm.host.placement.build import offload
    from tunefarm.host.tuning.pipeline import compile_module

    return compile_module(offload(gm.mod, {gm.vendor: None}), target, cuda_graph=True)  # as build_model: CUDA only


def measure_vendor(comparator, key: str, modules: list[GroupModule], target, pipeline, *, device: str,
                   rtol: float, atol: float, events) -> dict[str, float | None]:
    """The vendor's median milliseconds for each of ``modules`` alone on the comparator's agent of ``key``
    (numerics checked; None where it did not run or differs from the reference), by group key."""
    work = Path(tempfile.mkdtemp(prefix="tunefarm-vendor-"))
    timing = group_comparator(comparator)
    out = {}
    for i, gm in enumerate(modules):
        gm = for_device(gm, device)
        with events.status(f"timing {gm.vendor} on group {i + 1}/{len(modules)} ({gm.group.composite})"):
            ex = vendor_build(gm, target)
        (res,) = _group_rows(timing, key, f"vgroup{i}", gm, i, {"vendor": ex}, work, pipeline, device=device,
                             rtol=rtol, atol=atol)
        out[gm.key] = _median(res)
    return out


def _untuned_task(gm: GroupModule, target, pipeline, task_keys) -> bool:
    """Whether the group's TVM kernel is one of the job's tuning tasks (``task_keys``: their workloads' structural
    hashes, as tasks.json keeps them): then a build without its record runs that kernel untuned in the model too."""
    # pylint: disable=import-outside-toplevel
    import tvm
    import tvm_ffi

    if not task_keys:
        return False
    for gvar, func in pipeline.lower(gm.mod, target).functions.items():
        if isinstance(func, tvm.tirx.PrimFunc) and not gvar.name_hint.startswith(CAPTURE_PREFIX):
            workload = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
            if str(tvm_ffi.structural_hash(workload)) in task_keys:
                return True
    return False


def measure_groups(comparator, key: str, graph_mod, target, pipeline, database, vendors, *, device: str,
                   rtol: float, atol: float, events, task_keys=None) -> list[dict[str, Any]]:
    """Measure and place every distinct group of ``vendors`` in ``graph_mod`` on the comparator's agent of
    ``key``: one entry per group, as placement.json and the report keep them (``placed``: a vendor name or "tvm",
    ``reason`` where the choice was not by time or needs saying). ``task_keys``: the job's tasks (tasks.json's
    keys), to tell a group whose task has no record yet (placed by time: the model would run it untuned too) from
    one TVM fuses otherwise in the model."""
    from tunefarm.host.placement.build import build_model  # pylint: disable=import-outside-toplevel

    work = Path(tempfile.mkdtemp(prefix="tunefarm-place-"))
    timing = group_comparator(comparator)
    entries = []
    modules = [g for v in vendors for g in group_modules(graph_mod, v)]
    for i, gm in enumerate(modules):
        name = f"group{i}"
        gm = for_device(gm, device)
        with events.status(f"placement: building group {i + 1}/{len(modules)} ({gm.group.composite})"):
            ex_tvm, scheduled, unscheduled, _ = build_model(gm.mod, target, pipeline, database, {})
            unscheduled = [f for f in unscheduled if not f.startswith(CAPTURE_PREFIX)]
            ex_vendor = vendor_build(gm, target)
        res_tvm, res_vendor = _group_rows(timing, key, name, gm, i, {"tvm": ex_tvm, "vendor": ex_vendor}, work,
                                          pipeline, device=device, rtol=rtol, atol=atol)
        tvm_ms, vendor_ms = _median(res_tvm), _median(res_vendor)
        record = bool(scheduled) and not unscheduled
        untuned = not record and _untuned_task(gm, target, pipeline, task_keys)
        if untuned and tvm_ms is not None and vendor_ms is not None:
            placed = gm.vendor if vendor_ms < tvm_ms else ON_TVM
            reason = f"{UNTUNED}: its task has no record in this job yet (timed as the model would run it, untuned)"
        elif not record:
            placed, reason = ON_TVM, (f"{NO_RECORD}: TVM fuses this group with other operators in the model "
                                      "(its tuned kernel is not this group's), so it stays with TVM")
        elif vendor_ms is None:
            placed, reason = ON_TVM, f"{gm.vendor} build: {_why_not(res_vendor)}"
        elif tvm_ms is None:
            placed, reason = gm.vendor, f"TVM build: {_why_not(res_tvm)}"
        else:
            placed, reason = (gm.vendor if vendor_ms < tvm_ms else ON_TVM), ""
        g = gm.group
        entries.append({"key": gm.key, "backend": gm.vendor, "composite": g.composite, "op": g.op,
                        "shapes": {k: list(v) for k, v in g.shapes.items()}, "attrs": {k: list(v) if isinstance(
                            v, tuple) else v for k, v in g.attrs.items()}, "count": gm.count, "flops": g.flops,
                        "tvm_ms": tvm_ms, "vendor_ms": vendor_ms, "tvm_record": record or untuned, "placed": placed,
                        "reason": reason, "agent": res_vendor.agent or res_tvm.agent,
                        "threads": res_vendor.threads or res_tvm.threads,
                        "tvm_numerics": res_tvm.numerics, "vendor_numerics": res_vendor.numerics})
    return entries
