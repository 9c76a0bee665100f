"""cuBLAS and cuDNN through the farm's plugins and codegens on a CUDA GPU: build, numerics, time per call.

    python -m bench.cuda_libs [--out bench/results] [--build-only] [--no-build]

1. ``tunefarm runtime cuda-libs`` (:func:`tunefarm.device_agents.cuda_libs_runtime.ensure_plugins`): the two
   plugins built from the wheel's sources against the NVIDIA libraries found here (PyTorch's pip packages) and
   checked (a matmul and a convolution against numpy, fp16/fp32, NHWC/NCHW). ``--build-only`` stops here.
2. Operator groups as the placement offloads them (:mod:`tunefarm.host.byoc.cublas`, ``.cudnn``: partition, the
   Python codegen, the JSON runtimes), ResNet shapes at fp16 in NHWC (one fp32 NCHW conv), each compiled for this
   GPU, run, and compared with PyTorch in fp32 on the GPU; beside it the same group as TVM compiles it without
   records (its default GPU schedules) and PyTorch eager (fp16, channels_last, ``cudnn.benchmark``). Per call: the
   host-timed mean of 200 calls (what a model run pays: launch and per-call setup included) and the GPU's own
   kernel time (CUPTI through ``torch.profiler``: every kernel the process launched, whichever library did).
3. cuDNN per algorithm, for one 3x3 conv: TVM's packed ``tvm.contrib.cudnn.conv2d.forward`` with each forward
   algorithm in turn (the JSON runtime picks one with ``cudnnFindConvolutionForwardAlgorithm`` at load), against
   PyTorch's choice.

4. The whole model, vendor only (``--model``, default resnet18; ``none`` skips it): fp16, BatchNorm folded, convs
   in NHWC (the farm's fp16 pipeline with ``tuning.layout: NHWC``), every conv cuDNN can run on cuDNN and the
   Linear on cuBLAS, the rest as TVM compiles it without records (default GPU schedules), with and without
   Relax's CUDA graphs; beside it the same graph all-TVM untuned, and PyTorch eager fp16. No tuning: the vendor
   libraries' own row of the issue's table.

Writes <out>/gpu-cuda-libs-<gpu>-<model>[-quick].{json,md}.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from bench import common

ALGOS = ("IMPLICIT_GEMM", "IMPLICIT_PRECOMP_GEMM", "GEMM", "DIRECT", "FFT", "FFT_TILING", "WINOGRAD",
         "WINOGRAD_NONFUSED")
# (name, N, H, W, C in, C out, kernel, stride, pad): ResNet-18's convs at batch 1
CONVS = (("stem 7x7/2 3->64", 1, 224, 224, 3, 64, 7, 2, 3), ("3x3 64->64 56x56", 1, 56, 56, 64, 64, 3, 1, 1),
         ("3x3/2 64->128 56x56", 1, 56, 56, 64, 128, 3, 2, 1), ("3x3 128->128 28x28", 1, 28, 28, 128, 128, 3, 1, 1),
         ("3x3 256->256 14x14", 1, 14, 14, 256, 256, 3, 1, 1), ("3x3 512->512 7x7", 1, 7, 7, 512, 512, 3, 1, 1),
         ("1x1/2 256->512 14x14", 1, 14, 14, 256, 512, 1, 2, 0))
CALLS = 200


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} cuda_libs: {msg}", flush=True)


def host_ms(fn: Callable[[], Any], sync: Callable[[], Any], calls: int = CALLS) -> float:
    for _ in range(20):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t0) / calls * 1e3


def kernel_us(fn: Callable[[], Any], sync: Callable[[], Any], calls: int = 20) -> float | None:
    """The GPU's time per call: the CUDA kernels (and memsets/copies) CUPTI saw during ``calls`` calls."""
    import torch

    try:
        sync()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            sync()
        total = sum(e.time_range.elapsed_us() for e in prof.events()
                    if e.device_type == torch.autograd.DeviceType.CUDA)
        return total / calls
    except Exception as err:  # pylint: disable=broad-except
        log(f"profiler: {err}")
        return None


