"""The tensor-core design space that a bad draw does not end (tunefarm.host.tuning.space), on real MetaSchedule.

The task is the one that stopped a whole NHWC fp16 tuning run on the lent H100: a stride-2 3x3 conv, 28x28x128 ->
14x14x256 in NHWC/OHWI fp16, with BatchNorm's four-op epilogue kept. MetaSchedule's stock tensor-core space raises
"not a stage pipeline" on it for rand_state 105 (and 116) of 100-139; the space is generated for the H100 tag on
this CPU (no GPU needed to generate a space)."""
from __future__ import annotations

import pytest

BAD_DRAW = 105  # a rand_state whose first draw the stock tensor-core rule cannot schedule on this task


@pytest.fixture(scope="module")
def conv_task():
    import numpy as np
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    from tunefarm.host.tuning.pipeline import Pipeline

    target = tvm.target.Target({"tag": "nvidia/nvidia-h100", "host": {"kind": "llvm"}})
    rng = np.random.default_rng(0)

    def const(shape):
        return relax.const(rng.standard_normal(shape).astype("float16"))

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 28, 28, 128), "float16"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, const((256, 3, 3, 128)), strides=2, padding=1, data_layout="NHWC",
                                           kernel_layout="OHWI", out_dtype="float16"))
            for op in (relax.op.subtract, relax.op.divide, relax.op.multiply, relax.op.add):  # BatchNorm, kept
                y = bb.emit(op(y, const((1, 1, 1, 256))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    pipeline = Pipeline(precision="fp16", layout="NHWC")
    tasks = ms.relax_integration.extract_tasks(pipeline.lower(bb.get(), target), target)
    assert len(tasks) == 1, [t.task_name for t in tasks]
    return tasks[0].dispatched[0], target, pipeline


def _context(mod, target, space, rand_state, name="conv"):
    from tvm.s_tir import meta_schedule as ms

    return ms.TuneContext(mod=mod, target=target, space_generator=space, task_name=name, rand_state=rand_state)


def _tensorized(spaces) -> list[bool]:
    return ["auto_tensorize" in str(s.trace) for s in spaces]


def test_the_stock_tensor_core_space_raises_on_the_bad_draw(conv_task):
    """The failure the steady space exists for (if TVM fixes its rule, this says so and BAD_DRAW goes)."""
    from tvm.s_tir.meta_schedule.space_generator import PostOrderApply

    mod, target, pipeline = conv_task
    pipeline.space(target)  # registers the tensor intrinsics the rules name
    kind = "cuda-tensorcore"
    stock = PostOrderApply(sch_rules=kind, postprocs=kind, mutator_probs=kind)
    with pytest.raises(Exception, match="not a stage pipeline"):
        _context(mod, target, stock, BAD_DRAW).generate_design_space()


def test_the_steady_space_draws_again_and_keeps_the_tensor_cores(conv_task):
    mod, target, pipeline = conv_task
    space = pipeline.space(target)
    spaces = _context(mod, target, space, BAD_DRAW).generate_design_space()
    assert spaces and all(_tensorized(spaces)), _tensorized(spaces)
    lines = space.notes.lines()
    assert len(lines) == 1 and lines[0].startswith("conv: the tensor-core space raised on 1 draw(s)"), lines
    assert "not a stage pipeline" in lines[0] and "the next draw built" in lines[0], lines
    # A good draw leaves no note.
    _context(mod, target, space, 3).generate_design_space()
    assert space.notes.lines() == lines


def test_a_task_whose_every_draw_raises_is_tuned_in_the_plain_space(conv_task):
    from tunefarm.host.tuning.space import SteadySpace

    mod, target, pipeline = conv_task
    pipeline.space(target)
    space = SteadySpace("cuda-tensorcore", "cuda", tries=1)
    spaces = _context(mod, target, space, BAD_DRAW).generate_design_space()
    assert spaces and not any(_tensorized(spaces)), _tensorized(spaces)
    note = space.notes.snapshot()["conv"]
    assert note["fell_back"] and note["tries"] == 1 and "not a stage pipeline" in note["error"], note
    assert space.notes.lines() == ["conv: the tensor-core space raised 1 times (The scope s_tir.SBlock#0 is not a "
                                   "stage pipeline.); tuned in the plain space"]
    # Every task's clone (MetaSchedule clones each tune context, and its space with it, in C++) writes to the one
    # loop's notes.
    _context(mod, target, space.clone(), BAD_DRAW, name="conv-clone").generate_design_space()
    assert sorted(space.notes.snapshot()) == ["conv", "conv-clone"], space.notes.snapshot()
