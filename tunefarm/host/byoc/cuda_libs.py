"""cuBLAS and cuDNN as farm backends on the host: the ``relax.ext.cublas`` / ``relax.ext.cudnn`` codegens and the
partitions that offload to them (:mod:`tunefarm.host.byoc.cublas`, :mod:`tunefarm.host.byoc.cudnn` are the two
vendor modules placement imports; both are made here).

The wheel registers no C++ ``relax.ext.cublas`` / ``relax.ext.cudnn`` (built with USE_CUBLAS/USE_CUDNN=OFF): these
are the Python JSON codegen (:mod:`tunefarm.host.byoc.json_codegen`) with lowerings matching what TVM 0.27's
runtimes read (``src/runtime/extra/contrib/{cublas/cublas_json_runtime.cc,cudnn/cudnn_json_runtime.cc}``), ported
from ../shared/tvm-vendor-kit/tvm_byoc_json.py. The patterns are TVM's own (``make_conv2d_pattern``,
``make_matmul_pattern`` and the checks of ``tvm.relax.backend.cuda.{cublas,cudnn}``), narrowed to what those
runtimes run correctly:

* **One kernel per offloaded function, weights as arguments.** Both runtimes read their operands at fixed places
  (cuDNN takes the input and weight shapes from JSON nodes 0 and 1; cuBLAS binds every kernel's output to the
  function's first output) and neither copies constants to the GPU: so each group is its own ``Codegen``
  function (``annotate_codegen=True``, nothing merged) and its weights stay parameters (``bind_constants=False``;
  TVM's VM keeps them on the device).
* **cuDNN**: ``conv2d`` in NHWC/OHWI or NCHW/OIHW, fp16 or fp32 (output in the input's type: the runtime describes
  the output with the input's type), symmetric padding, as ``cudnn.conv2d.<layout>`` alone or with bias and ReLU
  (``..._bias_relu``: ``cudnnConvolutionBiasActivationForward``). A bias without ReLU is left out: cuDNN runs the
  identity activation only with the IMPLICIT_PRECOMP_GEMM algorithm, and the runtime picks its algorithm by
  ``cudnnFindConvolutionForwardAlgorithm`` without that constraint.
* **cuBLAS** (cuBLASLt): 2-D ``matmul`` with the weight as is or transposed (``permute_dims``, as PyTorch's Linear
  exports), with a bias vector and ReLU as its epilogue, fp16 or fp32 in and out.

:func:`candidate_groups` describes every group the library could run (:class:`~tunefarm.host.byoc.json_codegen.Group`:
composite, shapes, attributes incl. dtype, FLOPs) and :func:`partition` takes a ``select`` over them: the
placement step offloads exactly the groups that measured faster on the library.
"""
from __future__ import annotations

import types
from typing import Any, Callable

import tvm
from tvm import relax
from tvm.relax.backend.patterns import make_conv2d_pattern, make_matmul_pattern
from tvm.relax.backend.utils import has_leaking_intermediate_variables
from tvm.relax.transform import FusionPattern

from tunefarm.core import cudalibs
from tunefarm.host.byoc.json_codegen import (Group, Kernel, call_attrs, register as register_json_codegen,
                                             role_operands, static_shape)

DTYPES = ("float16", "float32")
CONV_LAYOUTS = {("NHWC", "OHWI"): "nhwc_ohwi", ("NCHW", "OIHW"): "nchw_oihw"}


def _shape(expr) -> tuple | None:
    try:
        return tuple(static_shape(expr.ty))
    except (ValueError, AttributeError):
        return None


def _dtype(expr) -> str:
    dtype = getattr(expr.ty, "dtype", None)
    return str(getattr(dtype, "dtype", dtype))


# ---------------------------------------------------------------- patterns and group descriptions

def _variants(lib: str) -> list[tuple[str, Any, dict, str]]:
    """(composite name, pattern, annotations, op), longest first. The names carry what the runtimes parse from them
    ("bias", "relu", "transposed")."""
    out = []
    if lib == "cudnn":
        for layout in CONV_LAYOUTS.values():
            out.append((f"cudnn.conv2d.{layout}_bias_relu",
                        *make_conv2d_pattern(with_bias=True, activation="relax.nn.relu"), "conv2d"))
            out.append((f"cudnn.conv2d.{layout}", *make_conv2d_pattern(with_bias=False), "conv2d"))
    else:
        for transposed in (True, False):
            t = "_transposed" if transposed else ""
            out.append((f"cublas.matmul{t}_bias_relu",
                        *make_matmul_pattern(with_bias=True, activation="relax.nn.relu", transposed_rhs=transposed),
                        "matmul"))
            out.append((f"cublas.matmul{t}_bias", *make_matmul_pattern(with_bias=True, transposed_rhs=transposed),
                        "matmul"))
            out.append((f"cublas.matmul{t}", *make_matmul_pattern(with_bias=False, transposed_rhs=transposed),
                        "matmul"))
    out.sort(key=lambda v: -len(v[0]))
    return out