def conv_module(n, h, w, cin, cout, k, stride, pad, dtype: str, layout: str, bias_relu: bool):
    from tvm import relax

    nhwc = layout == "NHWC"
    x = relax.Var("x", relax.TensorType((n, h, w, cin) if nhwc else (n, cin, h, w), dtype))
    wt = relax.Var("w", relax.TensorType((cout, k, k, cin) if nhwc else (cout, cin, k, k), dtype))
    params = [x, wt]
    bb = relax.BlockBuilder()
    b = relax.Var("b", relax.TensorType((1, 1, 1, cout) if nhwc else (1, cout, 1, 1), dtype))
    if bias_relu:
        params.append(b)
    with bb.function("main", params):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, wt, strides=stride, padding=pad, data_layout=layout,
                                           kernel_layout="OHWI" if nhwc else "OIHW", out_dtype=dtype))
            if bias_relu:
                y = bb.emit(relax.op.nn.relu(relax.op.add(y, b)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def matmul_module(m, k, n, dtype: str, transposed: bool, relu: bool):
    from tvm import relax

    x = relax.Var("x", relax.TensorType((m, k), dtype))
    w = relax.Var("w", relax.TensorType((n, k) if transposed else (k, n), dtype))
    b = relax.Var("b", relax.TensorType((n,), dtype))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, w, b]):
        with bb.dataflow():
            rhs = bb.emit(relax.op.permute_dims(w)) if transposed else w
            y = bb.emit(relax.op.add(relax.op.matmul(x, rhs, out_dtype=dtype), b))
            if relu:
                y = bb.emit(relax.op.nn.relu(y))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def case_rows(name: str, mod, vendor, torch_fn, inputs, target, dev) -> list[dict[str, Any]]:
    """The group offloaded (vendor), as TVM compiles it untuned, and PyTorch: error vs PyTorch fp32, times."""
    import numpy as np
    import torch
    import tvm
    from tvm import relax

    ref = torch_fn([torch.from_numpy(a).cuda().float() for a in inputs]).cpu().numpy()
    rows = []
    sync = torch.cuda.synchronize
    offloaded = vendor.offload(mod)
    n_ext = vendor.offloaded_functions(offloaded)
    for label, module in ((f"{vendor.CODEGEN} (farm codegen + JSON runtime)", offloaded),
                          ("TVM untuned (default GPU schedules)", mod)):
        row: dict[str, Any] = {"case": name, "build": label}
        try:
            t0 = time.perf_counter()
            ex = tvm.compile(module, target)
            row["compile_s"] = round(time.perf_counter() - t0, 1)
            vm = relax.VirtualMachine(ex, dev)
            args = [tvm.runtime.tensor(a, dev) for a in inputs]
            out = vm["main"](*args).numpy().astype("float64")
            row["rel_err"] = float(np.abs(out - ref).max() / (np.abs(ref).max() or 1.0))
            fn = lambda: vm["main"](*args)  # noqa: E731
            row["host_ms"] = host_ms(fn, sync)
            row["kernel_us"] = kernel_us(fn, sync)
            if module is offloaded:
                row["vendor_functions"] = n_ext
        except Exception as err:  # pylint: disable=broad-except
            traceback.print_exc()
            row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"
        rows.append(row)
    targs = [torch.from_numpy(a).cuda() for a in inputs]
    row = {"case": name, "build": "PyTorch eager (fp16, channels_last, cudnn.benchmark)"}
    try:
        out = torch_fn(targs).float().cpu().numpy().astype("float64")
        row["rel_err"] = float(np.abs(out - ref).max() / (np.abs(ref).max() or 1.0))
        row["host_ms"] = host_ms(lambda: torch_fn(targs), sync)
        row["kernel_us"] = kernel_us(lambda: torch_fn(targs), sync)
    except Exception as err:  # pylint: disable=broad-except
        row["error"] = f"{type(err).__name__}: {err}"[:300]
    rows.append(row)
    for r in rows:
        log(f"{name} | {r['build']}: " + (r.get("error") or f"{r['host_ms']:.4f} ms/call host, kernels "
                                          f"{r['kernel_us'] if r['kernel_us'] is None else round(r['kernel_us'], 1)} us, "
                                          f"rel err {r['rel_err']:.1e}"))
    return rows


