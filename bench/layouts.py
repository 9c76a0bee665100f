"""The graph pipeline's layout options on this CPU, each tuned through the farm on the same budget.

    python -m bench.layouts [--model resnet18] [--trials 384] [--per-iter 16] [--name NAME]

Three jobs of one model, one after the other, each through a LocalFarm (tracker + one agent on this
machine, TVM with the agent's threads): ``legacy`` (BatchNorm kept in the conv epilogue, weights in the
model's layout: the farm's pipeline before these options), ``fold`` (FoldBatchnormToConv2D) and
``fold+prepack`` (also MetaSchedule's layout rewrite: each kernel picks a packed weight layout, packed once
at compile time). Same budget (``--trials`` in rounds of ``--per-iter``, no per-task cap, seed 0, cold:
no warm start). Then every tuned build is timed against PyTorch and ONNX Runtime in one process, rounds
alternating backends (bench/model_latency.py's method). Writes bench/results/layouts-<name>.{json,md}; the
job directories stay under --work (default: a temporary directory) for model_latency.py.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench import common  # sets TVM_NUM_THREADS before TVM's pool starts

VARIANTS = {"legacy": (False, False), "fold": (True, False), "fold+prepack": (True, True)}


def tune_variant(name: str, fold: bool, prepack: bool, args, work: Path) -> dict:
    import tvm

    from bench.workloads import bench_job
    from tunefarm.device_agents.probe import llvm_target
    from tunefarm.host.tuning.job import tune_job
    from tunefarm.testing.localfarm import LocalFarm

    job_name = f"{args.model}-{name.replace('+', '-')}"
    with LocalFarm(work / "farm") as farm:
        farm.add_agent("bench")
        job = bench_job(job_name, args.model, farm.addr, "bench", tvm.target.Target(llvm_target()), args.trials,
                        args.trials, args.per_iter, args.population)
        job.tuning.fold_batchnorm, job.tuning.weight_prepack = fold, prepack
        t0 = time.time()
        tuned = tune_job(job, logs_dir=str(work))
        wall = time.time() - t0
    return {"job": job_name, "wall_s": round(wall, 1), "tuning_wall_s": round(tuned.wall_s, 1),
            "measured": tuned.measured, "failed": tuned.failed, "tasks": len(tuned.plan.tasks)}


def main():
    import onnxruntime as ort
    import torch

    from bench.model_latency import measure_jobs, method_text, tvm_ort_cells, write_markdown

    parser = argparse.ArgumentParser(prog="python -m bench.layouts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--trials", type=int, default=384)
    parser.add_argument("--per-iter", type=int, default=16)
    parser.add_argument("--population", type=int, default=512)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of "
                        + ", ".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=40)
    parser.add_argument("--work", default="", help="where the job directories go (default: a temporary directory)")
    parser.add_argument("--name", default=common.default_name())
    parser.add_argument("--out", default=str(common.RESULTS))
    args = parser.parse_args()
    chosen = [v for v in args.variants.split(",") if v]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    work = Path(args.work or tempfile.mkdtemp(prefix="layouts-"))
    work.mkdir(parents=True, exist_ok=True)
    machine = common.machine()
    runs = {}
    for name in chosen:
        print(f"{name}: tuning {args.model}, {args.trials} trials ...", flush=True)
        runs[name] = tune_variant(name, *VARIANTS[name], args, work)
        print(f"  {runs[name]}", flush=True)
    results = measure_jobs([work / r["job"] for r in runs.values()], args.rounds, args.repeat, 10,
                           log=lambda line: print(line, flush=True))
    meta = common.finish({**machine, "model": args.model, "trials": args.trials, "per_iter": args.per_iter,
                          "population": args.population, "rounds": args.rounds, "repeat": args.repeat, "warmup": 10,
                          "torch": torch.__version__, "onnxruntime": ort.__version__, "work": str(work)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"layouts-{args.model}-{args.name}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": runs, "results": results}, indent=2))
    lines = [f"# Graph pipeline layouts on this CPU: {args.model}, {args.trials} trials each ({meta['date']})", "",
             f"{common.describe(meta)} Each variant tuned through a LocalFarm (one agent, {meta['threads']} threads), "
             f"{args.trials} trials in rounds of {args.per_iter}, population {args.population}, no per-task cap, "
             "seed 0, no warm start, one after the other; then timed in one process. " + method_text(meta), "",
             "| variant | job | tasks | trials measured (failed) | tuning wall s | TVM median ms | ONNX Runtime ms | "
             "TVM / ORT | numerics |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, run in runs.items():
        r = results[run["job"]]
        lat = r["latency"]
        lines.append(f"| {name} | {run['job']} | {run['tasks']} | {run['measured']} ({run['failed']}) | "
                     f"{run['tuning_wall_s']} | {tvm_ort_cells(lat)} | "
                     f"max abs {r['numerics']['tvm-tuned']['max_abs_err']:.1e} |")
    write_markdown(stem, lines, results)


if __name__ == "__main__":
    main()
