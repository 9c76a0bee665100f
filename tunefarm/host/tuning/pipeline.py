"""The graph pipeline around tuning: what the model becomes before task extraction, and after the records apply.

Two options change the tuned module (and so the tuning tasks; a job directory keeps the pipeline it was
tuned with, in ``job_state.json``, and every later step reads it from there):

* ``fold_batchnorm``: ``relax.transform.FoldBatchnormToConv2D`` (then ``FoldConstant``) before
  ``DecomposeOpsForInference``, so inference BatchNorm becomes part of the conv's weights and bias, as
  ONNX Runtime does; on a torchvision ResNet-18 the tasks go from 24 to 19 (conv + bias + residual +
  ReLU in one kernel).
* ``weight_prepack`` (CPU targets only): MetaSchedule's layout rewrite, as
  ``relax.pipeline.static_shape_tuning_pipeline(cpu_weight_prepack=True)`` does it:
  ``AttachAttrLayoutFreeBuffers`` before task extraction marks the constant weights layout-free, each
  candidate may pick its own packed weight layout (``RewriteLayout`` postproc), and after the records apply
  ``SplitLayoutRewritePreproc`` + ``LiftTransformParams`` + ``FoldConstant`` pack the weights once, at
  compile time (the farm binds weights as constants, so there is no ``transform_params`` call at run time).

A third, ``precision`` (``fp32`` | ``fp16``), runs ``relax.transform.ToMixedPrecision(out_dtype="float16")``
after DecomposeOpsForInference: convs and matmuls take fp16 inputs and accumulate in fp16 (the measured path
on which MetaSchedule's tensor-core space builds: bench/results/gpu_fp16_probe-nvidia-h200.md; with fp32
accumulation the fused cast epilogue made 28-32 of 32 tensor-core candidates fail to build). On a CUDA target
an fp16 job tunes in the ``cuda-tensorcore`` space (:meth:`Pipeline.space`). Its rows are checked as a
reduced precision (relative L2 error and top-1 agreement against the fp32 reference: core/stats.py).

A fourth, ``layout`` (``NCHW`` | ``NHWC``): ``NHWC`` runs ``relax.transform.ConvertLayout({"relax.nn.conv2d":
["NHWC", "OHWI"]})`` after DecomposeOpsForInference and ToMixedPrecision, before legalization: convolutions take
NHWC data and OHWI weights (the layout in which MetaSchedule's tensor-core space beat NCHW 1.3-1.5x on single
convs: ../shared/tvm-vendor-kit/README.md), the elementwise ops between them follow, and ``layout_transform``
ops stay only at the boundaries of runs of convs (the model's input and output; on the constant weights they
fold away). The model's inputs and outputs keep their NCHW layout. A job directory from before the option
reads as NCHW.

The defaults are the measured winner on CPU (bench/results/layouts-*.md): BatchNorm folded, weights not
prepacked. A job directory from before
these options has no ``pipeline`` in its state: it was tuned with both off (:data:`LEGACY`).
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Pipeline:
    fold_batchnorm: bool = False
    weight_prepack: bool = False
    precision: str = "fp32"  # fp32 | fp16
    layout: str = "NCHW"  # NCHW | NHWC | NCHWc (convs converted before legalization)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> "Pipeline":
        """A job directory's recorded pipeline; LEGACY when it has none (tuned before the options existed)."""
        if not isinstance(data, dict):
            return LEGACY
        return cls(fold_batchnorm=data.get("fold_batchnorm") is True, weight_prepack=data.get("weight_prepack") is True,
                   precision="fp16" if data.get("precision") == "fp16" else "fp32",
                   layout=data.get("layout") if data.get("layout") in LAYOUTS else "NCHW")

    def describe(self) -> str:
        parts = [("BatchNorm folded into conv weights" if self.fold_batchnorm else "BatchNorm kept"),
                 ("weights prepacked (layout rewrite)" if self.weight_prepack else "weights in the model's layout"),
                 ("fp16 (ToMixedPrecision, fp16 accumulation)" if self.precision == "fp16" else "fp32"),
                 {"NHWC": "convs in NHWC/OHWI (ConvertLayout)",
                  "NCHWc": "convs in channel blocks of one fp32 vector, NCHW8c or NCHW16c (ConvertLayout)"}.get(self.layout,
                                                                                            "convs in NCHW")]
        return ", ".join(parts)

    def space(self, target):
        """The MetaSchedule design space for ``target``: the tensor-core rules for an fp16 job on CUDA (their
        intrinsics registered here), else the target's default (None). The tensor-core space is a
        :class:`~tunefarm.host.tuning.space.SteadySpace`: a draw its rule cannot schedule is drawn again, and a
        task whose every draw raised is tuned in the plain CUDA space instead of ending the run (its ``notes``
        say which)."""
        if self.precision != "fp16" or target.kind.name != "cuda":
            return None
        from tunefarm.host.tuning.intrinsics import load_for  # pylint: disable=import-outside-toplevel
        from tunefarm.host.tuning.space import SteadySpace  # pylint: disable=import-outside-toplevel

        load_for(target)  # the wmma/mma intrinsics the tensor-core rules name
        return SteadySpace("cuda-tensorcore", "cuda")

    def graph(self, mod, target):
        """The graph-level steps (Relax operators, before legalisation): BatchNorm folded, ops decomposed for
        inference, mixed precision, conv layouts. Vendor placement partitions this module (host/placement)."""
        from tvm import relax  # pylint: disable=import-outside-toplevel

        with target:
            if self.fold_batchnorm:
                mod = relax.transform.FoldBatchnormToConv2D()(mod)
                mod = relax.transform.FoldConstant()(mod)
            mod = relax.transform.DecomposeOpsForInference()(mod)
            if self.precision == "fp16":
                mod = relax.transform.ToMixedPrecision(out_dtype="float16")(mod)
            if self.layout == "NHWC":
                mod = relax.transform.ConvertLayout(conv_layouts(self.layout, target))(mod)
                mod = relax.transform.FoldConstant()(mod)  # the weights' transforms, on constants
            elif self.layout == "NCHWc":
                # ReLU6's clip has no layout rule in Relax: as max/min with scalar constants it follows the blocked
                # convs instead of putting a layout change on either side of itself (two per MobileNetV2 block).
                mod = relax.transform.ConvertLayout({}, layout_cb=blocked_layouts(channel_block(target)))(
                    clip_to_minmax(mod))
                mod = minmax_to_clip(relax.transform.FoldConstant()(mod))
        return mod

    def lower(self, mod, target):
        """Legalize and fuse a :meth:`graph` module: its TIR functions are the tuning tasks."""
        from tvm import relax  # pylint: disable=import-outside-toplevel

        with target:
            if self.weight_prepack:
                mod = relax.transform.CanonicalizeBindings()(mod)
            if self.layout == "NCHWc":  # Relax's own legalization has no channel-blocked conv2d: TOPI's NCHWc one
                mod = relax.transform.LegalizeOps(customize_legalize_map={"relax.nn.conv2d": legalize_conv2d})(mod)
            mod = relax.pipeline.zero_pipeline()(mod)
            if self.weight_prepack:
                mod = relax.transform.AttachAttrLayoutFreeBuffers()(mod)
        return mod

    def fuse(self, mod, target):
        """Legalize and fuse once: the module whose TIR functions become the tuning tasks."""
        return self.lower(self.graph(mod, target), target)

