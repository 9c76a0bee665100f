"""A Python JSON codegen for Relax BYOC, for the PyPI TVM wheel that ships without the C++ ``relax.ext.<lib>`` ones.

``relax.transform.RunCodegen`` looks up the global function ``relax.ext.<Codegen attr>``, calls it with
``(functions: Array[Function], options: Map, constant_names: Map[Constant, str])`` and expects an
``Array[Module]``; a function registered from Python under that name works. The modules come from the
library's runtime (``runtime.<Lib>JSONRuntimeCreate(symbol, graph_json, constant_names)``), which a plugin
built for the wheel registers (for oneDNN: :mod:`tunefarm.core.onednn`).

The graph is TVM's JSON format as ``JSONSerializer::SaveToJSON`` (src/relax/backend/contrib/codegen_json)
writes it and ``JSONRuntimeBase::Load`` reads it: ``{"nodes", "arg_nodes", "heads", "node_row_ptr"}``, each node
``{"op": "input" | "const" | "kernel", "name", "inputs": [[node, index, 0], ...], "attrs": {...}}``; every node
carries ``shape`` and ``dtype`` attrs.

Ported from ../shared/tvm-vendor-kit/tvm_byoc_json.py (a probe) and changed where it matters: a composite's
operands are named by the library's lowering (data, weight, bias, residual ...) instead of taken in the
order of first use, so an operand used twice (``conv(x) + x``) or a weight reached through ``permute_dims``
keeps its place; constants inside a composite (``FuseOpsByPattern(bind_constants=True)``: weights the library
prepacks once) become ``const`` nodes, which the runtime receives at initialisation, not per call.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

import tvm
import tvm_ffi
from tvm import relax


@dataclass
class Kernel:
    """One JSON kernel node for a composite: the runtime's op name, the operands in the runtime's order
    (parameters or constants of the composite function), and attributes."""

    name: str
    operands: list = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Group:
    """A group of operators a vendor library can run (oneDNN, cuBLAS, cuDNN): what the placement step compares
    against TVM's kernels."""

    composite: str  # e.g. dnnl.conv2d_bias_relu, cudnn.conv2d.nhwc_ohwi_bias_relu
    op: str  # conv2d | dense | matmul
    shapes: dict[str, tuple] = field(default_factory=dict)  # data, weight, out, ...
    attrs: dict[str, Any] = field(default_factory=dict)  # strides, padding, dilation, groups (conv2d); dtype
    flops: int = 0
    # The weight is a constant: oneDNN reorders it into its blocked layout once, at load. A weight computed at run
    # time (e.g. BatchNorm folded in but not constant-folded) is reordered on every call (seen: 20 weight reorders
    # per ResNet-18 run until partition() folded constants first).
    const_weight: bool = False

    def key(self) -> str:
        """A stable text key: the same group in another module (or another run) has the same key."""
        parts = [self.composite] + [f"{k}={'x'.join(map(str, v))}" for k, v in sorted(self.shapes.items())]
        parts += [f"{k}={v}" for k, v in sorted(self.attrs.items())]
        return ";".join(parts)


# (composite name, composite function) -> Kernel
Lowering = Callable[[str, relax.Function], Kernel]


def _dtype_str(ty) -> str:
    dt = ty.dtype
    return str(dt.dtype) if hasattr(dt, "dtype") else str(dt)


def static_shape(ty) -> list[int]:
    shape = getattr(ty, "shape", None)
    if shape is None or not hasattr(shape, "values"):
        raise ValueError("JSON BYOC needs static shapes")
    return [int(v) for v in shape.values]


def attr_value(v):
    """Like OpAttrExtractor::Visit: ints, floats, strings and arrays of them; None -> ""."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float, str)):
        return v
    kind = type(v).__name__
    if kind == "IntImm":
        return int(v.value)
    if kind == "FloatImm":
        return float(v.value)
    if "dtype" in kind.lower() or kind == "DataType":
        return str(v)
    try:
        return [attr_value(e) for e in v]
    except TypeError:
        return str(v)


def call_attrs(call) -> dict[str, Any]:
    """A Relax call's attributes as plain JSON values (its attrs node's reflected fields)."""
    attrs = call.attrs
    info = getattr(type(attrs), "__tvm_ffi_type_info__", None) if attrs is not None else None
    if info is None:
        return {}
    return {f.name: attr_value(getattr(attrs, f.name)) for f in info.fields}


def bindings_of(node) -> list:
    """The bindings of a function's body or of a SeqExpr, in order."""
    seq = node.body if isinstance(node, relax.Function) else node
    return [b for blk in seq.blocks for b in blk.bindings]


def calls_of(fn: relax.Function, op_name: str) -> list:
    """The calls to ``op_name`` in a composite function, in binding order."""
    return [b.value for b in bindings_of(fn)
            if isinstance(b.value, tvm.ir.Call) and isinstance(b.value.op, tvm.ir.Op) and b.value.op.name == op_name]


def role_operands(fn: relax.Function, root_op: str) -> tuple[Any, dict, list]:
    """The root call of a composite, its bindings (var -> value) and the chain's extra operands (bias, residual)
    in order."""
    (root,) = calls_of(fn, root_op)
    values, extras, chain = {}, [], None
    for b in (b for blk in fn.body.blocks for b in blk.bindings):
        values[b.var] = b.value
        if not isinstance(b.value, tvm.ir.Call):
            continue
        if b.value.same_as(root):
            chain = b.var
            continue
        args = list(b.value.args)
        hits = [i for i, a in enumerate(args) if chain is not None and a.same_as(chain)]
        if not hits:
            continue
        if b.value.op.name == "relax.add":
            extras.append(args[1 - hits[0]])
        chain = b.var
    return root, values, extras


