"""cuBLAS and cuDNN as vendors of the placement mechanism (issue 33, item 1), what a machine without a GPU can check:
the host's codegens (JSON graphs as TVM's runtimes read them), the partition of a small fp16 NHWC model, the
one-line errors of ``tunefarm runtime cuda-libs`` where NVIDIA's headers or libraries are missing, and why
placement does or does not use a vendor. Running the plugins needs a CUDA device: bench/device/gpu_studies_h200.sh
(bench/cuda_libs.py) does that on the lent GPU machine.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from tunefarm.core import cudalibs
from tunefarm.core.errors import TunefarmError


def _tiny_fp16():
    """conv(NHWC, OHWI) + bias + ReLU, a mean, a Linear as PyTorch exports it (matmul of permute_dims(w)) + bias."""
    from tvm.script import ir as I
    from tvm.script import relax as R

    @I.ir_module
    class Tiny:  # pylint: disable=too-few-public-methods
        @R.function
        def main(x: R.Tensor((1, 8, 8, 16), "float16"), w: R.Tensor((32, 3, 3, 16), "float16"),
                 b: R.Tensor((1, 1, 1, 32), "float16"), fw: R.Tensor((10, 32), "float16"),
                 fb: R.Tensor((10,), "float16")):
            with R.dataflow():
                y = R.nn.conv2d(x, w, padding=(1, 1), data_layout="NHWC", kernel_layout="OHWI", out_dtype="float16")
                r = R.nn.relu(R.add(y, b))
                m = R.mean(r, axis=[1, 2])
                o = R.add(R.matmul(m, R.permute_dims(fw), out_dtype="float16"), fb)
                R.output(o)
            return o

    return Tiny


def _graphs(mod) -> dict[str, dict]:
    """The JSON graph of every Codegen function of a partitioned module, by composite name."""
    from tvm import relax

    from tunefarm.host.byoc.cuda_libs import check_graph, lower
    from tunefarm.host.byoc.json_codegen import JSONSerializer

    out = {}
    for _gv, func in mod.functions.items():
        if isinstance(func, relax.Function) and func.attrs is not None and "Codegen" in func.attrs:
            ser = JSONSerializer({}, lower)
            ser.serialize(func)
            graph = json.loads(ser.to_json())
            check_graph(graph)
            (kernel,) = [n for n in graph["nodes"] if n["op"] == "kernel"]
            out[kernel["name"]] = graph
    return out


def test_the_codegens_write_the_json_graphs_the_runtimes_read():
    from tunefarm.host.byoc import cublas, cudnn

    mod = cublas.partition(cudnn.partition(_tiny_fp16()))
    graphs = _graphs(mod)
    assert set(graphs) == {"cudnn.conv2d.nhwc_ohwi_bias_relu", "cublas.matmul_transposed_bias"}
    conv = graphs["cudnn.conv2d.nhwc_ohwi_bias_relu"]
    # cuDNN's runtime takes the data and weight shapes from nodes 0 and 1, its format from out_layout, its compute
    # type from out_dtype, (top, left) of the padding
    assert [n["attrs"]["shape"][0] for n in conv["nodes"][:2]] == [[1, 8, 8, 16], [32, 3, 3, 16]]
    kernel = conv["nodes"][-1]
    assert kernel["inputs"] == [[0, 0, 0], [1, 0, 0], [2, 0, 0]]
    assert {k: kernel["attrs"][k] for k in ("out_layout", "out_dtype", "padding", "strides", "groups")} == {
        "out_layout": "NHWC", "out_dtype": "float16", "padding": [1, 1, 1, 1], "strides": [1, 1], "groups": 1}
    assert kernel["attrs"]["shape"] == [[1, 8, 8, 32]] and kernel["attrs"]["dtype"] == ["float16"]
    # cuBLAS: data, the weight as is (transposed by the composite's name), bias; inputs by entry, whatever the
    # order of the function's parameters
    mm = graphs["cublas.matmul_transposed_bias"]
    names = [n["name"] for n in mm["nodes"]]
    kernel = mm["nodes"][-1]
    assert [names[e[0]] for e in kernel["inputs"]] == ["m", "fw", "fb"]
    assert kernel["attrs"]["out_dtype"] == "float16" and mm["heads"] == [[len(names) - 1, 0, 0]]


def test_the_graph_check_refuses_what_the_runtimes_would_misread():
    from tunefarm.host.byoc.cuda_libs import check_graph

    node = {"op": "input", "name": "x", "attrs": {}}
    conv = {"op": "kernel", "name": "cudnn.conv2d.nhwc_ohwi", "inputs": [[1, 0, 0], [0, 0, 0]], "attrs": {}}
    with pytest.raises(ValueError, match="nodes 0 and 1"):
        check_graph({"nodes": [node, node, conv]})
    with pytest.raises(ValueError, match="one kernel"):
        check_graph({"nodes": [node, dict(conv, inputs=[[0, 0, 0], [1, 0, 0]]), dict(conv, inputs=[[0, 0, 0]])]})


def test_groups_are_described_and_select_decides():
    from tunefarm.host.byoc import cublas, cudnn

    (conv,) = cudnn.candidate_groups(_tiny_fp16())
    assert conv.op == "conv2d" and conv.attrs["dtype"] == "float16" and conv.flops == 2 * 64 * 32 * 16 * 9
    assert conv.shapes["bias"] == (1, 1, 1, 32) and conv.key() == cudnn.candidate_groups(_tiny_fp16())[0].key()
    (mm,) = cublas.candidate_groups(_tiny_fp16())
    assert mm.composite == "cublas.matmul_transposed_bias" and mm.flops == 2 * 10 * 32
    # refused as conv+bias+ReLU, the conv alone is offered next (a bias without ReLU is not offloaded to cuDNN)
    seen = []
    part = cudnn.partition(_tiny_fp16(), lambda g: seen.append(g.composite) or g.composite.endswith(".nhwc_ohwi"))
    assert seen == ["cudnn.conv2d.nhwc_ohwi_bias_relu", "cudnn.conv2d.nhwc_ohwi"]
    assert set(_graphs(part)) == {"cudnn.conv2d.nhwc_ohwi"}
    assert not _graphs(cudnn.partition(_tiny_fp16(), lambda g: False))


def test_a_small_fp16_model_in_nhwc_partitions_to_cudnn():
    """The farm's fp16 NHWC pipeline for a CUDA target (no GPU needed): BatchNorm folded, ToMixedPrecision,
    convs in NHWC/OHWI; cuDNN takes every conv (with bias and ReLU where ReLU follows), in fp16."""
    import tvm

    from tunefarm.core.jobspec import ModelSpec
    from tunefarm.host.byoc import cudnn
    from tunefarm.host.models import load_model, to_relax
    from tunefarm.host.tuning.pipeline import resolve_pipeline

    target = tvm.target.Target("nvidia/nvidia-h100")
    pipeline = resolve_pipeline(target, fold_batchnorm=True, precision="fp16", layout="NHWC")
    graph = pipeline.graph(to_relax(load_model(ModelSpec(source="builtin", name="resblock"))), target)
    groups = cudnn.candidate_groups(graph)
    assert groups and all(g.attrs["dtype"] == "float16" and ".nhwc_ohwi" in g.composite for g in groups)
    assert any(g.composite.endswith("_bias_relu") for g in groups)
    graphs = _graphs(cudnn.partition(graph))
    assert graphs and all(g["nodes"][-1]["attrs"]["out_dtype"] == "float16" for g in graphs.values())
    # the same model in fp32 NCHW: cuDNN's NCHW/OIHW composites
    fp32 = resolve_pipeline(target, fold_batchnorm=True, precision="fp32", layout="NCHW")
    groups32 = cudnn.candidate_groups(fp32.graph(to_relax(load_model(ModelSpec(source="builtin", name="resblock"))),
                                                 target))
    assert groups32 and all(".nchw_oihw" in g.composite and g.attrs["dtype"] == "float32" for g in groups32)


def test_missing_headers_or_libraries_are_one_line_errors(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TunefarmError, match=r"no cuda_runtime\.h: .*not found \(looked in .*empty") as err:
        cudalibs.find_nvidia(roots=[empty])
    assert "\n" not in str(err.value)
    # headers there, cuDNN's library missing
    inc, lib = tmp_path / "tk" / "include", tmp_path / "tk" / "lib"
    (inc / "crt").mkdir(parents=True)
    lib.mkdir()
    for name in ("cuda_runtime.h", "crt/host_config.h", "cublas_v2.h", "cublasLt.h", "cudnn.h"):
        (inc / name).write_text("")
    for name in ("libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13"):
        (lib / name).write_text("")
    with pytest.raises(TunefarmError, match=r"no libcudnn\.so: .*nvidia-cudnn"):
        cudalibs.find_nvidia(roots=[tmp_path / "tk"])
    found = cudalibs.find_nvidia(("cublas",), roots=[tmp_path / "tk"])
    assert found["lib:cublas"] == lib / "libcublas.so.13" and "cudnn.h" not in found
    # the command: one line, exit code 2, nothing cached
    from tunefarm.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(cudalibs, "nvidia_roots", lambda: [empty])
    res = CliRunner().invoke(main, ["runtime", "cuda-libs"])
    assert res.exit_code == 2, res.output
    assert res.output.count("\n") == 1 and "no cuda_runtime.h" in res.output
    assert not (tmp_path / "cache" / "tunefarm" / "cuda-libs").exists() or not any(
        (tmp_path / "cache" / "tunefarm" / "cuda-libs").glob("tvm-*/*.so"))


def test_loading_without_plugins_says_how_to_build_them(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(cudalibs.PLUGIN_ENV, raising=False)
    if cudalibs.loaded("cudnn") is None:
        with pytest.raises(TunefarmError, match="tunefarm runtime cuda-libs"):
            cudalibs.load_plugin("cudnn")
    assert cudalibs.probe()["cudnn"] == {"available": False,
                                         "reason": "no plugin built for this TVM (tunefarm runtime cuda-libs)"}
    monkeypatch.setenv(cudalibs.PLUGIN_ENV, "off")
    assert cudalibs.probe()["cublas"]["reason"] == "turned off (TUNEFARM_CUDA_LIBS=off)"
    monkeypatch.setenv(cudalibs.PLUGIN_ENV, str(tmp_path / "nowhere"))
    assert "is not a directory" in cudalibs.probe()["cublas"]["reason"]

    from tunefarm.device_agents.probe import probe_vendor

    monkeypatch.delenv(cudalibs.PLUGIN_ENV)
    vendor = probe_vendor(cuda=False)
    assert vendor["cudnn"] == {"available": False, "reason": "no CUDA device on this machine"} and "onednn" in vendor


def test_vendor_usability_reasons(monkeypatch):
    import tvm

    from tunefarm.host.placement import vendors

    cpu, gpu = tvm.target.Target({"kind": "llvm"}), tvm.target.Target("nvidia/nvidia-h100")
    # auto on a CPU target leaves the GPU libraries out without a word; named, they say why
    used, why = vendors.usable(["cudnn", "cublas"], cpu, [])
    assert not used and why == ["cudnn: runs on cuda targets, not llvm", "cublas: runs on cuda targets, not llvm"]
    assert not any(w.startswith(("cudnn", "cublas")) for w in vendors.usable("auto", cpu, [])[1])
    # on a CUDA target: the host must load the plugin, every agent must report it
    monkeypatch.setattr(vendors.Vendor, "host_problem", lambda self: None)
    agent_ok = SimpleNamespace(agent_id="gpu-a", vendor={"cudnn": {"available": True}, "cublas": {"available": True}})
    agent_no = SimpleNamespace(agent_id="gpu-b", vendor={"cudnn": {"available": False, "reason": "no plugin built"}})
    used, why = vendors.usable(["cudnn", "cublas"], gpu, [agent_ok, agent_no])
    assert [v.name for v in used] == [] and why == ["cudnn: agent gpu-b: cudnn no plugin built",
                                                    "cublas: agent gpu-b does not report cublas"]
    used, why = vendors.usable("auto", gpu, [agent_ok])
    assert [v.name for v in used] == ["cublas", "cudnn"] and why == []
    assert vendors.VENDORS["cudnn"].precisions == ("fp32", "fp16") and vendors.VENDORS["onednn"].precisions == ("fp32",)


def test_a_hostile_agents_vendor_entries_place_nothing_and_print_safely(monkeypatch):
    """DeviceInfo.vendor comes from the agent: what is not a JSON object of bounded size is refused when it arrives
    (tracker client), an entry that does not say ``available: true`` exactly makes the vendor unusable, and the
    agent's reason reaches the job's problems as one printable, bounded line."""
    import json

    import tvm

    from tunefarm.core.wire import DeviceInfo
    from tunefarm.host.placement import vendors
    from tunefarm.tracker.client import _describe_vendor

    base = {"key": "gpu", "agent_id": "box:1"}
    for vendor in (["cudnn"], "cudnn", {"cudnn": {"reason": "x" * 100_000}}, {"cudnn": [[[[[[[[[[[[["deep"]]]]]]]]]]]]]}):
        with pytest.raises(ValueError):
            DeviceInfo.from_json({**base, "vendor": vendor})
    monkeypatch.setattr(vendors.Vendor, "host_problem", lambda self: None)
    gpu = tvm.target.Target("nvidia/nvidia-h100")
    hostile = {"cudnn": {"available": "true", "reason": "\x1b[2J[red]cleared\nsecond line\u202e" + "r" * 900},
               "cublas": {"available": 1, "version": "\x1b]0;title\x07"}}
    info = DeviceInfo.from_json(json.loads(json.dumps({**base, "agent_id": "box\x1b[1m:1", "vendor": hostile})))
    used, why = vendors.usable(["cudnn", "cublas"], gpu, [info])
    assert used == [] and len(why) == 2, why
    for line in why:
        assert line.isprintable() and "\x1b" not in line and len(line) < 500, line
    assert why[0].startswith("cudnn: agent box\\x1b[1m:1: cudnn \\x1b[2J[red]cleared\\x0asecond line\\u202e") \
        and why[0].endswith("..."), why[0]
    assert why[1] == "cublas: agent box\\x1b[1m:1: cublas not available", why[1]
    # `tunefarm devices` lists a vendor only where it is available, exactly True
    assert _describe_vendor(info.vendor) == "-"
    assert _describe_vendor({"cudnn": {"available": True, "version": "9.19"}, "cublas": "yes"}) == "cudnn 9.19"


def test_the_host_refuses_a_vendor_whose_plugin_is_off(monkeypatch):
    import tvm

    from tunefarm.host.placement import vendors

    monkeypatch.setenv(cudalibs.PLUGIN_ENV, "off")
    if cudalibs.loaded("cublas") is not None:
        pytest.skip("the cuBLAS plugin is already loaded in this process")
    agent = SimpleNamespace(agent_id="gpu-a", vendor={"cublas": {"available": True}})
    used, why = vendors.usable(["cublas"], tvm.target.Target("nvidia/nvidia-h100"), [agent])
    assert not used and why == ["cublas: no cuBLAS plugin for this TVM (turned off: TUNEFARM_CUDA_LIBS=off)"]


def test_a_placement_file_may_name_the_gpu_libraries(tmp_path):
    from tunefarm.host.placement import result

    path = result.write(tmp_path, {"chosen": "tvm-placed", "offload": {"cudnn": ["k1"], "cublas": []}})
    assert result.chosen_offload(result.read(path)) == {"cudnn": ["k1"], "cublas": []}


def _nvidia_why_not() -> str | None:
    try:
        cudalibs.find_nvidia()
    except TunefarmError as err:
        return str(err)
    return None


@pytest.mark.slow  # builds the plugins (about a minute on 4 cores)
@pytest.mark.skipif(_nvidia_why_not() is not None, reason=_nvidia_why_not() or "")
def test_an_offloaded_model_compiles_for_cuda_where_the_plugins_build(tmp_path, monkeypatch):
    """Where NVIDIA's headers and libraries are (the pip packages of a CUDA PyTorch are enough, no GPU): the plugins
    build, the codegens create the runtimes' modules and the whole module compiles and exports for a CUDA target."""
    from tunefarm.device_agents.cuda_libs_runtime import build

    directory, _seconds = build(tmp_path / "plugins")
    monkeypatch.setenv(cudalibs.PLUGIN_ENV, str(directory))
    import tvm

    from tunefarm.host.byoc import cublas, cudnn

    mod = cublas.offload(cudnn.offload(_tiny_fp16()))
    kinds = sorted(m.kind for m in mod.attrs["external_mods"])
    assert kinds == ["cublas_json", "cudnn_json"]
    tvm.compile(mod, tvm.target.Target("nvidia/nvidia-h100")).export_library(str(tmp_path / "m.so"))
    assert (tmp_path / "m.so").stat().st_size > 0


