"""The graph pipeline's options (tunefarm.host.tuning.pipeline) on real TVM, without tuning: what each does to
the tuned module, and that the untuned builds still compute the model."""
from __future__ import annotations

import pytest

from tunefarm.core.errors import TunefarmError
from tunefarm.core.jobspec import ModelSpec, job_from_dict

TARGET = {"kind": "llvm", "num-cores": 2}


def _build(name: str, pipeline):
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    from tunefarm.host.models import load_model, to_relax
    from tunefarm.host.tuning.pipeline import apply_records

    model = load_model(ModelSpec("builtin", name))
    target = tvm.target.Target(TARGET)
    fused = pipeline.fuse(to_relax(model), target)
    tasks = [t.task_name for t in ms.relax_integration.extract_tasks(fused, target)]
    applied, _, _ = apply_records(fused, target, ms.database.MemoryDatabase())
    vm = relax.VirtualMachine(tvm.compile(applied, target), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(x) for x in model.inputs]).numpy()
    return model, fused, tasks, out


def test_fp16_converts_the_model_and_is_checked_as_a_reduced_precision():
    import numpy as np

    from tunefarm.core.stats import compare_outputs
    from tunefarm.host.tuning.pipeline import Pipeline

    model, fused, tasks, out = _build("convnet", Pipeline(fold_batchnorm=True, precision="fp16"))
    assert out.dtype == np.float32  # the model's output keeps its dtype: the cast back is part of the module
    text = fused.script()
    assert 'dtype="float16"' in text and any("cast" in t for t in tasks), tasks
    num = compare_outputs([out], model.reference_outputs(), 1e-3, 1e-3, "fp16")
    assert num["ok"] and num["check"].startswith("fp16: relative L2") and num["rel_l2_err"] > 0, num
    _, _, fp32_tasks, fp32_out = _build("convnet", Pipeline(fold_batchnorm=True))
    assert not any("cast" in t for t in fp32_tasks)
    assert compare_outputs([fp32_out], model.reference_outputs(), 1e-5, 1e-5)["ok"]


def test_folding_batchnorm_removes_it_from_every_task():
    from tunefarm.core.stats import compare_outputs
    from tunefarm.host.tuning.pipeline import Pipeline

    model, _, kept, _ = _build("resblock", Pipeline())
    assert any("divide" in t for t in kept), kept  # BatchNorm's arithmetic in the conv epilogue
    model, _, folded, out = _build("resblock", Pipeline(fold_batchnorm=True))
    assert folded and not any("divide" in t or "subtract" in t for t in folded), folded
    assert compare_outputs([out], model.reference_outputs(), 1e-4, 1e-4)["ok"]


@pytest.mark.parametrize("value, message", [("fp8", "tuning.precision must be fp32 or fp16"),
                                            ("FP16", "tuning.precision must be fp32 or fp16")])
def test_precision_option_parses(value, message):
    base = {"name": "p", "model": {"source": "builtin", "name": "convnet"}, "device": {"key": "cpu"}}
    assert job_from_dict(base).tuning.precision == "fp32"
    assert job_from_dict({**base, "tuning": {"precision": "fp16"}}).tuning.precision == "fp16"
    with pytest.raises(TunefarmError, match=message):
        job_from_dict({**base, "tuning": {"precision": value}})


def test_nhwc_layout_moves_convs_and_keeps_the_model_numerics():
    """layout NHWC on the convnet (conv-relu, conv-relu, mean, linear): both convs read NHWC data and OHWI
    weights, the one layout change is the model's input (the mean over H, W ends the run of convs, so nothing
    goes back), and the untuned build still computes the model."""
    from tvm import relax

    from tunefarm.core.stats import compare_outputs
    from tunefarm.host.tuning.pipeline import Pipeline

    model, fused, tasks, out = _build("convnet", Pipeline(fold_batchnorm=True, layout="NHWC"))
    calls = {}
    for binding in fused["main"].body.blocks[0].bindings:
        call = binding.value
        if isinstance(call, relax.Call) and call.op.name == "relax.call_tir":
            calls[call.args[0].name_hint] = ([tuple(int(d) for d in a.ty.shape) for a in call.args[1].fields],
                                             tuple(int(d) for d in call.ty.shape))
    convs = {name: c for name, c in calls.items() if "conv2d" in name}
    assert len(convs) == 2, calls
    (first_in, first_w, _), first_out = convs["fused_conv2d_add_relu"]
    (second_in, second_w, _), second_out = convs["fused_conv2d1_add_relu"]
    assert first_in == (1, 32, 32, 3) and first_w == (16, 3, 3, 3) and first_out == (1, 32, 32, 16), convs
    assert second_in == (1, 32, 32, 16) and second_w == (16, 3, 3, 16), convs  # OHWI, not OIHW
    assert [name for name in calls if "transpose" in name] == ["transpose"] and calls["transpose"][0] == [(1, 3, 32, 32)]
    assert compare_outputs([out], model.reference_outputs(), 1e-4, 1e-4)["ok"]
    _, nchw, _, _ = _build("convnet", Pipeline(fold_batchnorm=True))
    assert "transpose" not in nchw["main"].script()


