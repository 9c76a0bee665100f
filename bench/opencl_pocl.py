"""The whole OpenCL path on PoCL, with honest numbers: a real model tuned through the farm for PoCL's OpenCL
device, against the llvm CPU build and ONNX Runtime on the same cores.

    python -m bench.opencl_pocl [--model squeezenet1_1] [--trials 256] [--tvm-source PATH] [--name NAME]

A LocalFarm with two agents on this machine: ``pocl`` (``tunefarm agent --opencl``: TVM's OpenCL backend built
for the wheel, serving PoCL's CPU device with its own limits) and ``cpu`` (the llvm target, the agent's
threads). The model is tuned twice through the farm with the same budget (rounds of ``--per-iter``, seed 0, no
warm start): once for the OpenCL target on ``pocl``, once for the CPU on ``cpu``. Then one ``tunefarm compare``
run times every row in turn on its agent and checks each row's outputs against PyTorch's: TVM tuned and
untuned on OpenCL, TVM tuned and untuned on llvm, ONNX Runtime and PyTorch (CPU, the agent's threads).

Not a race to win: PoCL is an OpenCL implementation on the CPU (its kernels are compiled by its own LLVM and
run on its own thread pool over all cores), not an iGPU. Writes bench/results/opencl-pocl-<model>-<name>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench import common  # sets TVM_NUM_THREADS before TVM's pool starts

ROWS = ("tvm-tuned@pocl", "tvm-untuned@pocl", "tvm-tuned@cpu", "tvm-untuned@cpu", "onnxruntime@cpu", "torch@cpu")


def main():
    import tvm
    import yaml

    from bench.workloads import bench_job
    from tunefarm.host.compare import run_compare
    from tunefarm.host.tuning.job import tune_job
    from tunefarm.testing.localfarm import LocalFarm, listed_agents

    parser = argparse.ArgumentParser(prog="python -m bench.opencl_pocl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="squeezenet1_1", help="a torchvision model (random weights, batch 1)")
    parser.add_argument("--trials", type=int, default=256)
    parser.add_argument("--per-iter", type=int, default=16)
    parser.add_argument("--population", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--tvm-source", default=str(common.ROOT.parent / "shared" / "tvm-opencl-src"))
    parser.add_argument("--work", default="", help="where the job directories go (default: a temporary directory)")
    parser.add_argument("--name", default=common.default_name())
    parser.add_argument("--out", default=str(common.RESULTS))
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="opencl-pocl-"))
    work.mkdir(parents=True, exist_ok=True)
    machine = common.machine()
    runs = {}
    with LocalFarm(work / "farm") as farm:
        farm.add_agent("pocl", "--opencl", "--tvm-source", args.tvm_source)
        farm.add_agent("cpu")
        host, port = farm.tracker_addr
        infos = {key: listed_agents(host, port, key)[0] for key in ("pocl", "cpu")}
        for key in ("pocl", "cpu"):
            name = f"{args.model}-{key}"
            job = bench_job(name, args.model, farm.addr, key, tvm.target.Target(infos[key].target), args.trials,
                            args.trials, args.per_iter, args.population)
            print(f"{key}: tuning {args.model} for {json.dumps(infos[key].target, sort_keys=True)}, "
                  f"{args.trials} trials ...", flush=True)
            t0 = time.time()
            tuned = tune_job(job, logs_dir=str(work))
            runs[key] = {"job": name, "wall_s": round(time.time() - t0, 1), "tuning_wall_s": round(tuned.wall_s, 1),
                         "measured": tuned.measured, "failed": tuned.failed, "tasks": len(tuned.plan.tasks),
                         "target": infos[key].target}
            print(f"  {runs[key]}", flush=True)
        config = {"name": f"opencl-pocl-{args.model}", "tracker": farm.addr, "device_wait_sec": 60,
                  "evaluate": {"warmup": 10, "repeat": args.repeat, "budget_s": 120, "rtol": 1e-3, "atol": 1e-3},
                  "baseline": "onnxruntime@cpu",
                  "models": [{"source": "torchvision", "name": args.model, "input_shape": [1, 3, 224, 224]}],
                  "rows": [{"backend": "tvm-tuned", "key": "pocl", "logs": str(work / runs["pocl"]["job"])},
                           {"backend": "tvm-untuned", "key": "pocl"},
                           {"backend": "tvm-tuned", "key": "cpu", "logs": str(work / runs["cpu"]["job"])},
                           {"backend": "tvm-untuned", "key": "cpu"},
                           {"backend": "onnxruntime", "key": "cpu"}, {"backend": "torch", "key": "cpu"}]}
        config_path = work / "compare.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        report = run_compare(str(config_path), output=str(work / "compare"))
        device = infos["pocl"].opencl.get("device", {})
    (model,) = report["models"]
    rows = {r["label"]: r for r in model["rows"]}
    meta = common.finish({**machine, "model": args.model, "trials": args.trials, "per_iter": args.per_iter,
                          "population": args.population, "repeat": args.repeat, "opencl_device": device,
                          "work": str(work)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"opencl-pocl-{args.model}-{args.name}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": runs, "rows": rows}, indent=2, default=str))
    lines = [f"# OpenCL on PoCL through the farm: {args.model}, {args.trials} trials per target ({meta['date']})", "",
             f"{common.describe(meta)} OpenCL device: {device.get('name', '?')} (PoCL: OpenCL on this CPU, its own "
             f"thread pool over all cores; {device.get('max_threads_per_block', '?')} work-items per work-group, warp "
             f"size {device.get('warp_size', '?')}). Two agents on this machine (`tunefarm agent --opencl` on key "
             "`pocl`, a CPU agent on key `cpu`); the model tuned for each target through the farm with the same "
             f"budget ({args.trials} trials in rounds of {args.per_iter}, population {args.population}, seed 0, no "
             "warm start), one after the other; then one `tunefarm compare` run timing each row in turn on its "
             f"agent (10 warm-up runs, {args.repeat} samples) with outputs checked against PyTorch.", "",
             "| target | tasks | trials measured (failed) | tuning wall s |", "| --- | --- | --- | --- |"]
    for key, run in runs.items():
        lines.append(f"| {key} | {run['tasks']} | {run['measured']} ({run['failed']}) | {run['tuning_wall_s']} |")
    lines += ["", "| row | threads | median ms | p90 ms | std ms | / ONNX Runtime | numerics |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    ort_ms = (rows.get("onnxruntime@cpu", {}).get("latency") or {}).get("median_ms")
    for label in ROWS:
        row = rows.get(label, {})
        lat = row.get("latency")
        if not lat:
            lines.append(f"| {label} | - | not run: {row.get('status', '?')} {row.get('reason', '')} | | | | |")
            continue
        num = row.get("numerics") or {}
        threads = row.get("threads") or ("PoCL's pool" if label.endswith("@pocl") else "-")
        lines.append(f"| {label} | {threads} | {lat['median_ms']:.3f} | {lat['p90_ms']:.3f} | {lat['std_ms']:.3f} | "
                     f"{lat['median_ms'] / ort_ms:.2f} | " + (f"ok (max abs {num.get('max_abs_err', 0):.1e})"
                                                              if num.get("ok") else "FAILED") + " |"
                     if ort_ms else f"| {label} | {threads} | {lat['median_ms']:.3f} | | | | |")
    text = "\n".join(lines) + "\n"
    stem.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