def conv_case(spec, dtype: str, layout: str, bias_relu: bool, target, dev, rng):
    import torch
    import torch.nn.functional as F

    from tunefarm.host.byoc import cudnn

    name, n, h, w, cin, cout, k, stride, pad = spec
    nhwc = layout == "NHWC"
    x = rng.standard_normal((n, h, w, cin) if nhwc else (n, cin, h, w)).astype(dtype)
    wt = (rng.standard_normal((cout, k, k, cin) if nhwc else (cout, cin, k, k)) / (k * k * cin) ** 0.5).astype(dtype)
    b = rng.standard_normal((1, 1, 1, cout) if nhwc else (1, cout, 1, 1)).astype(dtype)
    inputs = [x, wt, b] if bias_relu else [x, wt]

    def torch_fn(t):  # NHWC / OHWI tensors viewed as NCHW channels_last, as PyTorch keeps them
        xx, ww = (t[0].permute(0, 3, 1, 2), t[1].permute(0, 3, 1, 2)) if nhwc else (t[0], t[1])
        y = F.conv2d(xx, ww, stride=stride, padding=pad)
        if bias_relu:
            y = F.relu(y + (t[2].permute(0, 3, 1, 2) if nhwc else t[2]))
        return y.permute(0, 2, 3, 1) if nhwc else y

    torch.backends.cudnn.benchmark = True
    mod = conv_module(n, h, w, cin, cout, k, stride, pad, dtype, layout, bias_relu)
    label = f"conv {name}, {layout} {dtype}" + (" +bias+ReLU" if bias_relu else "")
    return case_rows(label, mod, cudnn, torch_fn, inputs, target, dev)


def matmul_case(m, k, n, dtype, transposed, relu, target, dev, rng):
    import torch

    from tunefarm.host.byoc import cublas

    x = rng.standard_normal((m, k)).astype(dtype)
    w = (rng.standard_normal((n, k) if transposed else (k, n)) / k ** 0.5).astype(dtype)
    b = rng.standard_normal((n,)).astype(dtype)

    def torch_fn(t):
        y = t[0] @ (t[1].t() if transposed else t[1]) + t[2]
        return torch.relu(y) if relu else y

    label = f"matmul {m}x{k}x{n}{' (weight transposed, Linear)' if transposed else ''}, {dtype}" + (
        " +bias+ReLU" if relu else " +bias")
    return case_rows(label, matmul_module(m, k, n, dtype, transposed, relu), cublas, torch_fn, [x, w, b], target,
                     dev, )