def _conv_group(composite: str, ann: dict) -> Group | None:
    root, data, weight = ann["root"], ann["input"], ann["weight"]
    shapes = {"data": _shape(data), "weight": _shape(weight), "out": _shape(root)}
    if any(s is None or len(s) != 4 for s in shapes.values()):
        return None
    dtype = _dtype(data)
    if dtype not in DTYPES or _dtype(weight) != dtype or _dtype(root) != dtype:
        return None
    a = call_attrs(root)
    layout = CONV_LAYOUTS.get((a.get("data_layout"), a.get("kernel_layout")))
    if layout is None or f".{layout}" not in composite or a.get("out_layout") not in ("", a.get("data_layout")):
        return None
    pad = list(a["padding"])
    if len(pad) != 4 or pad[0] != pad[2] or pad[1] != pad[3]:
        return None  # the runtime passes (top, left) to cuDNN, which pads symmetrically
    if a.get("out_dtype") not in ("", "void", dtype):
        return None
    nhwc = a["data_layout"] == "NHWC"
    n, h, w, o = shapes["out"] if nhwc else (shapes["out"][0], *shapes["out"][2:], shapes["out"][1])
    kh, kw, cin_g = (shapes["weight"][1:] if nhwc else (*shapes["weight"][2:], shapes["weight"][1]))
    if "bias" in ann:
        bias = ann["bias"]
        ok = ((1, 1, 1, o), (o,)) if nhwc else ((1, o, 1, 1), (o, 1, 1))
        if _shape(bias) not in ok or _dtype(bias) != dtype:
            return None
        shapes["bias"] = _shape(bias)
    attrs = {"strides": tuple(a["strides"]), "padding": tuple(pad), "dilation": tuple(a["dilation"]),
             "groups": int(a["groups"]), "dtype": dtype}
    return Group(composite, "conv2d", shapes, attrs, int(2 * n * o * h * w * cin_g * kh * kw),
                 isinstance(weight, tvm.ir.Constant))


def _matmul_group(composite: str, ann: dict) -> Group | None:
    root, lhs, rhs = ann["root"], ann["lhs"], ann["rhs"]
    shapes = {"data": _shape(lhs), "weight": _shape(rhs), "out": _shape(root)}
    if any(s is None or len(s) != 2 for s in shapes.values()):
        return None
    dtype = _dtype(lhs)
    if dtype not in DTYPES or _dtype(rhs) != dtype or _dtype(root) != dtype:
        return None
    m, n = shapes["out"]
    k = shapes["data"][1]
    if "bias" in ann:
        bias = ann["bias"]
        if _shape(bias) not in ((n,), (1, n)) or _dtype(bias) != dtype:
            return None
        shapes["bias"] = _shape(bias)
    return Group(composite, "matmul", shapes, {"dtype": dtype}, int(2 * m * n * k), isinstance(rhs, tvm.ir.Constant))


def describe(op: str, composite: str, ann: dict) -> Group | None:
    """The Group for a match (annotated expressions by role), or None where the library's runtime cannot run it."""
    return _conv_group(composite, ann) if op == "conv2d" else _matmul_group(composite, ann)


def _annotated(context) -> dict:
    return {str(k): v for k, v in context.annotated_expr.items()}


def _tvm_check(lib: str):
    """TVM's own check of the library's patterns (dtype and shape rules), used before ours."""
    # pylint: disable=import-outside-toplevel,protected-access
    if lib == "cudnn":
        from tvm.relax.backend.cuda import cudnn

        return cudnn._check_conv2d
    from tvm.relax.backend.cuda import cublas

    return cublas._check_matmul


def make_patterns(lib: str, select: Callable[[Group], bool] | None = None) -> list[FusionPattern]:
    """The library's fusion patterns; a match is offloaded only if TVM's check and ours pass and ``select(group)``
    agrees. A refused chain is offered again as its shorter ones (conv+bias+relu, then the conv alone)."""
    tvm_check = _tvm_check(lib)
    out = []
    for name, pattern, ann, op in _variants(lib):
        def check(context, _name=name, _op=op) -> bool:
            if has_leaking_intermediate_variables(context) or not tvm_check(context):
                return False
            group = describe(_op, _name, _annotated(context))
            return group is not None and (select is None or bool(select(group)))

        out.append(FusionPattern(name, pattern, ann, check))
    return out


# ---------------------------------------------------------------- the codegens (lowering to the JSON kernels)

