"""How much faster this machine gets with more of its cores busy: the ceiling under every scaling benchmark.

    python -m bench.cpu_ceiling [--busy 1,2,4,8,16] [--compiles 40] [--name NAME]

A search worker's share is compiles and C++ IR work on its own cores, so a whole run with N workers cannot
scale better than the machine does when N times as many cores are busy. Here K processes (``--busy``), each
pinned to one CPU of its own (whole cores first, by ``core_order``) and running TVM with 1 thread, compile one
fixed scheduled matmul (LLVM, a 256x256x256 loop nest split, unrolled and vectorised: ~0.25 s per compile)
``--compiles`` times after a warm-up compile, all starting together. Each row: the median and p90 seconds per
compile over every process, each process's compiles per second against one process alone, and the
machine's aggregate speedup (K x that). A VM's CPUs may share cores of the machine under it that it cannot
see; this shows what sharing costs when it does. Writes bench/results/cpu_ceiling-<name>.{json,md}.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import statistics
import time
from pathlib import Path

from bench import common
from tunefarm.core.threads import core_order


def _matmul():
    import tvm  # pylint: disable=import-outside-toplevel
    from tvm import s_tir, te  # pylint: disable=import-outside-toplevel

    n = 256
    a = te.placeholder((n, n), name="A")
    b = te.placeholder((n, n), name="B")
    k = te.reduce_axis((0, n), name="k")
    c = te.compute((n, n), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    sch = s_tir.Schedule(tvm.IRModule({"main": te.create_prim_func([a, b, c])}))
    i, j, kk = sch.get_loops(sch.get_sblock("C"))
    i0, i1 = sch.split(i, [None, 16])
    j0, j1, j2 = sch.split(j, [None, 4, 16])
    k0, k1 = sch.split(kk, [None, 8])
    sch.reorder(i0, j0, k0, k1, i1, j1, j2)
    sch.vectorize(j2)
    for loop in (i1, j1, k1):
        sch.unroll(loop)
    return sch.mod


def _worker(cpu: int, compiles: int, barrier, results) -> None:
    common.pin([cpu])
    import tvm  # pylint: disable=import-outside-toplevel

    mod, target = _matmul(), tvm.target.Target({"kind": "llvm"})
    tvm.compile(mod, target=target)  # warm-up: imports, pass registry, LLVM's first initialisation
    barrier.wait()
    times = []
    for _ in range(compiles):
        t0 = time.perf_counter()
        tvm.compile(mod, target=target)
        times.append(time.perf_counter() - t0)
    results.put((cpu, times))


def run_busy(cpus: list[int], compiles: int) -> dict:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(len(cpus)), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(cpu, compiles, barrier, results)) for cpu in cpus]
    for proc in procs:
        proc.start()
    got = []
    while len(got) < len(procs):  # a process that dies (before the barrier too) ends the row, not a wait
        try:
            got.append(results.get(timeout=5))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode]
            if dead:
                for proc in procs:
                    proc.terminate()
                raise SystemExit(f"a compiling process exited with {dead[0]}") from None
    for proc in procs:
        proc.join()
    times = sorted(t for _, ts in got for t in ts)
    per_proc = [len(ts) / sum(ts) for _, ts in got]
    return {"cpus": sorted(cpus), "median_s": statistics.median(times), "p90_s": times[int(0.9 * (len(times) - 1))],
            "per_process_per_s": statistics.median(per_proc), "slowest_per_s": min(per_proc)}


def write_results(out: Path, stem: str, meta: dict, rows: dict) -> str:
    alone = rows.get("1", next(iter(rows.values())))["per_process_per_s"]
    lines = [f"# CPU ceiling: one fixed LLVM compile on K busy CPUs at once ({meta['date']})", "",
             common.describe(common.finish(meta)) + f" Each process pinned to one CPU with TVM on 1 thread, "
             f"{meta['compiles']} timed compiles each after one warm-up.", "",
             "| busy CPUs | median s per compile | p90 s | compiles/s per process | vs alone | slowest process "
             "vs alone | aggregate speedup |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for k, row in rows.items():
        rel = row["per_process_per_s"] / alone
        lines.append(f"| {k} | {row['median_s']:.3f} | {row['p90_s']:.3f} | {row['per_process_per_s']:.2f} | "
                     f"{rel:.2f} | {row['slowest_per_s'] / alone:.2f} | {int(k) * rel:.2f}x |")
    return common.write_rows(out, f"cpu_ceiling-{stem}", meta, rows, lines)


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_ceiling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", default="", help="comma-separated counts of busy CPUs (default: 1, 2, 4, ... "
                        "up to this process's CPUs)")
    parser.add_argument("--compiles", type=int, default=40, help="timed compiles per process (default 40)")
    parser.add_argument("--out", default=str(common.RESULTS))
    parser.add_argument("--name", default="", help="results file name part (default: <hostname>-<cores>c)")
    args = parser.parse_args()
    cpus = core_order(os.sched_getaffinity(0))
    if args.busy:
        try:
            busy = [int(x) for x in args.busy.split(",")]
        except ValueError:
            parser.error(f"--busy must be comma-separated integers, not {args.busy!r}")
    else:
        busy = [1 << i for i in range(len(cpus).bit_length()) if 1 << i <= len(cpus)]
        busy += [len(cpus)] if busy[-1] != len(cpus) else []
    if any(not 1 <= k <= len(cpus) for k in busy):
        parser.error(f"--busy counts must be between 1 and this process's {len(cpus)} CPUs")
    if args.compiles < 1:
        parser.error("--compiles must be at least 1")
    meta = common.machine(compiles=args.compiles, workload="256x256x256 matmul, split/unroll/vectorize, llvm")
    meta["threads"] = 1
    stem, out, rows = args.name or common.default_name(), Path(args.out), {}
    for k in busy:
        rows[str(k)] = run_busy(cpus[:k], args.compiles)
        print(k, rows[str(k)], flush=True)
        write_results(out, stem, meta, rows)
    print(write_results(out, stem, meta, rows))


if __name__ == "__main__":
    main()
