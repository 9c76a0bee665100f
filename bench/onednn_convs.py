"""Per conv of ResNet-18 (fp32, batch 1): oneDNN through the farm's BYOC codegen vs ONNX Runtime vs untuned TVM.

    python -m bench.onednn_convs [--threads 2] [--rounds 7] [--calls 20] [--no-untuned] [--name NAME]

Input for issue 31's placement step: for each distinct conv of ResNet-18 (with its bias, as a conv with
BatchNorm folded in is), each backend in its own process (three runtimes' spinning thread pools in one process
on 2 cores slowed each other 10-100x in a first try), ``--passes`` processes per backend in alternating order;
in each, rounds over all convs of ``--calls`` host-timed calls (``perf_counter``, Python call overhead included for
every backend alike). The figure is the lower of the passes' medians. Every build's output is checked against
ONNX Runtime's (relative max error) before timing.

* ``onednn``: ``tunefarm.host.byoc.dnnl.offload`` (conv2d_bias composite, weights bound: prepacked once at load),
  ``tvm.compile``, Relax VM. Needs the plugin (``tunefarm runtime onednn``).
* ``onnxruntime``: one Conv node with its bias, ``intra_op_num_threads = --threads``.
* ``tvm-untuned``: the same Relax module legalised and built by ``tvm.compile`` for this CPU's llvm target with
  no schedule (what the farm starts from before tuning; MetaSchedule's untuned baseline).

Threads: ``TVM_NUM_THREADS`` and ``OMP_NUM_THREADS`` (oneDNN's OpenMP pool) are both set to ``--threads`` before
anything starts a pool (tunefarm.core.threads.thread_env), ONNX Runtime gets the same count.
Writes bench/results/onednn_convs-<name>.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Thread pools are sized when they start: set both before TVM, oneDNN or ONNX Runtime load.
_THREADS = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--threads"), "2")
from tunefarm.core.threads import thread_env  # noqa: E402

os.environ.update(thread_env(int(_THREADS)))

import numpy as np  # noqa: E402

from bench import common  # noqa: E402

# ResNet-18's distinct convs at 224x224: (name, C_in, H, C_out, kernel, stride, pad, count in the model)
CONVS = [
    ("stem 7x7/2 3->64", 3, 224, 64, 7, 2, 3, 1),
    ("3x3 64->64 @56", 64, 56, 64, 3, 1, 1, 4),
    ("3x3/2 64->128 @56", 64, 56, 128, 3, 2, 1, 1),
    ("1x1/2 64->128 @56", 64, 56, 128, 1, 2, 0, 1),
    ("3x3 128->128 @28", 128, 28, 128, 3, 1, 1, 3),
    ("3x3/2 128->256 @28", 128, 28, 256, 3, 2, 1, 1),
    ("1x1/2 128->256 @28", 128, 28, 256, 1, 2, 0, 1),
    ("3x3 256->256 @14", 256, 14, 256, 3, 1, 1, 3),
    ("3x3/2 256->512 @14", 256, 14, 512, 3, 2, 1, 1),
    ("1x1/2 256->512 @14", 256, 14, 512, 1, 2, 0, 1),
    ("3x3 512->512 @7", 512, 7, 512, 3, 1, 1, 3),
]


def relax_conv(cin, h, cout, k, s, p, w, b):
    import tvm
    from tvm import relax

    x = relax.Var("x", relax.TensorType((1, cin, h, h), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            c = bb.emit(relax.op.nn.conv2d(x, relax.const(w), strides=(s, s), padding=(p, p, p, p)))
            out = bb.emit_output(relax.op.add(c, relax.const(b.reshape(1, cout, 1, 1))))
        bb.emit_func_output(out)
    return bb.get()


def ort_conv(cin, h, cout, k, s, p, w, b, threads):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[p] * 4, kernel_shape=[k, k], strides=[s, s])
    graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, h, h])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


BACKENDS = ("onednn", "onnxruntime", "tvm-untuned")


def build(backend: str, spec, threads: int, target):
    """``(call, check output, compile seconds)`` of one conv on one backend."""
    import tvm
    from tvm import relax

    from tunefarm.host.byoc import dnnl

    _, cin, h, cout, k, s, p, _ = spec
    rng = np.random.default_rng(abs(hash(spec[0])) % (1 << 32))
    w = (rng.standard_normal((cout, cin, k, k), dtype=np.float32) / np.sqrt(cin * k * k)).astype(np.float32)
    b = rng.standard_normal(cout, dtype=np.float32)
    x = rng.standard_normal((1, cin, h, h), dtype=np.float32)
    t0 = time.perf_counter()
    if backend == "onnxruntime":
        sess = ort_conv(cin, h, cout, k, s, p, w, b, threads)
        call = lambda: sess.run(None, {"x": x})[0]  # noqa: E731
        return call, call(), time.perf_counter() - t0
    mod = relax_conv(cin, h, cout, k, s, p, w, b)
    if backend == "onednn":
        mod = dnnl.offload(mod)
        assert dnnl.offloaded_functions(mod) == 1, spec
    vm = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
    xt = tvm.runtime.tensor(x, tvm.cpu())
    call = lambda: vm["main"](xt)  # noqa: E731
    return call, call().numpy(), time.perf_counter() - t0


def worker(args) -> None:
    """One backend in this process: build every conv, check it against ONNX Runtime's output (same seeds), time it
    in rounds that go over all convs; write the samples as JSON."""
    import json

    import tvm

    from tunefarm.device_agents.probe import llvm_target
    from tunefarm.host.byoc import dnnl

    if args.worker == "onednn":
        dnnl.register()
    target = tvm.target.Target(llvm_target(args.threads))
    built = {}
    for spec in CONVS:
        call, out, compile_s = build(args.worker, spec, args.threads, target)
        if args.worker != "onnxruntime":
            _, ref, _ = build("onnxruntime", spec, args.threads, target)
            err = float(np.abs(out - ref).max() / np.abs(ref).max())
        else:
            err = 0.0
        call()  # warm-up (first-call initialisation; oneDNN reorders the weights once at load)
        built[spec[0]] = (call, err, compile_s)
    calls = args.untuned_calls if args.worker == "tvm-untuned" else args.calls
    samples = {name: [] for name in built}
    for _ in range(args.rounds):
        for name, (call, _, _) in built.items():
            for _ in range(calls):
                t = time.perf_counter()
                call()
                samples[name].append(time.perf_counter() - t)
    Path(args.out).write_text(json.dumps({name: {"samples": samples[name], "error_vs_ort": built[name][1],
                                                 "compile_s": built[name][2]} for name in built}))


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.onednn_convs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--untuned-calls", type=int, default=1, help="calls per round of the (slow) untuned build")
    parser.add_argument("--passes", type=int, default=2, help="processes per backend, in alternating order")
    parser.add_argument("--no-untuned", action="store_true")
    parser.add_argument("--name", default=None)
    parser.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    import json
    import subprocess
    import tempfile

    import onnxruntime

    from tunefarm.core import onednn

    onednn.load_plugin()
    dnnl_info = onednn.library_info()
    labels = [b for b in BACKENDS if not (args.no_untuned and b == "tvm-untuned")]
    meta = common.machine(omp_num_threads=os.environ.get("OMP_NUM_THREADS"), onnxruntime=onnxruntime.__version__,
                          onednn=dnnl_info, rounds=args.rounds, calls=args.calls, passes=args.passes,
                          untuned_calls=args.untuned_calls)
    results: dict[str, list[dict]] = {b: [] for b in labels}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.passes):
            for backend in (labels if i % 2 == 0 else labels[::-1]):
                out = Path(tmp) / f"{backend}-{i}.json"
                cmd = [sys.executable, "-m", "bench.onednn_convs", "--worker", backend, "--out", str(out),
                       "--threads", str(args.threads), "--rounds", str(args.rounds), "--calls", str(args.calls),
                       "--untuned-calls", str(args.untuned_calls)]
                t0 = time.time()
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                results[backend].append(json.loads(out.read_text()))
                print(f"pass {i} {backend}: {time.time() - t0:.0f} s, load {common.load_avg()}", flush=True)
    common.finish(meta)
    rows = {}
    for name, cin, h, cout, k, s, p, count in CONVS:
        oh = (h + 2 * p - k) // s + 1
        flops = 2 * cout * oh * oh * cin * k * k
        row = {"count": count, "gflop": flops / 1e9}
        for backend in labels:
            medians = [float(np.median(r[name]["samples"])) * 1e3 for r in results[backend]]
            best = min(medians)
            row[backend] = {"median_ms": round(best, 4), "pass_medians_ms": [round(m, 4) for m in medians],
                            "gflops": round(flops / best / 1e6, 1),
                            "error_vs_ort": max(r[name]["error_vs_ort"] for r in results[backend]),
                            "compile_s": round(results[backend][0][name]["compile_s"], 2)}
            assert row[backend]["error_vs_ort"] <= 1e-4, (name, backend, row[backend])
        rows[name] = row
    lines = [f"# ResNet-18 convs: oneDNN (farm BYOC) vs ONNX Runtime{'' if args.no_untuned else ' vs untuned TVM'}, "
             f"{args.threads} threads", "",
             common.describe(meta), "",
             f"oneDNN {dnnl_info.get('version')} ({dnnl_info.get('cpu_runtime')}, ISA {dnnl_info.get('isa')}), ONNX "
             f"Runtime {onnxruntime.__version__}; TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS')}, "
             f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, ORT intra_op_num_threads={args.threads}. Each conv "
             "with its bias, batch 1, fp32, NCHW. One process per backend (no other runtime's pool in it), "
             f"{args.passes} passes in alternating backend order; in each, {args.rounds} rounds over all convs, "
             f"{args.calls} host-timed calls per conv per round ({args.untuned_calls} for untuned TVM; Python call "
             "overhead included for every backend alike). The figure: the lower of the passes' medians (the "
             "machine is shared: see the load). Every build's output checked against ONNX Runtime's (max relative "
             "error <= 1e-4). Weighted: times the conv's count in ResNet-18.", "",
             "| conv | count | GFLOP | " + " | ".join(f"{l} ms (GFLOP/s)" for l in labels)
             + " | oneDNN / ORT |", "| --- " * (4 + len(labels)) + "|"]
    totals = {l: 0.0 for l in labels}
    for name, row in rows.items():
        cells = []
        for l in labels:
            totals[l] += row[l]["median_ms"] * row["count"]
            cells.append(f"{row[l]['median_ms']:.3f} ({row[l]['gflops']:.0f})")
        lines.append(f"| {name} | {row['count']} | {row['gflop']:.3f} | " + " | ".join(cells)
                     + f" | {row['onednn']['median_ms'] / row['onnxruntime']['median_ms']:.2f} |")
    lines.append("| **all convs, weighted** | 20 | | " + " | ".join(f"**{totals[l]:.2f}**" for l in labels)
                 + f" | **{totals['onednn'] / totals['onnxruntime']:.2f}** |")
    lines += ["", "Pass medians (ms) per backend, to read the noise: " + "; ".join(
        f"{name}: " + ", ".join(f"{l} {row[l]['pass_medians_ms']}" for l in labels) for name, row in rows.items())]
    name = args.name or common.default_name()
    text = common.write_rows(common.RESULTS, f"onednn_convs-{name}", meta, rows, lines)
    print(text)


if __name__ == "__main__":
    main()
