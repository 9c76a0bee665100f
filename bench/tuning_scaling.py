"""Whole tuning runs, not just builds: trials per minute with 0, 1, 2, 4 build agents.

    python -m bench.tuning_scaling [--agents 0,1,2,4] [--cores-per-agent 2] [--trials 384] [--per-iter 16]

Every configuration runs the same cold `tunefarm tune` job (ResNet-18, this CPU's llvm target, fixed
seed) through a real tracker, with the machine's cores split by taskset:
  host      this process (MetaSchedule's search, cost model, task scheduler): the first C cores;
  measure   one agent on key "measure" that runs every candidate: the next C cores;
  build-i   build agents on key "build" (builder.key), C cores each, after those.
Row "agents-0" is the host building alone on its own C cores (WarmBuilder's warm workers); rows
"agents-N" send every build to N agents. C = --cores-per-agent. Per row: wall time of the tuning
(tune_job), trials, trials/minute, best estimated latency, and how many candidates each build agent
built. Writes bench/results/tuning_scaling-<name>.{json,md} after every row; ratios vs agents-0.

What it shows: building is the host's largest cost (bench/build_scaling.py), so build agents raise
trials/minute until the host's own search, which stays serial, bounds the run.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from bench import common
from bench.workloads import bench_job
from tunefarm.core.threads import core_order


def write(out: Path, stem: str, meta: dict, rows: dict) -> str:
    base = rows.get("agents-0") or next(iter(rows.values()))
    lines = [f"# Tuning throughput with build agents: {meta['model']}, {meta['trials']} trials "
             f"({meta['per_iter']} per round), {meta['date']}", "",
             f"{common.describe(common.finish(meta))} "
             f"Host process (search), measuring agent and each build agent pinned to {meta['cores_per_agent']} cores "
             "of their own (taskset). Cold jobs (no warm start), population "
             f"{meta['population']}, target `{meta['target']}`.", "",
             "| configuration | builds on | tuning wall s | trials | trials/min | vs agents-0 | best estimated ms | built per agent |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, r in rows.items():
        est = r.get("best_estimated_ms")
        lines.append(f"| {label} | {r['builds_on']} | {r['wall_s']:.0f} | {r['trials']} | {r['per_min']:.1f} | "
                     f"{r['per_min'] / base['per_min']:.2f}x | {f'{est:.2f}' if est else '-'} | "
                     f"{', '.join(str(v) for v in sorted(r['built_on_agents'].values())) or '-'} |")
    return common.write_rows(out, f"tuning_scaling-{stem}", meta, rows, lines)


def main():
    import tvm

    from tunefarm.device_agents.probe import llvm_target
    from tunefarm.host.tuning.job import tune_job
    from tunefarm.host.tuning.jobdir import JobDir
    from tunefarm.testing.localfarm import LocalFarm

    parser = argparse.ArgumentParser(prog="python -m bench.tuning_scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", default="0,1,2,4")
    parser.add_argument("--cores-per-agent", type=int, default=2)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--trials", type=int, default=384)
    parser.add_argument("--per-iter", type=int, default=16)
    parser.add_argument("--population", type=int, default=128)
    parser.add_argument("--name", default="")
    parser.add_argument("--out", default=str(common.RESULTS))
    args = parser.parse_args()

    cores = core_order(os.sched_getaffinity(0))  # slices of whole cores where cores have SMT
    c = args.cores_per_agent
    host_cores, measure_cores, build_cores = cores[:c], cores[c:2 * c], cores[2 * c:]
    counts = [int(x) for x in args.agents.split(",") if x != ""]
    if len(cores) < 2 * c:
        raise SystemExit(f"needs at least {2 * c} cores (host + measuring agent); this machine has {len(cores)}")
    target = tvm.target.Target(llvm_target(num_cores=c))  # each machine of the farm has C cores
    common.pin(host_cores)  # this process and what it starts (the host builder's pool), before TVM's pool starts
    stem = args.name or common.default_name()
    meta = common.machine(cores_per_agent=c, model=args.model, trials=args.trials, per_iter=args.per_iter,
                          population=args.population, target=str(target))
    rows: dict = {}
    work = Path(tempfile.mkdtemp(prefix="tuning-scaling-"))
    with LocalFarm(work / "farm") as farm:
        farm.add_agent("measure", cpus=measure_cores, name="measure")
        for n in counts:
            if n * c > len(build_cores):
                print(f"skip {n} build agents: needs {n * c} more cores", flush=True)
                continue
            try:
                for i in range(n):
                    farm.add_agent("build", cpus=build_cores[i * c:(i + 1) * c], name=f"build-{n}-{i}", wait=False)
                if n:
                    farm.wait_for_agents("build", n)
                job = bench_job(f"agents-{n}", args.model, farm.addr, "measure", target, args.trials, args.per_iter,
                                args.per_iter, args.population, build_key="build" if n else "", builder_workers=c)
                tuned = tune_job(job, logs_dir=str(work / "logs"))
                curve = JobDir(work / "logs" / job.name).events()
                ests = [e["estimated_ms"] for e in curve if e.get("estimated_ms")]
                trials = curve[-1]["trials"] if curve else 0
                wall = tuned.wall_s
                rows[f"agents-{n}"] = {"builds_on": f"{n} agent(s) x {c} cores" if n else f"host, {c} cores",
                                       "wall_s": wall, "trials": trials, "per_min": trials / (wall / 60),
                                       "best_estimated_ms": min(ests) if ests else None,
                                       "built_on_agents": tuned.built_on_agents,
                                       "measured_on": tuned.per_agent}
                print(write(Path(args.out), stem, meta, rows), flush=True)
            finally:
                farm.stop_agents("build")


if __name__ == "__main__":
    main()