LAYOUTS = ("NCHW", "NHWC", "NCHWc")


def channel_block(target) -> int:
    """NCHWc's channel block for a CPU target: one vector of fp32 (16 with AVX-512, else 8), the block oneDNN's
    own x86 kernels use."""
    from tvm.target import codegen  # pylint: disable=import-outside-toplevel

    try:
        return 16 if codegen.target_has_features("avx512f", target) else 8
    except Exception:  # pylint: disable=broad-except  # a target LLVM does not know: the narrower block
        return 8


def conv_layouts(layout: str, target) -> dict[str, list[str]]:  # pylint: disable=unused-argument
    """ConvertLayout's desired layouts (data, weights) for NHWC (NCHWc: :func:`blocked_layouts`)."""
    assert layout == "NHWC", layout
    return {"relax.nn.conv2d": ["NHWC", "OHWI"]}


def blocked_layouts(block: int):
    """ConvertLayout's callback for NCHWc: convs in channel blocks of ``block`` (NCHW{b}c data, OIHW{b}i{b}o
    weights), depthwise ones too (OIHW1i{b}o: one input channel per group); other grouped convs stay as they are.
    ConvertLayout itself leaves a conv whose channels do not divide into blocks (the model's first, on RGB)."""
    def desired(call):
        if getattr(call.op, "name", None) != "relax.nn.conv2d":
            return {}
        groups = int(call.attrs.groups)
        if groups == 1:
            return {"relax.nn.conv2d": [f"NCHW{block}c", f"OIHW{block}i{block}o"]}
        if _depthwise(call):
            return {"relax.nn.conv2d": [f"NCHW{block}c", f"OIHW1i{block}o"]}
        return {}
    return desired


