"""oneDNN as a farm backend on the host: the ``relax.ext.dnnl`` codegen and the partition that offloads to it.

What the DNNL JSON runtime of TVM 0.27 runs (src/runtime/extra/contrib/dnnl/dnnl_json_runtime.cc), and so what
is offloaded, fp32 only:

* ``conv2d`` (NCHW data, OIHW weight, any strides/padding/dilation/groups; or channel-blocked NCHW{b}c data
  with OIHW{b}i{b}o weights, and depthwise ones with OIHW1i{b}o weights) with, in this order, a bias add
  (a ``(1, O, 1, 1)`` or ``(O, 1, 1)`` operand), a residual add (an operand of the output's shape) and a ReLU:
  composites ``dnnl.conv2d[_bias][_sum][_relu|_clip]``. The runtime reads its post-ops from the name and applies
  the sum before the ReLU, so only ``relu(conv + bias + residual)`` is fused; ``relu(conv) + residual`` becomes
  ``dnnl.conv2d_relu`` and a TVM add. ``_clip`` is ReLU6 (``clip(x, 0, 6)``, MobileNets), constant bounds only.
* dense as PyTorch exports ``nn.Linear``: ``matmul(x, permute_dims(w))`` with ``x`` (M, K), ``w`` (N, K),
  optional bias (N,) and ReLU: ``dnnl.dense[_bias][_relu]`` (oneDNN's inner product).
* a plain 2-D ``matmul(x, w)``: the runtime's ``nn.batch_matmul`` kernel (oneDNN's matmul), ``dnnl.matmul``; a bias
  add after it stays with TVM (that kernel drops a bias: its op name must be exactly ``nn.batch_matmul``, and
  ``ParseAttrs`` then resets the bias it was given by index).

Weights bound as constants (:func:`partition`'s defaults: constants folded first, ``bind_constants=True``) go to
oneDNN once, at the module's initialisation, and it reorders them into its blocked layout then (the prepacking ONNX
Runtime also does; checked with ``DNNL_VERBOSE=1``: no weight reorder per call). Activations are another matter:
the runtime keeps tensors between kernels in plain NCHW and oneDNN's convs want NHWC (``acdb``) here, so every
offloaded conv reorders its input and output on every call (48 reorders per ResNet-18 run; in a verbose,
loaded run they took about twice the convs' own time). An NHWC graph would avoid them; not done yet.

For the placement step, every candidate group is described (:func:`candidate_groups`: its composite, shapes,
FLOPs) and :func:`partition` takes a ``select`` predicate over those descriptions, so a caller can offload exactly
the groups that measured faster on oneDNN.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable

import tvm
from tvm import relax
from tvm.relax.backend.utils import has_leaking_intermediate_variables
from tvm.relax.dpl import is_op, wildcard
from tvm.relax.transform import FusionPattern

from tunefarm.core import onednn
from tunefarm.host.byoc.json_codegen import (Group, Kernel, call_attrs, calls_of, register as register_json_codegen,
                                             role_operands as _role_operands, static_shape)

CODEGEN = "dnnl"


# ---------------------------------------------------------------- patterns


def _conv_pattern(bias: bool, residual: bool, relu: bool | str):
    data, weight = wildcard(), wildcard()
    out = is_op("relax.nn.conv2d")(data, weight)
    ann = {"root": out, "data": data, "weight": weight}
    if bias:
        b = wildcard()
        out = is_op("relax.add")(out, b)
        ann["bias"] = b
    if residual:
        r = wildcard()
        out = is_op("relax.add")(out, r) | is_op("relax.add")(r, out)
        ann["residual"] = r
    if relu == "clip":  # ReLU6 as PyTorch exports it (MobileNets): clip(x, 0, 6), bounds as PrimValues
        lo, hi = wildcard(), wildcard()
        out = is_op("relax.clip")(out, lo, hi)
        ann["clip"] = out
    elif relu:
        out = is_op("relax.nn.relu")(out)
    return out, ann


def _dense_pattern(bias: bool, relu: bool, transposed: bool):
    data, weight = wildcard(), wildcard()
    rhs = is_op("relax.permute_dims")(weight) if transposed else weight
    out = is_op("relax.matmul")(data, rhs)
    ann = {"root": out, "data": data, "weight": weight}
    if transposed:
        ann["perm"] = rhs
    if bias:
        b = wildcard()
        out = is_op("relax.add")(out, b)
        ann["bias"] = b
    if relu:
        out = is_op("relax.nn.relu")(out)
    return out, ann


def _composite_name(op: str, bias: bool, residual: bool, relu: bool | str) -> str:
    act = "_clip" if relu == "clip" else "_relu" if relu else ""
    return f"{CODEGEN}.{op}" + ("_bias" if bias else "") + ("_sum" if residual else "") + act


def _variants():
    """(name, pattern, annotations, op): longest first, so a chain is taken whole where it can be."""
    out = []
    for bias in (True, False):
        for residual in (True, False):
            for relu in (True, "clip", False):
                out.append((_composite_name("conv2d", bias, residual, relu), *_conv_pattern(bias, residual, relu),
                            "conv2d"))
    for bias in (True, False):
        for relu in (True, False):
            out.append((_composite_name("dense", bias, False, relu), *_dense_pattern(bias, relu, True), "dense"))
    # A plain matmul without its bias: the runtime's nn.batch_matmul kernel drops a bias given by "bias_idx"
    # (ParseAttrs resets it from the op's name, which must be exactly "nn.batch_matmul"): measured 0.57 relative
    # error with it, so the bias add stays with TVM.
    out.append((_composite_name("matmul", False, False, False), *_dense_pattern(False, False, False), "matmul"))
    out.sort(key=lambda v: -len(v[0]))
    return out


def _shape(expr) -> tuple | None:
    try:
        return tuple(static_shape(expr.ty))
    except (ValueError, AttributeError):
        return None


def _fp32(expr) -> bool:
    dtype = getattr(expr.ty, "dtype", None)
    return str(getattr(dtype, "dtype", dtype)) == "float32"


def _clip_bounds(call) -> tuple[float, float] | None:
    """``clip(x, lo, hi)``'s bounds where both are constant numbers (FloatImm / IntImm, or a PrimValue of one)."""
    out = []
    for arg in call.args[1:3]:
        value = getattr(arg, "value", None)
        value = getattr(value, "value", value)  # a PrimValue wraps the immediate
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        out.append(float(value))
    return (out[0], out[1]) if len(out) == 2 else None


