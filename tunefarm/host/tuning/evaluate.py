"""After tuning: build tuned and untuned, run both on the device through RPC, check and time them.

The tuned build applies the database to exactly the module that was tuned and compiles that; the
report says how many of its TIR functions carry a tuned schedule, and names the rest. Both builds
run on an agent of the job's key (Relax VM over the RPC session), are checked against the
reference framework on the same inputs and weights, and are timed on the device with TVM's
``time_evaluator`` after warm-up runs. PyTorch and ONNX Runtime baselines run where the agent is
this machine (a local CPU agent); a remote agent's baselines are marked as not run.
"""
from __future__ import annotations

import math
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tunefarm.core.errors import TuningFailed, TunefarmError
from tunefarm.core.stats import compare_outputs, latency_stats


def apply_database(mod, target, database):
    """Records applied to exactly ``mod`` (the tuned module): (module, scheduled names, unscheduled names)."""
    # pylint: disable=import-outside-toplevel
    import tvm
    from tvm import relax

    with target, database:
        applied = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
    scheduled, unscheduled = [], []
    for gvar, func in list(applied.functions.items()):
        if isinstance(func, tvm.tirx.PrimFunc):
            is_sched = func.attrs is not None and "tirx.is_scheduled" in func.attrs and bool(func.attrs["tirx.is_scheduled"])
            (scheduled if is_sched else unscheduled).append(gvar.name_hint)
            # tvm.compile's default pipeline would fuse the tuned functions again (24 -> 19 on ResNet-18)
            # and the merged functions no longer carry their schedule mark; opaque functions stay as
            # tuned, so the compiled module is the module the report counts.
            applied[gvar] = func.with_attr("op_pattern", 8)
    return applied, sorted(scheduled), sorted(unscheduled)


def _eval_samples_for(single_run_s: float, want: int, budget_s: float) -> int:
    """Timed samples: as asked, but a very slow build (untuned TVM) gets fewer, never under 5."""
    if single_run_s <= 0:
        return want
    return int(max(5, min(want, math.floor(budget_s / single_run_s))))


def device_type_of(target) -> str:
    """The runtime device a target's kernels run on ("llvm" -> "cpu")."""
    kind = target.kind.name
    return "cpu" if kind in ("llvm", "c") else kind


def run_on_device(tracker_addr, key: str, lib_path: str, inputs: list[np.ndarray], warmup: int, repeat: int,
                  budget_s: float = 120.0, session_timeout: int = 900, device_type: str = "cpu",
                  wait_s: float = 120.0, on_wait=None) -> dict[str, Any]:
    """Upload a compiled Relax executable to an agent, run it, time it there."""
    # pylint: disable=import-outside-toplevel
    import tvm
    from tvm import relax

    from tunefarm.tracker.client import request_session  # pylint: disable=import-outside-toplevel

    sess = request_session(tracker_addr, key, wait_s, session_timeout, on_wait)
    try:
        agent_id = sess.get_function("tunefarm.agent.id")()
    except Exception:  # pylint: disable=broad-except
        agent_id = "unknown"
    threads = None
    if device_type == "cpu":
        try:  # what the agent's TVM runtime really runs with, asked of the runtime itself
            threads = int(sess.get_function("runtime.NumThreads")())
        except Exception:  # pylint: disable=broad-except
            threads = None
    sess.upload(lib_path)
    rmod = sess.load_module(Path(lib_path).name)
    dev = sess.device(device_type, 0)
    vm = relax.VirtualMachine(rmod, dev)
    args = [tvm.runtime.tensor(x, dev) for x in inputs]
    t0 = time.perf_counter()
    out = vm["main"](*args)
    first_s = time.perf_counter() - t0
    outs = [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]
    vm.set_input("main", *args)
    single = vm.time_evaluator("invoke_stateful", dev, number=1, repeat=1)("main").mean
    n_warm = min(warmup, max(1, int(budget_s / 4 / max(single, 1e-6))))
    if n_warm > 0:
        vm.time_evaluator("invoke_stateful", dev, number=n_warm, repeat=1)("main")
    samples = _eval_samples_for(single, repeat, budget_s)
    res = vm.time_evaluator("invoke_stateful", dev, number=1, repeat=samples)("main")
    stats = latency_stats(res.results, warmup=n_warm + 1)
    stats["first_run_ms"] = first_s * 1e3
    return {"outputs": outs, "latency": stats, "agent": str(agent_id), "threads": threads}


def _time_python(fn, warmup: int, repeat: int, budget_s: float = 60.0) -> dict[str, Any]:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    fn()
    single = time.perf_counter() - t0
    samples = []
    for _ in range(_eval_samples_for(single, repeat, budget_s)):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return latency_stats(samples, warmup=warmup + 1)


def torch_baseline(model, ev, threads: int) -> dict[str, Any]:
    import torch  # pylint: disable=import-outside-toplevel

    torch.set_num_threads(threads)
    xs = [torch.from_numpy(x) for x in model.inputs]
    with torch.no_grad():
        out = model.torch_module(*xs)
        outs = out if isinstance(out, (tuple, list)) else [out]
        lat = _time_python(lambda: model.torch_module(*xs), ev.warmup, ev.repeat)
    return {"outputs": [o.numpy() for o in outs], "latency": lat,
            "version": torch.__version__, "threads": torch.get_num_threads()}