def _depthwise(call) -> bool:
    """A grouped conv2d with one input and one output channel per group, in NCHW/OIHW."""
    a = call.attrs
    if a.data_layout != "NCHW" or a.kernel_layout != "OIHW":
        return False
    from tunefarm.host.byoc.json_codegen import static_shape  # pylint: disable=import-outside-toplevel

    try:
        data, weight = (static_shape(arg.ty) for arg in call.args[:2])
    except ValueError:  # a dynamic shape: left as it is
        return False
    return int(a.groups) == data[1] == weight[0] and weight[1] == 1


def clip_to_minmax(mod):
    """Every ``clip(x, lo, hi)`` as ``minimum(maximum(x, lo), hi)`` with fp32 scalar constants."""
    # pylint: disable=import-outside-toplevel
    from tvm import relax
    from tvm.relax.dpl import is_op, wildcard

    x = wildcard()
    pattern = is_op("relax.clip")(x, wildcard(), wildcard())

    def rewrite(expr, matched):
        call = matched[pattern]
        lo, hi = (float(getattr(v.value, "value", v.value)) for v in call.args[1:3])
        return relax.op.minimum(relax.op.maximum(matched[x], relax.const(lo, "float32")), relax.const(hi, "float32"))

    return _rewrite_functions(mod, pattern, rewrite)


def minmax_to_clip(mod):
    """``minimum(maximum(x, lo), hi)`` with scalar constants back as ``clip(x, lo, hi)`` (what the vendors'
    patterns and TVM's fusion take)."""
    # pylint: disable=import-outside-toplevel
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, wildcard

    x, lo, hi = wildcard(), is_const(), is_const()
    pattern = is_op("relax.minimum")(is_op("relax.maximum")(x, lo), hi)

    def rewrite(expr, matched):
        a, b = matched[lo].value.numpy(), matched[hi].value.numpy()
        if a.shape != () or b.shape != ():
            return expr
        return relax.op.clip(matched[x], float(a), float(b))

    return _rewrite_functions(mod, pattern, rewrite)


def _rewrite_functions(mod, pattern, rewrite):
    from tvm import relax  # pylint: disable=import-outside-toplevel
    from tvm.relax.dpl import rewrite_call  # pylint: disable=import-outside-toplevel

    out = mod
    for gvar, func in mod.functions.items():
        if isinstance(func, relax.Function):
            out[gvar] = rewrite_call(pattern, rewrite, func)
    return out