_BLOCKED = re.compile(r"NCHW(\d+)c\Z")
_BLOCKED_WEIGHT = re.compile(r"OIHW(\d+)i(\d+)o\Z")


def conv_layout(attrs: dict, shapes: dict) -> tuple[int, ...] | None:
    """``(n, out channels, out h, out w, in channels per group, kh, kw)`` of a conv2d whose layouts the runtime
    takes: NCHW data with OIHW weights, or channel-blocked NCHW{b}c data with OIHW{b}i{b}o weights (the layout
    oneDNN's own kernels use on AVX2/AVX-512: no reorder between such convs); None otherwise."""
    data_layout, kernel_layout = attrs.get("data_layout"), attrs.get("kernel_layout")
    if attrs.get("out_layout") not in (data_layout, ""):
        return None
    if data_layout == "NCHW" and kernel_layout == "OIHW":
        n, o, h, w = shapes["out"]
        _, cin_g, kh, kw = shapes["weight"]
        return n, o, h, w, cin_g, kh, kw
    blocked, weight = _BLOCKED.match(data_layout or ""), _BLOCKED_WEIGHT.match(kernel_layout or "")
    if not blocked or not weight:
        return None
    if len(shapes["out"]) != 5 or len(shapes["weight"]) != 6 or len(shapes.get("data") or ()) != 5:
        return None
    n, oc, h, w, ob = shapes["out"]
    o_outer, i_outer, kh, kw, ib, wob = shapes["weight"]
    if ob != int(blocked.group(1)) or (ib, wob) != (int(weight.group(1)), int(weight.group(2))) or wob != ob:
        return None
    groups = int(attrs.get("groups", 1))
    if groups != 1:
        # Depthwise only (MobileNets): one input channel per group, OIHW1i{b}o weights (pipeline.blocked_layouts);
        # the runtime splits O into groups itself (G, O/G, 1, kh, kw), on oneDNN's blocked depthwise kernels.
        channels = shapes["data"][1] * shapes["data"][4]
        if (i_outer, ib) != (1, 1) or groups != channels or groups != oc * ob:
            return None
    return n, oc * ob, h, w, i_outer * ib, kh, kw