class JSONSerializer:
    """Serialise one partitioned function (``Codegen=<lib>``) into TVM's JSON graph."""

    def __init__(self, constant_names, lowering: Lowering):
        self.constant_names = constant_names  # Map[Constant, str]
        self.lowering = lowering
        self.nodes: list[dict] = []
        self.memo: dict = {}
        self.functions: dict = {}  # local var -> composite function
        self.constants_used: list[str] = []
        self.heads: list = []

    def _add_node(self, node: dict, ty) -> list:
        nid = len(self.nodes)
        self.nodes.append(node)
        attrs = node.setdefault("attrs", {})
        fields = list(ty.fields) if isinstance(ty, tvm.ir.TupleType) else [ty]
        attrs["shape"] = [static_shape(f) for f in fields]
        attrs["dtype"] = [_dtype_str(f) for f in fields]
        node["num_outputs"] = len(fields)
        return [[nid, i, 0] for i in range(len(fields))]

    def serialize(self, func: relax.Function) -> None:
        for p in func.params:
            self.memo[p] = self._add_node({"op": "input", "name": p.name}, p.ty)
        self.heads = self.visit(func.body)

    def visit(self, expr) -> list:
        if expr in self.memo:
            return self.memo[expr]
        if isinstance(expr, relax.SeqExpr):
            for binding in bindings_of(expr):
                if not isinstance(binding, relax.VarBinding):
                    raise ValueError("the JSON runtime takes no match_cast")
                if isinstance(binding.value, relax.Function):
                    self.functions[binding.var] = binding.value
                    continue
                self.memo[binding.var] = self.visit(binding.value)
            res = self.visit(expr.body)
        elif isinstance(expr, tvm.ir.Constant):
            name = str(self.constant_names[expr])
            self.constants_used.append(name)
            res = self._add_node({"op": "const", "name": name}, expr.ty)
        elif isinstance(expr, tvm.ir.Tuple):
            res = [e for f in expr.fields for e in self.visit(f)]
        elif isinstance(expr, tvm.ir.TupleGetItem):
            res = [self.visit(expr.tuple_value)[expr.index]]
        elif isinstance(expr, tvm.ir.Call):
            res = self.visit_call(expr)
        elif isinstance(expr, tvm.ir.Var):
            raise ValueError(f"unbound var {expr.name}")
        else:
            raise ValueError(f"the JSON runtime does not take {type(expr).__name__}")
        self.memo[expr] = res
        return res

    def visit_call(self, call) -> list:
        fn = self.functions.get(call.op) if isinstance(call.op, tvm.ir.Var) else None
        if fn is None:
            raise ValueError("only calls to composite functions can be offloaded")
        composite = str(fn.attrs["Composite"])
        outer = {p: self.visit(a) for p, a in zip(fn.params, call.args)}
        kernel = self.lowering(composite, fn)
        inputs = []
        for operand in kernel.operands:
            if operand in outer:
                inputs += outer[operand]
            elif isinstance(operand, tvm.ir.Constant):
                inputs += self.visit(operand)
            else:
                raise ValueError(f"{composite}: operand {operand} is neither a parameter nor a constant")
        node = {"op": "kernel", "name": kernel.name, "inputs": inputs, "attrs": dict(kernel.attrs)}
        return self._add_node(node, call.ty)

    def to_json(self) -> str:
        arg_nodes = [i for i, n in enumerate(self.nodes) if n["op"] in ("input", "const")]
        row, acc, out_nodes = [0], 0, []
        for n in self.nodes:
            acc += n["num_outputs"]
            row.append(acc)
            o = {"op": n["op"], "name": n["name"]}
            attrs = dict(n.get("attrs", {}))
            if n["op"] == "kernel":
                attrs["num_inputs"] = len(n["inputs"])
                attrs["num_outputs"] = n["num_outputs"]
                o["inputs"] = n["inputs"]
            if attrs:
                o["attrs"] = attrs
            out_nodes.append(o)
        return json.dumps({"nodes": out_nodes, "arg_nodes": arg_nodes, "heads": self.heads, "node_row_ptr": row})


def make_codegen(runtime_create: str, lowering: Lowering, check: Callable[[dict], None] | None = None):
    """A ``relax.ext.<lib>`` implementation: serialise each function (``check``: raises on a graph the runtime would
    misread), create its module with ``runtime_create``."""

    def codegen(functions, options, constant_names):  # pylint: disable=unused-argument
        create = tvm_ffi.get_global_func(runtime_create)
        modules = []
        for func in functions:
            ser = JSONSerializer(constant_names, lowering)
            ser.serialize(func)
            graph = ser.to_json()
            if check is not None:
                check(json.loads(graph))
            modules.append(create(str(func.attrs["global_symbol"]), graph, list(ser.constants_used)))
        return modules

    return codegen


def register(lib: str, runtime_create: str, lowering: Lowering, check: Callable[[dict], None] | None = None) -> None:
    """Register the codegen as ``relax.ext.<lib>`` (replacing one registered before)."""
    tvm_ffi.register_global_func(f"relax.ext.{lib}", make_codegen(runtime_create, lowering, check), override=True)
