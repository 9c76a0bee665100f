"""One search worker against the host searching alone, on a 2-CPU machine: the same work on the same CPU.

    python -m bench.search_one_core [--rows 0,1,1,0] [--trials 160] [--model resnet18] [--name NAME]

`bench.search_scaling` needs a slice of cores per role (host, measuring agents, workers): 6 cores for one
worker. This is its 1-worker question on the development machine's 2 CPUs: one measuring agent on CPU 0; in a
``0`` row the host searches and builds on CPU 1 (TVM with 1 thread, as a job does today); in a ``1`` row one
`tunefarm search-worker` searches and builds on CPU 1 and the host (polling, checking and merging its records)
shares CPU 0 with the agent. The job is search_scaling's (cold, seed 0, the same budget, 16 per round, build
timeout 30 s). Per row: tuning wall time, trials/minute, failures, and the ratio to the first ``0`` row; rows
given in any order and repeated (``0,1,1,0`` sees drift). Writes bench/results/search_one_core-<name>.{json,md}
after every row.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from bench import common
from bench.workloads import bench_job, failure_kinds, run_row


def write(out: Path, stem: str, meta: dict, rows: dict) -> str:
    base = next((r for r in rows.values() if r["workers"] == 0), None)
    lines = [f"# One search worker against the host alone on one CPU: {meta['model']}, {meta['trials']} trials, "
             f"{meta['date']}", "",
             f"{common.describe(common.finish(meta))} One measuring agent on CPU 0; the searching process (the host "
             f"in a 0-worker row, the search worker in a 1-worker row) on CPU 1 with TVM on 1 thread and 1 build "
             f"process; in a 1-worker row the host shares CPU 0 with the agent. Pipeline of every row: "
             f"{'; '.join(sorted({r['pipeline'] for r in rows.values()}))}. Cold jobs, seed 0, 16 per round, "
             f"population 128, build timeout 30 s, target `{meta['target']}`.", "",
             "| row | search on | tuning wall s | trials (failed) | trials/min | vs first host row | best estimated ms |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, row in rows.items():
        fails = failure_kinds(row)
        ratio = f"{row['per_min'] / base['per_min']:.2f}x" if base else "-"
        best = f"{row['best_estimated_ms']:.2f}" if row["best_estimated_ms"] else "-"
        lines.append(f"| {label} | {'1 search worker, CPU 1' if row['workers'] else 'host, CPU 1'} | "
                     f"{row['wall_s']:.0f} | {row['trials']} ({row['failed']}{': ' + fails if fails else ''}) | "
                     f"{row['per_min']:.1f} | {ratio} | {best} |")
    return common.write_rows(out, f"search_one_core-{stem}", meta, rows, lines)


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.search_one_core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="0,1,1,0", help="0 (host alone) and 1 (one search worker), in order")
    parser.add_argument("--trials", type=int, default=160)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--name", default="")
    parser.add_argument("--out", default=str(common.RESULTS))
    args = parser.parse_args()
    if sorted(os.sched_getaffinity(0))[:2] != [0, 1]:
        raise SystemExit("needs CPUs 0 and 1 (this process may not use both)")
    order = [n.strip() for n in args.rows.split(",")]
    if any(n not in ("0", "1") for n in order):
        raise SystemExit(f"--rows must be 0s and 1s separated by commas, not {args.rows!r}")
    order = [int(n) for n in order]
    if args.trials < 1:
        raise SystemExit("--trials must be at least 1")
    # pylint: disable=import-outside-toplevel
    import tvm

    from tunefarm.core.procs import free_port, start_tunefarm, stop_process, wait_until
    from tunefarm.device_agents.probe import llvm_target
    from tunefarm.testing.localfarm import HOST, LocalFarm

    stem = args.name or common.default_name()  # the machine's CPUs, before this process is pinned to one
    common.pin([0])  # before TVM's pool starts: 1 thread from here on
    target = tvm.target.Target(llvm_target(num_cores=1))
    meta = common.machine(model=args.model, trials=args.trials, target=str(target), rows_order=order)
    rows: dict = {}
    work = Path(tempfile.mkdtemp(prefix="search-one-core-"))
    print(f"work in {work}", flush=True)
    with LocalFarm(work / "farm") as farm:
        farm.add_agent("measure", cpus=[0], name="measure-0", wait=False)
        farm.wait_for_agents("measure", 1)
        for k, n in enumerate(order):
            common.pin([0] if n else [1])  # the host's builder pool, started by the job, inherits it
            label = f"{k + 1}: workers-{n}"
            workers = []
            try:
                if n:
                    workers.append(start_tunefarm(["search-worker", "--tracker", farm.addr, "--host", HOST,
                                                   "--port", free_port(HOST)],
                                                  work / "farm" / f"search-{k + 1}.log", cpus=[1]))
                    farm.wait_for_agents("search", 1)
                job = bench_job(f"row-{k + 1}-workers-{n}", args.model, farm.addr, "measure", target, args.trials,
                                64, 16, 128, builder_workers=1, search_workers=n, build_timeout_s=30)
                rows[label] = {"workers": n, **run_row(job, work / "logs")}
                print(write(Path(args.out), stem, meta, rows), flush=True)
            finally:
                for proc in workers:
                    stop_process(proc)
                if n:
                    wait_until(lambda: farm.client.servers_for_key("search") == 0, 60, what="search workers to leave")


if __name__ == "__main__":
    main()