def conv_bias_shapes(out: tuple, channels: int) -> tuple[tuple, ...]:
    """The bias shapes the runtime takes for a conv with output shape ``out`` (it squeezes the bias to 1-D)."""
    if len(out) == 5:
        return ((1, out[1], 1, 1, out[4]),)
    return ((1, channels, 1, 1), (channels, 1, 1))


def describe(op: str, composite: str, ann: dict) -> Group | None:
    """The Group for a match (annotated expressions by role), or None where oneDNN's runtime cannot run it."""
    root = ann["root"]
    data, weight = ann["data"], ann["weight"]
    shapes = {"data": _shape(data), "weight": _shape(weight), "out": _shape(root)}
    if any(s is None for s in shapes.values()) or not all(_fp32(e) for e in (data, weight, root)):
        return None
    attrs: dict[str, Any] = {}
    if op == "conv2d":
        a = call_attrs(root)
        layout = conv_layout(a, shapes)
        if layout is None or a.get("out_dtype") not in ("", "float32", "void"):
            return None
        attrs = {"strides": tuple(a["strides"]), "padding": tuple(a["padding"]), "dilation": tuple(a["dilation"]),
                 "groups": int(a["groups"])}
        if "clip" in ann:
            bounds = _clip_bounds(ann["clip"])
            if bounds is None:
                return None
            attrs["clip"] = bounds
        n, o, h, w, cin_g, kh, kw = layout
        flops = 2 * n * o * h * w * cin_g * kh * kw
        channels = o
    else:
        if len(shapes["data"]) != 2 or len(shapes["weight"]) != 2 or len(shapes["out"]) != 2:
            return None
        if op == "dense":
            axes = call_attrs(ann["perm"]).get("axes")
            if axes not in ("", None, [1, 0]):
                return None
        m, n_out = shapes["out"]
        k = shapes["data"][1]
        flops = 2 * m * n_out * k
        channels = n_out
    if "bias" in ann:
        bias = ann["bias"]
        bshape = _shape(bias)
        ok = {"conv2d": conv_bias_shapes(shapes["out"], channels), "dense": ((channels,), (1, channels)),
              "matmul": ((channels,), (1, channels))}[op]
        if bshape not in ok or not _fp32(bias):
            return None
        shapes["bias"] = bshape
    if "residual" in ann:
        res = ann["residual"]
        if _shape(res) != shapes["out"] or not _fp32(res):
            return None
        shapes["residual"] = _shape(res)
    return Group(composite, op, {k: tuple(v) for k, v in shapes.items()}, attrs, int(flops),
                 isinstance(weight, tvm.ir.Constant))


def _annotated(context) -> dict:
    return {str(k): v for k, v in context.annotated_expr.items()}


def patterns(select: Callable[[Group], bool] | None = None) -> list[FusionPattern]:
    """The oneDNN fusion patterns; each match is offloaded only if oneDNN can run it and ``select(group)`` agrees.
    A refused chain is offered again as its shorter chains (conv+bias+relu, then conv+bias, then conv; a refused
    Linear as a plain matmul of the transposed weight), so ``select`` decides on every group oneDNN could take."""
    out = []
    for name, pattern, ann, op in _variants():
        def check(context, _name=name, _op=op) -> bool:
            if has_leaking_intermediate_variables(context):
                return False
            group = describe(_op, _name, _annotated(context))
            return group is not None and (select is None or bool(select(group)))

        out.append(FusionPattern(name, pattern, ann, check))
    return out


# ---------------------------------------------------------------- the codegen


