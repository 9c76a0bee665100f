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

The defaults are the measured winner on CPU (bench/results/layouts-*.md). A job directory from before
these options has no ``pipeline`` in its state: it was tuned with both off (:data:`LEGACY`).
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Pipeline:
    fold_batchnorm: bool = False
    weight_prepack: bool = False

    def to_json(self) -> dict[str, bool]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> "Pipeline":
        """A job directory's recorded pipeline; LEGACY when it has none (tuned before the options existed)."""
        if not isinstance(data, dict):
            return LEGACY
        return cls(fold_batchnorm=data.get("fold_batchnorm") is True, weight_prepack=data.get("weight_prepack") is True)

    def describe(self) -> str:
        parts = [("BatchNorm folded into conv weights" if self.fold_batchnorm else "BatchNorm kept"),
                 ("weights prepacked (layout rewrite)" if self.weight_prepack else "weights in the model's layout")]
        return ", ".join(parts)

    def fuse(self, mod, target):
        """Legalize and fuse once: the module whose TIR functions become the tuning tasks."""
        from tvm import relax  # pylint: disable=import-outside-toplevel

        with target:
            if self.fold_batchnorm:
                mod = relax.transform.FoldBatchnormToConv2D()(mod)
                mod = relax.transform.FoldConstant()(mod)
            mod = relax.transform.DecomposeOpsForInference()(mod)
            if self.weight_prepack:
                mod = relax.transform.CanonicalizeBindings()(mod)
            mod = relax.pipeline.zero_pipeline()(mod)
            if self.weight_prepack:
                mod = relax.transform.AttachAttrLayoutFreeBuffers()(mod)
        return mod

LEGACY = Pipeline(fold_batchnorm=False, weight_prepack=False)
DEFAULT_CPU = Pipeline(fold_batchnorm=True, weight_prepack=True)
DEFAULT_OTHER = Pipeline(fold_batchnorm=True, weight_prepack=False)


def is_cpu_target(target) -> bool:
    return target.kind.name in ("llvm", "c")


def resolve_pipeline(target, fold_batchnorm: bool | None = None, weight_prepack: bool | None = None) -> Pipeline:
    """The pipeline of a new tuning run: the job's options where set, else the default for the target's kind.
    Weight prepacking is a CPU layout rewrite; asked for on another target it is refused with a one-line error."""
    from tunefarm.core.errors import TunefarmError  # pylint: disable=import-outside-toplevel

    default = DEFAULT_CPU if is_cpu_target(target) else DEFAULT_OTHER
    if weight_prepack and not is_cpu_target(target):
        raise TunefarmError(f"tuning.weight_prepack is a CPU option (layout rewrite of llvm kernels); the target "
                            f"is '{target.kind.name}'")
    return Pipeline(fold_batchnorm=default.fold_batchnorm if fold_batchnorm is None else fold_batchnorm,
                    weight_prepack=default.weight_prepack if weight_prepack is None else weight_prepack)


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
