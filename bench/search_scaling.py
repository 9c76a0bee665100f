"""Whole tuning runs with the search spread out (issue 16): trials per minute with 0, 1, 2, 4 search workers.

    python -m bench.search_scaling [--workers 0,1,2,4] [--cores 2] [--measure-agents 2] [--trials 384]

Every configuration runs the same cold `tunefarm tune` job (a torchvision model, this CPU's llvm target, seed 0,
the same budget) through a real tracker, with the machine's cores split by taskset, C = --cores each:
  host      this process: the first C cores (with 0 workers it searches and builds there, as a job does today);
  measure   --measure-agents agents on key "measure" that run every candidate: C cores each;
  search-i  `tunefarm search-worker`s on key "search" (search.workers: N): C cores each, searching and building
            their share of the tasks there.
Per row: wall time of the tuning (tune_job), trials (failed ones among them), trials/minute, best estimated
latency, trials per search worker, each share's wall time (the slowest bounds the run), the trials of shares taken over
from another share's tasks not begun (work stealing), candidates per measuring
agent. The budget is spent past one round of every task (``--per-task`` above ``--per-iter``), so the cost
model's rounds are part of every row. Writes bench/results/search_scaling-<name>.{json,md} after every row;
ratios vs workers-0 (the first host row). A count given twice (``--workers 4,0,4``) is a repeat: its own row
("workers-4 #2") and job. Needs C x (1 + measure agents + the largest N) cores: 14 for the defaults (the lent
16-core machine; see DEVELOPERS.md).
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from bench import common
from bench.workloads import bench_job, failure_kinds, run_row
from tunefarm.core.jobspec import BuilderSpec
from tunefarm.core.threads import core_of, core_order


def write(out: Path, stem: str, meta: dict, rows: dict) -> str:
    base = rows.get("workers-0")  # the host searching alone; a run without it has no ratio
    lines = [f"# Tuning throughput with search workers: {meta['model']}, {meta['trials']} trials "
             f"({meta['per_iter']} per round, at most {meta['per_task']} per task), {meta['date']}", "",
             f"{common.describe(common.finish(meta))} "
             f"Host process, {meta['measure_agents']} measuring agent(s) and each search worker pinned to "
             f"{meta['cores_per_role']} cores of their own (taskset), each running TVM with that many threads "
             f"(start_tunefarm sets TVM_NUM_THREADS to a pinned process's cores, and TVM_BIND_THREADS=0 so that TVM "
             f"keeps them inside those cores). Pipeline of every row: "
             f"{'; '.join(sorted({r['pipeline'] for r in rows.values()}))}. Cold jobs (no warm start), seed 0, "
             f"population {meta['population']}, build timeout {meta['build_timeout_s']:g} s, straggler factor "
             f"{meta.get('straggler_factor', 'none (before it existed)')}, target `{meta['target']}`.", "",
             "| configuration | search on | tuning wall s | trials (failed) | trials/min | vs workers-0 | "
             "best estimated ms | trials per search worker | share wall s | shares taken over (trials) | "
             "measured per agent |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, r in rows.items():
        est = r.get("best_estimated_ms")
        walls = sorted(s["wall_s"] for s in r["shares"])
        # work stealing: the shares made of another share's tasks not begun (their trials)
        taken = [s["trials"] for s in r["shares"] if s.get("stolen_from") is not None]
        kinds = failure_kinds(r)
        ratio = f"{r['per_min'] / base['per_min']:.2f}x" if base else "-"
        lines.append(f"| {label} | {r['search_on']} | {r['wall_s']:.0f} | {r['trials']} ({r['failed']}"
                     f"{': ' + kinds if kinds else ''}) | "
                     f"{r['per_min']:.1f} | {ratio} | "
                     f"{f'{est:.2f}' if est else '-'} | "
                     f"{', '.join(str(v) for v in sorted(r['search_workers'].values())) or '-'} | "
                     f"{', '.join(f'{w:.0f}' for w in walls) or '-'} | "
                     f"{', '.join(str(t) for t in taken) or '-'} | "
                     f"{', '.join(str(v) for v in sorted(r['measured_on'].values())) or '-'} |")
    lines += split_table(rows)
    return common.write_rows(out, f"search_scaling-{stem}", meta, rows, lines)


SPLIT = (("search_s", "search"), ("build_s", "build"), ("measure_s", "measure wait"),
         ("model_update_s", "model update"), ("other_s", "other"))


def split_table(rows: dict) -> list[str]:
    """Where each row's time went: the host's tuning loop (workers-0), or each share's on its search worker, in
    MetaSchedule's profiler scopes (tunefarm.host.tuning.progress.time_split); a share's 'setup' is its start on
    the worker before its tuning loop, its 'other' the rest of its wall time (setup, the wait for a session, the
    host's last poll). Rows stored before shares reported their profile have none to show."""
    out = []
    for label, r in rows.items():
        parts = [("host", None, r.get("time_split") or {})] if not r["shares"] else [
            (f"share {n}" + (f" (from share {s['stolen_from']})" if s.get("stolen_from") is not None else ""),
             s.get("setup_s"), s.get("time_split") or {}) for n, s in enumerate(r["shares"])]
        for who, setup, t in parts:
            if not t.get("scopes"):
                continue
            out.append(f"| {label} | {who} | {t['wall_s']:.1f} | {'-' if setup is None else f'{setup:.1f}'} | "
                       + " | ".join(f"{t[k]:.1f}" for k, _ in SPLIT) + " |")
    if not out:
        return []
    return ["", "Where the time went (seconds; MetaSchedule's profiler on the host, or on each share's search worker):",
            "", "| configuration | part | wall s | setup | " + " | ".join(name for _, name in SPLIT) + " |",
            "| --- | --- | --- | --- | " + " | ".join("---" for _ in SPLIT) + " |", *out]


def main():
    import tvm

    from tunefarm.core.procs import start_tunefarm, stop_process, wait_until
    from tunefarm.device_agents.probe import llvm_target
    from tunefarm.core.procs import free_port
    from tunefarm.testing.localfarm import HOST, LocalFarm

    parser = argparse.ArgumentParser(prog="python -m bench.search_scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="0,1,2,4")
    parser.add_argument("--cores", type=int, default=2, help="cores of the host, each measuring agent and each worker")
    parser.add_argument("--measure-agents", type=int, default=2)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--trials", type=int, default=384)
    parser.add_argument("--per-iter", type=int, default=16)
    parser.add_argument("--per-task", type=int, default=64,
                        help="max trials per task (above --per-iter, so that the budget is spent past one round "
                             "of every task and the cost model's rounds are part of the run)")
    parser.add_argument("--population", type=int, default=128)
    parser.add_argument("--build-timeout", type=float, default=120.0,
                        help="seconds before a candidate's build is killed (a slower one holds its whole batch: "
                             "MetaSchedule's builder returns when every candidate is done; stock LocalBuilder: 30)")
    parser.add_argument("--straggler-factor", type=float, default=None,
                        help="the jobs' builder.straggler_factor (default the job file's: 4; 0: off): once 7/8 of a "
                             "batch has built, a candidate still building at this many times that moment is cut")
    parser.add_argument("--name", default="")
    parser.add_argument("--out", default=str(common.RESULTS))
    args = parser.parse_args()

    cores = core_order(os.sched_getaffinity(0))  # a role's slice holds whole cores where cores have SMT
    c, m = args.cores, args.measure_agents
    counts = [int(x) for x in args.workers.split(",") if x != ""]
    need = c * (1 + m + max(counts))
    if len(cores) < need:
        raise SystemExit(f"needs {need} cores (host, {m} measuring agent(s), {max(counts)} search worker(s), "
                         f"{c} each); this machine has {len(cores)}")
    host_cores = cores[:c]
    measure_cores = [cores[c * (1 + i):c * (2 + i)] for i in range(m)]
    search_cores = cores[c * (1 + m):]
    # each machine of the farm has C CPUs: as many cores as they make (fewer where cores have SMT)
    target = tvm.target.Target(llvm_target(num_cores=len({core_of(cpu) for cpu in host_cores})))
    common.pin(host_cores)  # this process and what it starts (the host builder's pool), before TVM's pool starts
    stem = args.name or common.default_name()
    meta = common.machine(cores_per_role=c, measure_agents=m, model=args.model, trials=args.trials, per_iter=args.per_iter,
                          per_task=args.per_task,
                          population=args.population, build_timeout_s=args.build_timeout, target=str(target),
                          straggler_factor=args.straggler_factor if args.straggler_factor is not None
                          else BuilderSpec().straggler_factor,
                          cpus={"host": host_cores, **{f"measure-{i}": m_cpus for i, m_cpus in enumerate(measure_cores)},
                                **{f"search-{i}": search_cores[i * c:(i + 1) * c] for i in range(max(counts))}})
    rows: dict = {}
    work = Path(tempfile.mkdtemp(prefix="search-scaling-"))
    with LocalFarm(work / "farm") as farm:
        for i, cpus in enumerate(measure_cores):
            farm.add_agent("measure", cpus=cpus, name=f"measure-{i}", wait=False)
        farm.wait_for_agents("measure", m)
        for k, n in enumerate(counts):
            # a count given again is a repeat of that row: its own label and job (a reused job name would resume)
            again = counts[:k].count(n)
            label = f"workers-{n}" + (f" #{again + 1}" if again else "")
            workers = []
            try:
                for i in range(n):
                    workers.append(start_tunefarm(
                        ["search-worker", "--tracker", farm.addr, "--host", HOST, "--port", free_port(HOST)],
                        work / "farm" / f"search-{n}{f'-{again + 1}' if again else ''}-{i}.log", cpus=search_cores[i * c:(i + 1) * c]))
                if n:
                    farm.wait_for_agents("search", n)
                job = bench_job(f"workers-{n}" + (f"-{again + 1}" if again else ""), args.model, farm.addr, "measure", target, args.trials, args.per_task,
                                args.per_iter, args.population, builder_workers=c, search_workers=n,
                                build_timeout_s=args.build_timeout, straggler_factor=args.straggler_factor)
                rows[label] = {"search_on": f"{n} worker(s) x {c} cores" if n else f"host, {c} cores",
                               **run_row(job, work / "logs")}
                print(write(Path(args.out), stem, meta, rows), flush=True)
            finally:
                for proc in workers:
                    stop_process(proc)
                if n:  # the next row starts with none left over
                    wait_until(lambda: farm.client.servers_for_key("search") == 0, 60, what="search workers to leave")


if __name__ == "__main__":
    main()