def lower(composite: str, fn: relax.Function) -> Kernel:
    """The DNNL JSON runtime's kernel node for one of :func:`patterns`' composites."""
    op = composite.split(".", 1)[1].split("_", 1)[0]
    if op == "conv2d":
        root, _, extras = _role_operands(fn, "relax.nn.conv2d")
        attrs = call_attrs(root)
        keep = ("strides", "padding", "dilation", "groups", "data_layout", "kernel_layout", "out_layout", "out_dtype")
        kernel_attrs = {k: attrs[k] for k in keep if k in attrs}
        if composite.endswith("_clip"):  # the runtime's eltwise_clip post-op reads a_min / a_max
            (clip,) = calls_of(fn, "relax.clip")
            kernel_attrs["a_min"], kernel_attrs["a_max"] = _clip_bounds(clip)
        return Kernel(composite, [root.args[0], root.args[1], *extras], kernel_attrs)
    if op == "dense":
        root, values, extras = _role_operands(fn, "relax.matmul")
        perm = values.get(root.args[1], root.args[1])
        weight = perm.args[0]  # permute_dims(w): oneDNN's inner product takes w as (N, K)
        return Kernel(composite, [root.args[0], weight, *extras], {})
    if op == "matmul":
        root, _, extras = _role_operands(fn, "relax.matmul")
        return Kernel("nn.batch_matmul", [root.args[0], root.args[1], *extras], {"transpose_a": 0, "transpose_b": 0})
    raise ValueError(f"no oneDNN lowering for {composite}")


def register() -> None:
    """Load the oneDNN plugin (:func:`tunefarm.core.onednn.load_plugin`) and register ``relax.ext.dnnl``."""
    onednn.load_plugin()
    register_json_codegen(CODEGEN, onednn.CREATE_FUNC, lower)


# ---------------------------------------------------------------- partitioning


def candidate_groups(mod: tvm.IRModule, fold_constants: bool = True) -> list[Group]:
    """Every group of ``mod`` that oneDNN could run, as :func:`partition` would see them (nothing offloaded)."""
    found: list[Group] = []

    def collect(group: Group) -> bool:
        found.append(group)
        return True

    if fold_constants:
        mod = relax.transform.FoldConstant()(mod)
    relax.transform.FuseOpsByPattern(patterns(collect), bind_constants=True, annotate_codegen=False)(mod)
    return found


def partition(mod: tvm.IRModule, select: Callable[[Group], bool] | None = None,
              bind_constants: bool = True, fold_constants: bool = True) -> tvm.IRModule:
    """Mark the groups oneDNN runs (all it can, or those ``select`` accepts) as ``Codegen=dnnl`` functions, merged
    where they are neighbours. Run it on a module with its weights bound (``BindParams``), before legalisation.

    ``fold_constants`` (default) runs ``FoldConstant`` first: a weight computed from constants (a BatchNorm folded
    into its conv, ``FoldBatchnormToConv2D``) becomes one constant, which oneDNN reorders once at load instead of
    on every call. A Linear's ``permute_dims(w)`` is folded too, so it is offloaded as a plain matmul of the
    transposed weight (``dnnl.matmul``, its bias add with TVM); ``fold_constants=False`` keeps it a ``dnnl.dense``."""
    passes = [relax.transform.FoldConstant()] if fold_constants else []
    seq = tvm.transform.Sequential([
        *passes,
        relax.transform.FuseOpsByPattern(patterns(select), bind_constants=bind_constants, annotate_codegen=False),
        relax.transform.MergeCompositeFunctions(),
    ])
    return seq(mod)


def offload(mod: tvm.IRModule, select: Callable[[Group], bool] | None = None,
            fold_constants: bool = True) -> tvm.IRModule:
    """:func:`partition`, then run the codegen: the result compiles with ``tvm.compile`` like any module (the rest
    is legalised and built by TVM), and its exported library needs the plugin loaded where it is loaded."""
    register()
    return relax.transform.RunCodegen()(partition(mod, select, fold_constants=fold_constants))


def offloaded_functions(mod: tvm.IRModule) -> int:
    """How many external (oneDNN) modules a module after :func:`offload` carries."""
    return len(mod.attrs["external_mods"]) if mod.attrs and "external_mods" in mod.attrs else 0


def gflops(group: Group) -> float:
    return group.flops / 1e9 if group.flops else math.nan