def onnxruntime_baseline(model, ev, work_dir: Path, threads: int) -> dict[str, Any]:
    import onnxruntime as ort  # pylint: disable=import-outside-toplevel

    from tunefarm.host.models import export_onnx  # pylint: disable=import-outside-toplevel

    path = export_onnx(model, work_dir / "model.onnx")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    feed = dict(zip(names, model.inputs))
    outs = sess.run(None, feed)
    lat = _time_python(lambda: sess.run(None, feed), ev.warmup, ev.repeat)
    return {"outputs": outs, "latency": lat, "version": ort.__version__, "threads": threads}


def evaluate_job(tuned, console) -> dict[str, Any]:
    """Compile, verify and time; write report.json/report.md; raise TuningFailed on a bad result."""
    # pylint: disable=import-outside-toplevel
    import tvm

    from tunefarm.host.reports.tuning import write_report
    from tunefarm.tracker.client import TrackerClient

    job, target, mod, database = tuned.job, tuned.target, tuned.mod, tuned.database
    ev = job.evaluate
    model = tuned.model
    job_dir: Path = tuned.job_dir
    tracker_addr = tuned.tracker
    build_dir = Path(tempfile.mkdtemp(prefix="tunefarm-eval-"))

    with console.status("compiling the tuned and the untuned builds"):
        applied, scheduled, unscheduled = apply_database(mod, target, database)
        libs = {}
        for name, module in (("tvm-tuned", applied), ("tvm-untuned", mod)):
            ex = tvm.compile(module, target)
            libs[name] = str(build_dir / f"{name}.so")
            ex.export_library(libs[name])
    reference = model.reference_outputs()
    rows: dict[str, dict[str, Any]] = {}
    for name in ("tvm-tuned", "tvm-untuned"):
        with console.status(f"running {name} on key '{job.device.key}' and timing it"):
            try:
                res = run_on_device(tracker_addr, job.device.key, libs[name], model.inputs, ev.warmup, ev.repeat,
                                    device_type=device_type_of(target), wait_s=job.runner.device_wait_sec,
                                    on_wait=tuned.on_wait)
            except TunefarmError:
                raise
            except Exception as err:  # pylint: disable=broad-except
                raise TunefarmError(f"running {name} on key '{job.device.key}' failed: "
                                    f"{str(err).strip().splitlines()[-1]}") from None
        rows[name] = {"backend": name, "where": f"agent {res['agent']}", "latency": res["latency"],
                      "threads": res["threads"], "numerics": compare_outputs(res["outputs"], reference, ev.rtol, ev.atol)}

    hostname = socket.gethostname()
    agents = TrackerClient(*tracker_addr).agent_infos(job.device.key)
    local = bool(agents) and all(a.hostname == hostname for a in agents)
    # The peers run with the threads TVM ran with on the agent (never their own defaults).
    threads = rows["tvm-tuned"]["threads"] or max((a.threads for a in agents), default=0) or None
    for base in ev.baselines:
        if not local:
            rows[base] = {"backend": base, "not_run": "the agent is not known to be this machine; host-side "
                                                      "baselines run only for a local agent"}
            continue
        with console.status(f"running the {base} baseline"):
            try:
                if threads is None:
                    raise TunefarmError("the agent did not say how many threads its TVM runtime uses")
                res = (torch_baseline(model, ev, threads) if base == "torch"
                       else onnxruntime_baseline(model, ev, build_dir, threads))
            except Exception as err:  # pylint: disable=broad-except
                rows[base] = {"backend": base, "not_run": f"failed: {str(err).strip().splitlines()[-1]}"}
                continue
        rows[base] = {"backend": base, "where": f"host {hostname}", "latency": res["latency"],
                      "numerics": compare_outputs(res["outputs"], reference, ev.rtol, ev.atol),
                      "version": res.get("version"), "threads": res["threads"]}

    tuned_ms = rows["tvm-tuned"]["latency"]["median_ms"]
    untuned_ms = rows["tvm-untuned"]["latency"]["median_ms"]
    problems = []
    for name in ("tvm-tuned", "tvm-untuned"):
        if not rows[name]["numerics"]["ok"]:
            num = rows[name]["numerics"]
            problems.append(f"{name} output differs from the reference (max abs err {num['max_abs_err']:.3g}, "
                            f"rtol {ev.rtol}, atol {ev.atol})")
    if ev.require_speedup and tuned_ms >= untuned_ms:
        problems.append(f"tuned build is not faster than untuned ({tuned_ms:.3f} ms vs {untuned_ms:.3f} ms)")
    report = write_report(tuned, rows, scheduled, unscheduled, reference, problems)
    from rich.markdown import Markdown  # pylint: disable=import-outside-toplevel

    console.print(Markdown(report["markdown"]))
    console.print(f"report: {job_dir / 'report.md'}")
    if problems:
        raise TuningFailed("; ".join(problems))
    return report