def test_layout_option_parses_and_is_recorded():
    import tvm

    from tunefarm.host.tuning.pipeline import LEGACY, Pipeline, resolve_pipeline

    base = {"name": "p", "model": {"source": "builtin", "name": "convnet"}, "device": {"key": "cpu"}}
    assert job_from_dict(base).tuning.layout is None
    assert job_from_dict({**base, "tuning": {"layout": "NHWC"}}).tuning.layout == "NHWC"
    for bad in ("nhwc", "NCHW16c", 1):
        with pytest.raises(TunefarmError, match="tuning.layout must be NCHW, NHWC or NCHWc"):
            job_from_dict({**base, "tuning": {"layout": bad}})
    cpu = tvm.target.Target(TARGET)
    assert resolve_pipeline(cpu).layout == "NCHW" and resolve_pipeline(cpu, layout="NHWC").layout == "NHWC"
    # A job that places groups on a vendor library gets channel blocks by default on a CPU, in fp32 only; a layout
    # the job file names wins; other targets keep NCHW.
    assert resolve_pipeline(cpu, vendor_placed=True).layout == "NCHWc"
    assert resolve_pipeline(cpu, layout="NCHW", vendor_placed=True).layout == "NCHW"
    assert resolve_pipeline(cpu, precision="fp16", vendor_placed=True).layout == "NCHW"
    assert resolve_pipeline(tvm.target.Target({"kind": "cuda", "arch": "sm_80"}), vendor_placed=True).layout == "NCHW"
    nchwc = Pipeline(fold_batchnorm=True, layout="NCHWc")
    assert Pipeline.from_json(nchwc.to_json()) == nchwc and resolve_pipeline(cpu, layout="NCHWc").layout == "NCHWc"
    with pytest.raises(TunefarmError, match="tuning.layout NCHWc is a CPU layout"):
        resolve_pipeline(tvm.target.Target({"kind": "cuda", "arch": "sm_80"}), layout="NCHWc")
    nhwc = Pipeline(fold_batchnorm=True, layout="NHWC")
    assert nhwc.to_json()["layout"] == "NHWC" and Pipeline.from_json(nhwc.to_json()) == nhwc
    assert "NHWC" in nhwc.describe()
    # job directories from before the option were tuned in the models' own layout
    assert Pipeline.from_json({"fold_batchnorm": True, "precision": "fp16"}).layout == "NCHW"
    assert LEGACY.layout == "NCHW"


def test_nchwc_blocks_depthwise_convs_and_relu6_too_and_keeps_the_numerics():
    """A MobileNet block (1x1 conv + ReLU6, depthwise 3x3 + ReLU6, 1x1 conv) in NCHWc: every conv in channel
    blocks, the depthwise one as depthwise_conv2d_NCHWc, each clip fused into its conv, one layout change at the
    input and one at the output (before: clips had no layout rule, so each was wrapped in two layout changes and
    the depthwise conv stayed NCHW); the output matches the plain NCHW build."""
    import numpy as np
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms
    from tvm.script import ir as I, relax as R

    from tunefarm.host.tuning.pipeline import Pipeline, apply_records

    rng = np.random.default_rng(0)
    w1, w2, w3 = (rng.standard_normal(s).astype("float32") * 0.3 for s in ((32, 16, 1, 1), (32, 1, 3, 3), (16, 32, 1, 1)))
    b1 = rng.standard_normal((1, 32, 1, 1)).astype("float32")

    @I.ir_module
    class Block:  # pylint: disable=too-few-public-methods
        @R.function
        def main(x: R.Tensor((1, 16, 14, 14), "float32")):
            with R.dataflow():
                y = R.clip(R.add(R.nn.conv2d(x, R.const(w1)), R.const(b1)), 0.0, 6.0)
                y = R.clip(R.nn.conv2d(y, R.const(w2), padding=[1, 1, 1, 1], groups=32), 0.0, 6.0)
                y = R.nn.conv2d(y, R.const(w3))
                R.output(y)
            return y

    target = tvm.target.Target(TARGET)
    x = rng.standard_normal((1, 16, 14, 14)).astype("float32")
    outs = {}
    for layout in ("NCHW", "NCHWc"):
        fused = Pipeline(fold_batchnorm=True, layout=layout).fuse(Block, target)
        tasks = sorted(t.task_name for t in ms.relax_integration.extract_tasks(fused, target))
        applied, _, _ = apply_records(fused, target, ms.database.MemoryDatabase())
        outs[layout] = relax.VirtualMachine(tvm.compile(applied, target), tvm.cpu())["main"](
            tvm.runtime.tensor(x)).numpy()
    assert sum("layout_transform" in t for t in tasks) == 2, tasks
    assert any(t.startswith("fused_depthwise_conv2d_NCHWc") and "clip" in t for t in tasks), tasks
    assert not [t for t in tasks if t.startswith("tir_clip")], tasks  # every clip fused into a conv
    assert np.linalg.norm(outs["NCHWc"] - outs["NCHW"]) / np.linalg.norm(outs["NCHW"]) < 1e-5
