"""The farm's own measuring overhead: the same built candidates through LocalRunner and through a
real tracker + agent (FarmRunner), in one run on this machine.

    python -m bench.farm_overhead [--candidates 32] [--rounds 3]

Per configuration: wall time per candidate, and the device time each candidate was measured for
(the sum of its run_secs times the evaluator's `number`), so the overhead is
(wall - device time) / device time. Configurations alternate round by round (A B A B ...) so that
drift in the machine's speed hits both. Writes bench/results/farm_overhead-<name>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from bench import common  # sets TVM_NUM_THREADS (the stock LocalRunner's workers inherit it), before TVM


def main():
    from tvm.s_tir import meta_schedule as ms

    from bench.workloads import draw_candidates  # the same fixed candidates as the build benchmark
    from tunefarm.host.tuning.builder import WarmBuilder
    from tunefarm.testing.localfarm import LocalFarm
    from tunefarm.host.tuning.runner import FarmRunner

    parser = argparse.ArgumentParser(prog="python -m bench.farm_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--name", default=common.default_name())
    parser.add_argument("--out", default=str(common.RESULTS))
    args = parser.parse_args()

    machine = common.machine()
    task_name, target, inputs = draw_candidates(args.candidates)
    builder = WarmBuilder(timeout_sec=300)
    built = builder.build(inputs)
    builder.shutdown()
    args_info = [ms.arg_info.ArgInfo.from_prim_func(i.mod["main"]) for i in inputs]
    runner_inputs = [ms.runner.RunnerInput(b.artifact_path, "cpu", a) for b, a in zip(built, args_info) if b.artifact_path]
    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=0)
    print(f"{len(runner_inputs)} candidates of {task_name}", flush=True)

    rows: dict[str, list] = {"LocalRunner": [], "tracker+agent": []}
    with LocalFarm(Path("/tmp") / f"farm-overhead-{os.getpid()}") as farm:
        farm.add_agent("cpu")
        runners = {"LocalRunner": ms.runner.LocalRunner(evaluator_config=evaluator, timeout_sec=120),
                   "tracker+agent": FarmRunner(*farm.tracker_addr, "cpu", evaluator_config=evaluator, timeout_sec=120)}
        for name, runner in runners.items():  # warm-up: pools started, agent session path exercised
            [f.result() for f in runner.run(runner_inputs[:2])]
        for _ in range(args.rounds):
            for name, runner in runners.items():
                t0 = time.perf_counter()
                results = [f.result() for f in runner.run(runner_inputs)]
                wall = time.perf_counter() - t0
                ok = [r for r in results if r.error_msg is None]
                device = sum(sum(float(x) for x in r.run_secs) * evaluator.number for r in ok)
                rows[name].append({"wall_s": wall, "device_s": device, "ok": len(ok), "failed": len(results) - len(ok)})
                print(name, rows[name][-1], flush=True)
        runners["tracker+agent"].shutdown()

    summary = {}
    for name, rs in rows.items():
        per_cand = [r["wall_s"] / max(1, r["ok"]) * 1e3 for r in rs]
        overhead = [(r["wall_s"] - r["device_s"]) / r["device_s"] for r in rs if r["device_s"] > 0]
        summary[name] = {"wall_ms_per_candidate_median": statistics.median(per_cand),
                         "device_ms_per_candidate_median": statistics.median(
                             [r["device_s"] / max(1, r["ok"]) * 1e3 for r in rs]),
                         "overhead_vs_device_time_median": statistics.median(overhead) if overhead else None,
                         "failed": sum(r["failed"] for r in rs)}
    local, farm = summary["LocalRunner"], summary["tracker+agent"]
    extra_ms = farm["wall_ms_per_candidate_median"] - local["wall_ms_per_candidate_median"]
    meta = common.finish({**machine, "task": task_name, "candidates": len(runner_inputs), "rounds": args.rounds,
                          "evaluator": "number=3, repeat=1"})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"farm_overhead-{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary},
                                                                    indent=2))
    lines = [f"# Farm measuring overhead: {len(runner_inputs)} candidates of ResNet-18 {task_name} ({meta['date']})", "",
             f"{common.describe(meta)} {args.rounds} rounds, "
             "configurations alternating.", "",
             "| runner | wall ms / candidate | device ms / candidate | (wall - device) / device |",
             "| --- | --- | --- | --- |"]
    for name, s in summary.items():
        ov = s["overhead_vs_device_time_median"]
        lines.append(f"| {name} | {s['wall_ms_per_candidate_median']:.1f} | {s['device_ms_per_candidate_median']:.1f} | "
                     f"{ov * 100:.0f}% |" if ov is not None else f"| {name} | - | - | - |")
    share = extra_ms / farm["device_ms_per_candidate_median"]
    lines += ["", f"Farm cost over LocalRunner: {extra_ms:+.1f} ms per candidate "
              f"({extra_ms / local['wall_ms_per_candidate_median'] * 100:+.1f}% of LocalRunner's wall time per candidate, "
              f"{share * 100:+.1f}% of the device time measured).", "",
              f"Target (farm overhead under 5% of measurement time): "
              f"{'met' if extra_ms / local['wall_ms_per_candidate_median'] < 0.05 else 'NOT met'} against LocalRunner's "
              f"wall time per candidate; {'met' if share < 0.05 else 'NOT met'} against device time alone.", "",
              "Both runners pay what measuring a candidate costs anywhere (loading/linking the artifact, "
              "allocating arguments, time_evaluator's extra warm-up call); the farm's own cost is the difference."]
    (out / f"farm_overhead-{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
