"""Build throughput: the host building alone against agents that build for the farm.

    python -m bench.build_scaling [--agents 1,2,4] [--candidates 32] [--cores-per-agent 1]
                                  [--host-workers K] [--stock-workers W] [--skip-stock]

Draws a fixed set of candidates (random traces of ResNet-18's heaviest conv task, fixed seed) and
times how long each configuration takes to build all of them, on this machine:
  stock-LocalBuilder   tvm.s_tir.meta_schedule.builder.LocalBuilder (max_workers = --stock-workers,
                       default host cores)
  farm-host            tunefarm's WarmBuilder on the host, warm workers (max_workers = host cores)
  farm-host-Kc         the same, limited to K cores (--host-workers, default --cores-per-agent; its
                       workers pinned to the first K cores): one machine of one agent's size building alone
  agents-N             N build agents (`tunefarm agent --key build`), each pinned with taskset
                       to its own --cores-per-agent cores, reached through a real tracker
Writes bench/results/build_scaling-<name>.{json,md} (--name, default <hostname>-<cores>c), rewritten
after every row so that a run cut short keeps what it measured; candidates/minute and the ratio
against the first row. The search itself is not timed here: only building.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from bench import common
from bench.workloads import draw_candidates
from tunefarm.core.threads import core_order


def write_results(out: Path, stem: str, meta: dict, rows: dict) -> str:
    base = next(iter(rows.values()))
    lines = [f"# Build throughput: {meta['candidates']} candidates of ResNet-18 {meta['task']} ({meta['date']})", "",
             common.describe(common.finish(meta))
             + (f" Build agents pinned to {meta['cores_per_agent']} core(s) each." if any(r.startswith("agents-") for r in rows)
                else ""), "",
             "| configuration | wall s | built | failed | candidates/min | vs first row |",
             "| --- | --- | --- | --- | --- | --- |"]
    for label, row in rows.items():
        lines.append(f"| {label} | {row['wall_s']:.1f} | {row['built']} | {row['failed']} | {row['per_min']:.1f} | "
                     f"{row['per_min'] / base['per_min']:.2f}x |")
    return common.write_rows(out, f"build_scaling-{stem}", meta, rows, lines)


def timed_build(builder, inputs) -> dict:
    t0 = time.perf_counter()
    results = builder.build(inputs)
    wall = time.perf_counter() - t0
    ok = sum(1 for r in results if r.error_msg is None)
    return {"wall_s": wall, "built": ok, "failed": len(results) - ok, "per_min": ok / wall * 60}


def main():
    from tvm.s_tir import meta_schedule as ms

    from tunefarm.host.tuning.builder import AgentBuilder, WarmBuilder
    from tunefarm.testing.localfarm import LocalFarm

    parser = argparse.ArgumentParser(prog="python -m bench.build_scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", default="1,2")
    parser.add_argument("--candidates", type=int, default=32)
    parser.add_argument("--cores-per-agent", type=int, default=1)
    parser.add_argument("--out", default=str(common.RESULTS))
    parser.add_argument("--name", default="", help="results file name part (default: <hostname>-<cores>c)")
    parser.add_argument("--logs", default="", help="tracker and agent logs (default: OUT/.build_scaling_logs)")
    parser.add_argument("--skip-stock", action="store_true", help="skip stock LocalBuilder (slow: ~20 s/worker/batch)")
    parser.add_argument("--stock-workers", type=int, default=0, help="stock LocalBuilder's max_workers (default: host cores)")
    parser.add_argument("--host-workers", type=int, default=-1,
                        help="also time WarmBuilder on this many cores alone (default: --cores-per-agent; 0: skip)")
    args = parser.parse_args()
    cores = core_order(os.sched_getaffinity(0))  # slices of whole cores where cores have SMT
    host_workers = args.cores_per_agent if args.host_workers < 0 else args.host_workers
    task_name, target, inputs = draw_candidates(args.candidates)
    print(f"{len(inputs)} candidates of {task_name}; host cores {len(cores)}", flush=True)
    stem = args.name or common.default_name()
    out = Path(args.out)
    meta = common.machine(task=task_name, candidates=len(inputs), cores_per_agent=args.cores_per_agent,
                          target=str(target))
    rows = {}

    def record(label, row):
        rows[label] = row
        print(label, row, flush=True)
        write_results(out, stem, meta, rows)

    if not args.skip_stock:
        stock_workers = args.stock_workers or len(cores)
        label = "stock-LocalBuilder" + (f"-{stock_workers}w" if stock_workers != len(cores) else "")
        record(label, timed_build(ms.builder.LocalBuilder(max_workers=stock_workers, timeout_sec=300), inputs))
    farm = WarmBuilder(workers=len(cores), timeout_sec=300)
    farm.build(inputs[:len(cores)])  # warm the workers, as they are during a job
    record("farm-host", timed_build(farm, inputs))
    farm.shutdown()
    if 0 < host_workers < len(cores):
        common.pin(cores[:host_workers])  # the pool's workers inherit it; so does the timing
        try:
            farm = WarmBuilder(workers=host_workers, timeout_sec=300)
            farm.build(inputs[:host_workers])
            record(f"farm-host-{host_workers}c", timed_build(farm, inputs))
            farm.shutdown()
        finally:
            common.pin(cores)

    work = Path(args.logs) if args.logs else out / ".build_scaling_logs"
    with LocalFarm(work) as farm:
        for n in [int(x) for x in args.agents.split(",") if x]:
            if n * args.cores_per_agent > len(cores):
                print(f"skip {n} agents: needs {n * args.cores_per_agent} cores", flush=True)
                continue
            try:
                for i in range(n):
                    farm.add_agent("build", cpus=cores[i * args.cores_per_agent:(i + 1) * args.cores_per_agent],
                                   name=f"agent-{n}-{i}", wait=False)
                farm.wait_for_agents("build", n)
                builder = AgentBuilder(farm.tracker_addr, "build", timeout_sec=300)
                builder.build(inputs[:n])  # first session per agent: imports are paid before timing
                builder.remote_builds.clear()
                row = timed_build(builder, inputs)
                row["per_agent"] = builder.remote_builds
                record(f"agents-{n}", row)
            finally:
                farm.stop_agents("build")

    print(write_results(out, stem, meta, rows))

if __name__ == "__main__":
    main()