def per_algo(dev, dtype="float16") -> list[dict[str, Any]]:
    """TVM's packed cuDNN conv (NHWC 1x56x56x64, 3x3, 64 out) with each forward algorithm; PyTorch's own."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    import tvm
    import tvm_ffi

    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 56, 56, 64)).astype(dtype)
    w = (rng.standard_normal((64, 3, 3, 64)) / 24).astype(dtype)
    tx, tw = torch.from_numpy(x).cuda(), torch.from_numpy(w).cuda()
    ref = F.conv2d(tx.float().permute(0, 3, 1, 2), tw.float().permute(0, 3, 1, 2), padding=1).permute(0, 2, 3, 1)
    ref = ref.cpu().numpy().astype("float64")
    conv = tvm_ffi.get_global_func("tvm.contrib.cudnn.conv2d.forward")
    xt, wt = tvm.runtime.tensor(x, dev), tvm.runtime.tensor(w, dev)
    sync = torch.cuda.synchronize
    rows = []
    for algo, name in enumerate(ALGOS):
        y = tvm.runtime.tensor(np.zeros((1, 56, 56, 64), dtype), dev)
        fn = lambda a=algo, out=y: conv(1, 1, a, 1, 1, 1, 1, 1, 1, xt, wt, out, dtype, 1)  # noqa: E731
        row: dict[str, Any] = {"algo": algo, "name": name}
        try:
            fn()
            sync()
            row["rel_err"] = float(np.abs(y.numpy().astype("float64") - ref).max() / np.abs(ref).max())
            row["host_ms"] = host_ms(fn, sync)
            row["kernel_us"] = kernel_us(fn, sync)
        except Exception as err:  # pylint: disable=broad-except
            row["error"] = str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__
        log(f"cudnn algo {algo} {name}: {row}")
        rows.append(row)
    torch.backends.cudnn.benchmark = True
    cx, cw = tx.permute(0, 3, 1, 2), tw.permute(0, 3, 1, 2)  # channels_last views
    fn = lambda: F.conv2d(cx, cw, padding=1)  # noqa: E731
    rows.append({"algo": "-", "name": "PyTorch eager (cudnn.benchmark, its own choice)", "host_ms": host_ms(fn, sync),
                 "kernel_us": kernel_us(fn, sync), "rel_err": float(np.abs(fn().permute(0, 2, 3, 1).float().cpu().numpy()
                                                                             - ref).max() / np.abs(ref).max())})
    return rows


def whole_model(name: str, target, dev, untuned: bool = True) -> list[dict[str, Any]]:
    """``name`` (torchvision) at fp16 NHWC: vendor-only builds and all-TVM untuned, timed on ``dev``; PyTorch."""
    import numpy as np
    import torch
    from tvm import relax

    from tunefarm.core.jobspec import ModelSpec
    from tunefarm.host.byoc import cublas, cudnn
    from tunefarm.host.models import load_model, to_relax
    from tunefarm.host.tuning.pipeline import compile_module, resolve_pipeline
    import tvm

    model = load_model(ModelSpec(source="torchvision", name=name, input_shape=[1, 3, 224, 224]))
    pipeline = resolve_pipeline(target, fold_batchnorm=True, precision="fp16", layout="NHWC")
    graph = pipeline.graph(to_relax(model), target)
    x = model.inputs[0]
    with torch.no_grad():
        ref = model.torch_module.eval()(torch.from_numpy(x)).numpy().astype("float64")
    rows = []
    sync = torch.cuda.synchronize
    cudnn.register()
    cublas.register()
    offloaded = relax.transform.RunCodegen()(cublas.partition(cudnn.partition(graph)))
    for label, mod, graphs in (("vendor only (cuDNN convs, cuBLAS Linear, rest untuned TVM)", offloaded, False),
                               ("vendor only, CUDA graphs", offloaded, True),
                               *((("TVM untuned (default GPU schedules)", graph, False),) if untuned else ())):
        row: dict[str, Any] = {"case": f"{name} fp16 NHWC", "build": label}
        try:
            if mod is offloaded:
                row["vendor_functions"] = cudnn.offloaded_functions(mod)
            t0 = time.perf_counter()
            ex = compile_module(pipeline.lower(mod, target), target, cuda_graph=graphs)
            row["compile_s"] = round(time.perf_counter() - t0, 1)
            vm = relax.VirtualMachine(ex, dev)
            arg = tvm.runtime.tensor(x, dev)
            out = vm["main"](arg)
            out = (out.numpy() if hasattr(out, "numpy") else out[0].numpy()).astype("float64")
            row["rel_err"] = float(np.abs(out - ref).max() / np.abs(ref).max())
            row["top1_same"] = bool(out.argmax() == ref.argmax())
            fn = lambda: vm["main"](arg)  # noqa: E731
            row["host_ms"] = host_ms(fn, sync)
            row["kernel_us"] = kernel_us(fn, sync, calls=5)
        except Exception as err:  # pylint: disable=broad-except
            traceback.print_exc()
            row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"
        log(f"{name} | {label}: {row}")
        rows.append(row)
    torch.backends.cudnn.benchmark = True
    net = model.torch_module.eval().cuda().half().to(memory_format=torch.channels_last)
    tx = torch.from_numpy(x).cuda().half().to(memory_format=torch.channels_last)
    row = {"case": f"{name} fp16", "build": "PyTorch eager (fp16, channels_last, cudnn.benchmark)"}
    with torch.no_grad():
        out = net(tx).float().cpu().numpy().astype("float64")
        row["rel_err"] = float(np.abs(out - ref).max() / np.abs(ref).max())
        row["host_ms"] = host_ms(lambda: net(tx), sync)
        row["kernel_us"] = kernel_us(lambda: net(tx), sync, calls=5)
    rows.append(row)
    log(f"{name} | PyTorch: {row}")
    # the peer: torch.compile reduce-overhead (CUDA graphs) at fp16, timed here the same way as the rows above
    row = {"case": f"{name} fp16", "build": "torch.compile reduce-overhead (fp16, channels_last, CUDA graphs)"}
    try:
        t0 = time.perf_counter()
        compiled = torch.compile(net, mode="reduce-overhead")
        with torch.no_grad():
            for _ in range(3):
                out = compiled(tx)
            sync()
            row["compile_s"] = round(time.perf_counter() - t0, 1)
            out = out.float().cpu().numpy().astype("float64")
            row["rel_err"] = float(np.abs(out - ref).max() / np.abs(ref).max())
            row["host_ms"] = host_ms(lambda: compiled(tx), sync)
            row["kernel_us"] = kernel_us(lambda: compiled(tx), sync, calls=5)
    except Exception as err:  # pylint: disable=broad-except
        traceback.print_exc()
        row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}"
    rows.append(row)
    log(f"{name} | torch.compile: {row}")
    return rows


def render(data: dict[str, Any]) -> str:
    from tunefarm.host.reports.markdown import number

    meta, build = data["meta"], data.get("build") or {}
    lines = [f"# cuBLAS and cuDNN through the farm's plugins on {meta.get('gpu_name')}", "",
             f"Run {meta.get('date')} by `python -m bench.cuda_libs`: {meta.get('gpu_detail', '')}; TVM {meta.get('tvm')}, "
             f"PyTorch {meta.get('torch')}; host {meta.get('cpu')} ({meta.get('logical_cpus')} CPUs).", "",
             "## The plugins (`tunefarm runtime cuda-libs`)", ""]
    if build.get("error"):
        lines += [f"- **failed**: {build['error']}", ""]
    else:
        info = build.get("info") or {}
        lines += [f"- {'built' if build.get('built') else 'found cached'} in {build.get('build_s', 0):.0f} s: "
                  f"`{build.get('directory')}`; cuBLAS {info.get('versions', {}).get('cublas', '?')}, cuDNN "
                  f"{info.get('versions', {}).get('cudnn', '?')}; against: "
                  + ", ".join(f"`{Path(v).name}` ({Path(v).parent})" for k, v in (build.get('nvidia') or {}).items()
                              if k.startswith("lib:")) + ".",
                  "- Its check on this GPU (TVM's packed calls into the plugins against numpy, max relative error): "
                  + (", ".join(f"{k} {v:.1e}" for k, v in (info.get("max_rel_err") or {}).items()) or "not run") + ".",
                  ""]
    if data.get("cases"):
        lines += ["## Operator groups: offloaded by the farm's codegen, TVM untuned, PyTorch", "",
                  "Errors relative to the largest magnitude of PyTorch's fp32 result on the GPU. Host ms: mean of "
                  f"{CALLS} calls timed on the host after 20 warm-up calls (launches and per-call setup included). "
                  "Kernel us: the GPU time of the kernels CUPTI saw per call (torch.profiler, 20 calls).", "",
                  "| group | build | rel. error | host ms/call | kernel us/call | compile s |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in data["cases"]:
            if r.get("error"):
                lines.append(f"| {r['case']} | {r['build']} | failed: {r['error'][:160]} | | | |")
            else:
                lines.append(f"| {r['case']} | {r['build']} | {number(r.get('rel_err'))} | {r['host_ms']:.4f} | "
                             f"{number(r.get('kernel_us'))} | {r.get('compile_s', '-')} |")
        lines.append("")
    if data.get("model"):
        lines += ["## The whole model, vendor only (fp16, BatchNorm folded, NHWC; no tuning)", "",
                  "| model | build | rel. error vs PyTorch CPU fp32 | host ms/run | kernel us/run | compile s |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in data["model"]:
            lines.append(f"| {r['case']} | {r['build']} | " + (f"failed: {r['error'][:160]} | | | |" if r.get("error")
                         else f"{number(r.get('rel_err'))} | {r['host_ms']:.3f} | {number(r.get('kernel_us'))} | "
                              f"{r.get('compile_s', '-')} |"))
        lines.append("")
    if data.get("algos"):
        lines += ["## cuDNN per forward algorithm (NHWC 1x56x56x64, 3x3, 64 out, fp16; TVM's packed conv2d.forward)",
                  "", "| algo | rel. error | host ms/call | kernel us/call |", "| --- | --- | --- | --- |"]
        for r in data["algos"]:
            lines.append(f"| {r['algo']} {r['name']} | " + (f"not supported: {r['error']} | | |" if r.get("error") else
                         f"{number(r.get('rel_err'))} | {r['host_ms']:.4f} | {number(r.get('kernel_us'))} |"))
        lines.append("")
    if data.get("problems"):
        lines += ["## Problems", ""] + [f"- {p}" for p in data["problems"]] + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cuda_libs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(common.RESULTS))
    parser.add_argument("--build-only", action="store_true", help="build and check the plugins, nothing else")
    parser.add_argument("--no-build", action="store_true", help="the cached plugins only (fail if there are none)")
    parser.add_argument("--model", default="resnet18", help="whole-model vendor-only row (torchvision name; none)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer cases (three convs, no fp32 NCHW / bias-free conv, no untuned whole model)")
    args = parser.parse_args(argv)
    import numpy as np
    import torch
    import tvm

    from tunefarm.core import cudalibs
    from tunefarm.device_agents.cuda_libs_runtime import ensure_plugins

    if not torch.cuda.is_available():
        print("no CUDA device visible to PyTorch", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    meta = common.machine(gpu_name=torch.cuda.get_device_name(0), torch=torch.__version__,
                          gpu_detail=f"sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                                     f"CUDA {torch.version.cuda}")
    stem = Path(args.out) / (f"gpu-cuda-libs-{re.sub(r'[^a-z0-9]+', '-', meta['gpu_name'].lower()).strip('-')}"
                             f"-{args.model}{'-quick' if args.quick else ''}")
    data: dict[str, Any] = {"meta": meta, "build": {}, "cases": [], "algos": [], "problems": []}

    def save():
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(data, indent=2, default=str))
        stem.with_suffix(".md").write_text(render(data))

    try:
        if args.no_build and cudalibs.plugin_dir() is None:
            raise RuntimeError("no cached plugins (--no-build)")
        plugins = ensure_plugins(log=log)
        build = json.loads((plugins.directory / "build.json").read_text())
        data["build"] = {"directory": str(plugins.directory), "built": plugins.built,
                         "build_s": plugins.build_s or build.get("build_s", 0), "info": plugins.info,
                         "nvidia": build.get("nvidia")}
    except Exception as err:  # pylint: disable=broad-except
        traceback.print_exc()
        data["build"] = {"error": f"{type(err).__name__}: {err}"[:500]}
        save()
        return 1
    save()
    if args.build_only:
        print(render(data))
        return 0
    dev = tvm.cuda(0)
    target = tvm.target.Target.from_device(dev)
    rng = np.random.default_rng(0)
    steps = [lambda: matmul_case(1024, 1024, 1024, "float16", False, True, target, dev, rng),
             lambda: matmul_case(1, 512, 1000, "float16", True, False, target, dev, rng)]
    convs = (CONVS[1], CONVS[2], CONVS[5]) if args.quick else CONVS
    steps += [lambda s=s: conv_case(s, "float16", "NHWC", True, target, dev, rng) for s in convs]
    if not args.quick:
        steps += [lambda: conv_case(CONVS[1], "float16", "NHWC", False, target, dev, rng),
                  lambda: conv_case(CONVS[1], "float32", "NCHW", True, target, dev, rng)]
    for step in steps:
        try:
            data["cases"] += step()
        except Exception as err:  # pylint: disable=broad-except
            traceback.print_exc()
            data["problems"].append(f"{type(err).__name__}: {str(err)[:300]}")
        save()
    try:
        data["algos"] = per_algo(dev)
    except Exception as err:  # pylint: disable=broad-except
        traceback.print_exc()
        data["problems"].append(f"per-algorithm timing: {type(err).__name__}: {str(err)[:300]}")
    save()
    if args.model != "none":
        try:
            data["model"] = whole_model(args.model, target, dev, untuned=not args.quick)
        except Exception as err:  # pylint: disable=broad-except
            traceback.print_exc()
            data["problems"].append(f"whole model: {type(err).__name__}: {str(err)[:300]}")
        save()
    common.finish(meta)
    save()
    print(render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