def depthwise_conv2d_nchwc(data, kernel, strides, padding, dilation, out_dtype):
    """Depthwise conv2d in channel blocks (TOPI's ``depthwise_conv2d_NCHWc`` has no compute in this TVM): data
    ``(n, C/b, h, w, b)``, weights ``(C/b, 1, kh, kw, 1, b)``, one output channel per input channel."""
    # pylint: disable=import-outside-toplevel
    from tvm import te, topi
    from tvm.topi.utils import get_const_tuple

    n, _cc, h, w, _cb = get_const_tuple(data.shape)
    oc, _, kh, kw, _, ob = get_const_tuple(kernel.shape)
    sh, sw = (int(v) for v in strides)
    dh, dw = (int(v) for v in dilation)
    pt, pl, pb, pr = (int(v) for v in padding)
    oh = (h + pt + pb - (kh - 1) * dh - 1) // sh + 1
    ow = (w + pl + pr - (kw - 1) * dw - 1) // sw + 1
    padded = topi.nn.pad(data, (0, 0, pt, pl, 0), (0, 0, pb, pr, 0), name="data_pad") if (pt or pl or pb or pr) \
        else data
    ry, rx = te.reduce_axis((0, kh), name="ry"), te.reduce_axis((0, kw), name="rx")
    return te.compute((n, oc, oh, ow, ob), lambda b, c, y, x, k: te.sum(
        padded[b, c, y * sh + ry * dh, x * sw + rx * dw, k].astype(out_dtype)
        * kernel[c, 0, ry, rx, 0, k].astype(out_dtype), axis=[ry, rx]), name="depthwise_conv2d_NCHWc")


def legalize_conv2d(bb, call):
    """conv2d for LegalizeOps: channel-blocked layouts through ``topi.nn.conv2d_NCHWc`` (ungrouped) or
    ``topi.nn.depthwise_conv2d_NCHWc``, the rest as Relax's own legalization does it."""
    # pylint: disable=import-outside-toplevel
    from tvm import topi
    from tvm.relax.transform.legalize_ops.nn import _nn_conv2d

    a = call.attrs
    if len(a.data_layout) == 4 and len(a.kernel_layout) == 4:
        return _nn_conv2d(bb, call)
    out_dtype = a.out_dtype if a.out_dtype not in ("", None) else "float32"
    if int(a.groups) == 1:
        return bb.call_te(topi.nn.conv2d_NCHWc, call.args[0], call.args[1], a.strides, a.padding, a.dilation,
                          a.data_layout, a.out_layout or a.data_layout, out_dtype, primfunc_name_hint="conv2d_NCHWc")
    weight_shape = [int(v) for v in call.args[1].ty.shape.values]
    if len(weight_shape) == 6 and weight_shape[1] == 1 and weight_shape[4] == 1:  # depthwise (OIHW1i{b}o)
        return bb.call_te(depthwise_conv2d_nchwc, call.args[0], call.args[1], a.strides, a.padding, a.dilation,
                          out_dtype, primfunc_name_hint="depthwise_conv2d_NCHWc")
    return call  # left for Relax's legalization, which says it cannot (one error at compile time)

LEGACY = Pipeline(fold_batchnorm=False, weight_prepack=False)
# Measured (bench/results/layouts-resnet18-vm-2c.md, ResNet-18, 480 trials each, one 2-core run): legacy 30.41 ms,
# fold 27.50 ms, fold+prepack 27.90 ms with 32% more tuning wall time (its candidates build slower). Folding wins;
# prepacking stays an option until a longer budget shows it paying for itself.
DEFAULT_CPU = Pipeline(fold_batchnorm=True, weight_prepack=False)
# Not measured on a GPU yet (the H200 results were tuned without folding): other targets keep the earlier pipeline.
DEFAULT_OTHER = Pipeline(fold_batchnorm=False, weight_prepack=False)


def is_cpu_target(target) -> bool:
    return target.kind.name in ("llvm", "c")


def resolve_pipeline(target, fold_batchnorm: bool | None = None, weight_prepack: bool | None = None,
                     precision: str | None = None, layout: str | None = None,
                     vendor_placed: bool = False) -> Pipeline:
    """The pipeline of a new tuning run: the job's options where set, else the default for the target's kind.
    Weight prepacking is a CPU layout rewrite; asked for on another target it is refused with a one-line error.
    ``vendor_placed``: the job will place operator groups on a vendor library (its default layout may differ)."""
    from tunefarm.core.errors import TunefarmError  # pylint: disable=import-outside-toplevel

    default = DEFAULT_CPU if is_cpu_target(target) else DEFAULT_OTHER
    if weight_prepack and not is_cpu_target(target):
        raise TunefarmError(f"tuning.weight_prepack is a CPU option (layout rewrite of llvm kernels); the target "
                            f"is '{target.kind.name}'")
    if layout is not None and layout not in LAYOUTS:
        raise TunefarmError(f"tuning.layout must be one of {', '.join(LAYOUTS)} (got {layout!r})")
    if layout == "NCHWc" and not is_cpu_target(target):
        raise TunefarmError(f"tuning.layout NCHWc is a CPU layout (channel blocks of one vector); the target is "
                            f"'{target.kind.name}'")
    precision = precision or "fp32"
    return Pipeline(fold_batchnorm=default.fold_batchnorm if fold_batchnorm is None else fold_batchnorm,
                    weight_prepack=default.weight_prepack if weight_prepack is None else weight_prepack,
                    precision=precision, layout=layout or default_layout(target, precision, vendor_placed))


