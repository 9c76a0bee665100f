"""How long single candidates take to build: the tail that holds a whole batch.

    python -m bench.build_tail [--tasks T1,T2] [--candidates 192] [--timeout 120] [--name NAME]

MetaSchedule's builder returns a batch when every candidate of it is built or killed at the build timeout, so one
candidate that LLVM takes minutes over stalls that task's search round — seen in bench/results/search_scaling-
h200vm-16c*.md, where single builds ran into the 120 s timeout in three of six rows. This draws ``--candidates``
random traces (ReplayTrace, seed 0: the kind of a first round) of each ResNet-18 conv task named, builds each one
alone in the farm's warm build pool (``tunefarm.core.building``, as WarmBuilder; one worker per core) and times
it inside the worker. Per task: the build-time percentiles, how many took over 10/30/60 s, how many hit the
timeout, and the share of all build time that candidates over 30 s took. Writes
bench/results/build_tail-<name>.{json,md}.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench import common
from bench.workloads import draw_candidates

DEFAULT_TASKS = "fused_conv2d4_add3,fused_conv2d9_add7_add8_relu4,fused_conv2d_add_relu"


def _timed_build(mod, target):
    from tunefarm.host.tuning.builder import _build_one  # pylint: disable=import-outside-toplevel

    t0 = time.perf_counter()
    _build_one(mod, target)
    return time.perf_counter() - t0


def write(out: Path, stem: str, meta: dict, rows: dict) -> str:
    lines = [f"# Build time of single candidates: ResNet-18 conv tasks, {meta['candidates']} random traces each, "
             f"{meta['date']}", "", common.describe(common.finish(meta))
             + f" Build pool of {meta['workers']} warm worker(s), timeout {meta['timeout_s']:g} s, target "
               f"`{meta['target']}`.", "",
             "| task | built | timeout | error | p50 s | p90 s | p99 s | max s | > 10 s | > 30 s | > 60 s | "
             "share of build time in > 30 s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for task, r in rows.items():
        t = r["seconds"] or [float("nan")]  # every candidate timed out or failed: no times
        p50, p90, p99 = np.percentile(t, [50, 90, 99])  # as tunefarm.core.stats.latency_stats takes them
        lines.append(f"| {task} | {len(r['seconds'])} | {r['timeouts']} | {r['errors']} | {p50:.2f} | {p90:.2f} | "
                     f"{p99:.2f} | {max(t):.1f} | {sum(x > 10 for x in t)} | {sum(x > 30 for x in t)} | "
                     f"{sum(x > 60 for x in t)} | {r['slow_share']:.0%} |")
    return common.write_rows(out, f"build_tail-{stem}", meta, rows, lines)


def main():
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    from tunefarm.core.threads import usable_cpus
    from tunefarm.host.tuning.builder import _warm_worker

    parser = argparse.ArgumentParser(prog="python -m bench.build_tail", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=DEFAULT_TASKS)
    parser.add_argument("--candidates", type=int, default=192)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--name", default="")
    parser.add_argument("--out", default=str(common.RESULTS))
    args = parser.parse_args()
    workers = usable_cpus()
    stem = args.name or common.default_name()
    meta = common.machine(candidates=args.candidates, workers=workers, timeout_s=args.timeout, target="")
    rows: dict = {}
    pool = PopenPoolExecutor(max_workers=workers, timeout=args.timeout, initializer=_warm_worker)
    try:
        for task_name in [t for t in args.tasks.split(",") if t]:
            name, target, inputs = draw_candidates(args.candidates, task_name=task_name)
            meta["target"] = str(target)
            seconds, timeouts, errors = [], 0, 0
            t0 = time.perf_counter()
            for res in pool.map_with_error_catching(lambda x: _timed_build(*x), [(b.mod, b.target) for b in inputs]):
                if res.status == StatusKind.COMPLETE:
                    seconds.append(res.value)
                elif res.status == StatusKind.TIMEOUT:
                    timeouts += 1
                else:
                    errors += 1
            total = sum(seconds) + timeouts * args.timeout
            slow = sum(x for x in seconds if x > 30) + timeouts * args.timeout
            rows[name] = {"seconds": [round(x, 3) for x in seconds], "timeouts": timeouts, "errors": errors,
                          "wall_s": round(time.perf_counter() - t0, 1), "slow_share": slow / total if total else 0.0}
            print(write(Path(args.out), stem, meta, rows), flush=True)
    finally:
        pool.shutdown()


if __name__ == "__main__":
    main()