def lower(composite: str, fn: relax.Function) -> Kernel:
    """The runtime's kernel node for one of the patterns' composites: operands in the runtime's order (data,
    weight, bias), the root call's attributes (cuDNN reads strides, padding, dilation, groups, out_layout and
    out_dtype; cuBLAS reads its epilogue and transposition from the name)."""
    if ".conv2d." in composite:
        root, _, extras = role_operands(fn, "relax.nn.conv2d")
        attrs = call_attrs(root)
        keep = ("strides", "padding", "dilation", "groups", "data_layout", "kernel_layout", "out_layout", "out_dtype")
        attrs = {k: attrs[k] for k in keep if k in attrs}
        if not attrs.get("out_layout"):
            attrs["out_layout"] = attrs["data_layout"]
        if attrs.get("out_dtype") in (None, "", "void"):
            attrs["out_dtype"] = _dtype(root)
        return Kernel(composite, [root.args[0], root.args[1], *extras], attrs)
    if ".matmul" in composite:
        root, values, extras = role_operands(fn, "relax.matmul")
        rhs = root.args[1]
        if "transposed" in composite:  # matmul(x, permute_dims(w)): cuBLASLt takes w as is, transposed by flag
            rhs = values.get(rhs, rhs).args[0]
        attrs = call_attrs(root)
        if attrs.get("out_dtype") in (None, "", "void"):
            attrs["out_dtype"] = _dtype(root)
        return Kernel(composite, [root.args[0], rhs, *extras], attrs)
    raise ValueError(f"no cuBLAS/cuDNN lowering for {composite}")


def check_graph(graph: dict) -> None:
    """What both runtimes assume of a function's JSON graph: one kernel; for cuDNN also that its data and weight are
    nodes 0 and 1 (it takes the convolution's shapes from there)."""
    kernels = [n for n in graph["nodes"] if n["op"] == "kernel"]
    if len(kernels) != 1:
        raise ValueError(f"a cuBLAS/cuDNN function must hold one kernel, not {len(kernels)}")
    if ".conv2d." in kernels[0]["name"] and [e[0] for e in kernels[0]["inputs"][:2]] != [0, 1]:
        raise ValueError("cuDNN's runtime reads the convolution's data and weight shapes from JSON nodes 0 and 1; "
                         f"this graph has them at {[e[0] for e in kernels[0]['inputs'][:2]]}")


def make_vendor(lib: str) -> types.SimpleNamespace:
    """The module-level functions a vendor module provides (see host/placement/vendors.py) for ``lib``."""
    plugin = cudalibs.LIBS[lib]

    def register() -> None:
        """Load the library's plugin (:func:`tunefarm.core.cudalibs.load_plugin`) and register ``relax.ext.<lib>``."""
        cudalibs.load_plugin(lib)
        register_json_codegen(lib, plugin.create_func, lower, check_graph)

    def patterns(select: Callable[[Group], bool] | None = None) -> list[FusionPattern]:
        return make_patterns(lib, select)

    def candidate_groups(mod: tvm.IRModule, fold_constants: bool = True) -> list[Group]:
        """Every group of ``mod`` the library could run, as :func:`partition` would see them."""
        found: list[Group] = []

        def collect(group: Group) -> bool:
            found.append(group)
            return True

        if fold_constants:
            mod = relax.transform.FoldConstant()(mod)
        relax.transform.FuseOpsByPattern(make_patterns(lib, collect), bind_constants=False,
                                         annotate_codegen=False)(mod)
        return found

    def partition(mod: tvm.IRModule, select: Callable[[Group], bool] | None = None,
                  fold_constants: bool = True) -> tvm.IRModule:
        """Mark the groups the library runs (all it can, or those ``select`` accepts) as ``Codegen=<lib>`` functions,
        one group each, weights as their arguments. Run it on a module before legalisation."""
        passes = [relax.transform.FoldConstant()] if fold_constants else []
        return tvm.transform.Sequential([
            *passes,
            relax.transform.FuseOpsByPattern(make_patterns(lib, select), bind_constants=False, annotate_codegen=True),
        ])(mod)

    def offload(mod: tvm.IRModule, select: Callable[[Group], bool] | None = None,
                fold_constants: bool = True) -> tvm.IRModule:
        """:func:`partition`, then the codegen: the result compiles with ``tvm.compile`` for a CUDA target, and its
        exported library needs the plugin loaded where it is loaded."""
        register()
        return relax.transform.RunCodegen()(partition(mod, select, fold_constants=fold_constants))

    def offloaded_functions(mod: tvm.IRModule) -> int:
        return len(mod.attrs["external_mods"]) if mod.attrs and "external_mods" in mod.attrs else 0

    return types.SimpleNamespace(CODEGEN=lib, register=register, patterns=patterns, candidate_groups=candidate_groups,
                                 partition=partition, offload=offload, offloaded_functions=offloaded_functions)