def test_a_group_is_timed_inside_a_cuda_graph_on_a_gpu():
    """Placement times a group alone; on a GPU the builds replay Relax CUDA graphs, and a lone call on the
    function's own input and output is never captured (its time would be cuDNN's per-call host setup, not its
    kernel). placement.measure.captured puts negations around the group so that both sides' group launches are
    inside the captured function, and the outputs are the group's exactly (checked on this CPU)."""
    import numpy as np
    import tvm
    from tvm import relax

    from tunefarm.host.placement.measure import CAPTURE_PREFIX, for_device, group_modules
    from tunefarm.host.placement.vendors import VENDORS
    from tunefarm.host.tuning.pipeline import Pipeline

    rng = np.random.default_rng(0)

    def const(shape):
        return relax.const((rng.standard_normal(shape) * 0.3).astype("float16"))

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 8, 16), "float16"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, const((16, 3, 3, 16)), padding=1, data_layout="NHWC",
                                           kernel_layout="OHWI", out_dtype="float16"))
            out = bb.emit_output(bb.emit(relax.op.nn.relu(relax.op.add(y, const((1, 1, 1, 16))))))
        bb.emit_func_output(out)
    from tunefarm.host.byoc import cudnn

    (gm,) = group_modules(bb.get(), VENDORS["cudnn"])
    assert for_device(gm, "cpu") is gm
    timed = for_device(gm, "cuda")
    assert timed.key == gm.key and timed.group == gm.group

    gpu = tvm.target.Target("nvidia/nvidia-h100")
    tvm_side = Pipeline(precision="fp16", layout="NHWC").lower(timed.mod, gpu)
    with tvm.transform.PassContext(config={"relax.backend.use_cuda_graph": True}), gpu:
        lowered = relax.pipeline.get_default_pipeline(gpu)(tvm_side)
    capture = [f.script() for gv, f in lowered.functions.items() if "cuda_graph_capture" in gv.name_hint]
    main = lowered["main"].script()
    assert len(capture) == 1 and "fused_conv2d_add_relu(" in capture[0], main
    assert "fused_conv2d_add_relu(" not in main and "run_or_capture" in main, main  # replayed, not called
    # The cuDNN side (its runtime needs the plugin, not here): the group's call reads and writes none of main's
    # own tensors, as the TVM side's kernel above, so the rewriting captures it alike (seen on the H100's build).
    part = cudnn.partition(timed.mod)["main"]
    bindings = [b for blk in part.body.blocks for b in blk.bindings]
    (group,) = [b for b in bindings if isinstance(b.value, relax.Call)
                and "cudnn" in getattr(b.value.op, "name_hint", "")]
    assert not any(arg.same_as(p) for arg in group.value.args for p in part.params), part.script()
    consumers = [b for b in bindings if isinstance(b.value, relax.Call) and any(
        isinstance(a, relax.Tuple) and any(f.same_as(group.var) for f in a.fields) for a in b.value.args)]
    assert len(consumers) == 1 and CAPTURE_PREFIX in consumers[0].value.args[0].name_hint, part.script()
    # The TVM side's group kernel is the model's task (its record applies); only the negations are extra.
    names = [gv.name_hint for gv in tvm_side.functions]
    assert "fused_conv2d_add_relu" in names and all(n.startswith(CAPTURE_PREFIX) for n in names
                                                    if n not in ("main", "fused_conv2d_add_relu")), names

    data = (rng.standard_normal((1, 8, 8, 16)) * 0.5).astype("float16")
    cpu = tvm.target.Target({"kind": "llvm"})
    outs = [relax.VirtualMachine(tvm.compile(Pipeline(precision="fp16", layout="NHWC").lower(m, cpu), cpu),
                                 tvm.cpu())["main"](tvm.runtime.tensor(data)).numpy() for m in (gm.mod, timed.mod)]
    assert outs[0].shape == outs[1].shape and np.array_equal(outs[0], outs[1]) and np.abs(outs[0]).max() > 0