def default_layout(target, precision: str, vendor_placed: bool = False) -> str:
    """The layout a job gets when tuning.layout is not set. On a CPU whose job places operator groups on a
    vendor library (oneDNN), channel blocks: measured on ResNet-18 (bench/results/placement-resnet18-*.md, one
    2-core run, 192 trials each), the placed model ran 1.5x faster in NCHWc than in NCHW (oneDNN's blocked
    kernels with no reorder around each conv) and the all-vendor build 1.05x. Without placement NCHW stays: at that
    budget TVM's own NCHWc kernels were 1.5x slower than its NCHW ones (more tasks, a larger space). fp16 on CUDA
    is the candidate for NHWC (single convs: 1.3-1.5x, ../shared/tvm-vendor-kit/README.md), but the whole-model
    comparison (PAIR=layouts bash bench/device/gpu_studies_h200.sh start resnet18) has not run yet."""
    if vendor_placed and precision == "fp32" and is_cpu_target(target):
        return "NCHWc"
    return "NCHW"


def apply_records(mod, target, database):
    """Records applied to exactly ``mod`` (a pipeline's fused module), weights packed where the module was
    tuned with prepacking (its functions carry ``layout_free_buffers``): (module to compile, scheduled names,
    unscheduled names). The names are the tuned module's TIR functions (prepacking then splits each into a
    packing function, folded away on the constant weights, and the kernel)."""
    # pylint: disable=import-outside-toplevel
    import tvm
    from tvm import relax

    with target, database:
        applied = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    scheduled, unscheduled, prepacked = [], [], False
    for gvar, func in list(applied.functions.items()):
        if isinstance(func, tvm.tirx.PrimFunc):
            attrs = func.attrs
            is_sched = attrs is not None and "tirx.is_scheduled" in attrs and bool(attrs["tirx.is_scheduled"])
            (scheduled if is_sched else unscheduled).append(gvar.name_hint)
            prepacked = prepacked or (attrs is not None and "layout_free_buffers" in attrs)
    if prepacked:
        with target:
            applied = relax.transform.SplitLayoutRewritePreproc()(applied)
            applied = relax.transform.LiftTransformParams()(applied)
            applied = relax.transform.FoldConstant()(applied)
    for gvar, func in list(applied.functions.items()):
        if isinstance(func, tvm.tirx.PrimFunc):
            # tvm.compile's default pipeline would fuse the tuned functions again (24 -> 19 on ResNet-18)
            # and the merged functions no longer carry their schedule; opaque functions stay as tuned,
            # so the compiled module is the module the report counts.
            applied[gvar] = func.with_attr("op_pattern", 8)
    return applied, sorted(scheduled), sorted(unscheduled)


def job_dir_pipeline(state: dict[str, Any]) -> Pipeline:
    """The pipeline a job directory was tuned with (its ``job_state.json``)."""
    return Pipeline.from_json(state.get("pipeline"))


def compile_module(mod, target, cuda_graph: bool = False):
    """``tvm.compile`` of a module the records were applied to; ``cuda_graph`` (CUDA targets): Relax's
    CUDA-graph rewriting (``relax.backend.use_cuda_graph``), which captures the static parts of the model
    once and replays them. Returns the executable."""
    import tvm  # pylint: disable=import-outside-toplevel

    config = {"relax.backend.use_cuda_graph": True} if cuda_graph and target.kind.name == "cuda" else {}
    with tvm.transform.PassContext(opt_level=3, config=config):
        return tvm.compile(mod, target)
