"""The farm's own measuring overhead: the same built candidates through LocalRunner and through a
real tracker + agent (FarmRunner), in one run on this machine, over links of several round-trip times.

    python -m bench.farm_overhead [--candidates 32] [--rounds 3] [--rtt-ms 0,10,50]

Each round-trip time above 0 is an agent of its own key reached through the farm's delay proxy
(tunefarm/testing/delayproxy.py: RTT/2 added each way; the agent advertises the proxy's address with
--custom-addr, as an agent behind a NAT or a tunnel would); 0 is an agent reached directly on loopback.

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
    from tunefarm.core.procs import free_port
    from tunefarm.host.tuning.runner import FarmRunner
    from tunefarm.testing import delayproxy
    from tunefarm.testing.localfarm import LocalFarm

    parser = argparse.ArgumentParser(prog="python -m bench.farm_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rtt-ms", default="0", help="comma-separated round-trip times of the links to agents")
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

    rtts = [float(x) for x in args.rtt_ms.split(",") if x.strip()]
    names = {rtt: "tracker+agent" if rtt == 0 else f"tracker+agent, {rtt:g} ms RTT" for rtt in rtts}
    rows: dict[str, list] = {"LocalRunner": [], **{name: [] for name in names.values()}}
    proxies = []
    with LocalFarm(Path("/tmp") / f"farm-overhead-{os.getpid()}") as farm:
        runners = {"LocalRunner": ms.runner.LocalRunner(evaluator_config=evaluator, timeout_sec=120)}
        try:
            for n, rtt in enumerate(rtts):
                key = f"rtt{n}"
                if rtt == 0:
                    farm.add_agent(key)
                else:
                    port, addr = free_port("127.0.0.1"), f"127.0.0.{n + 2}"
                    farm.add_agent(key, "--port", str(port), "--custom-addr", addr)
                    proxies.append(delayproxy.start(f"{addr}:{port}", f"127.0.0.1:{port}", rtt / 2))
                runners[names[rtt]] = FarmRunner(*farm.tracker_addr, key, evaluator_config=evaluator, timeout_sec=120)
            for name, runner in runners.items():  # warm-up: pools started, agent session path exercised
                [f.result() for f in runner.run(runner_inputs[:2])]
                if isinstance(runner, FarmRunner):
                    runner.stats.chunks.clear()
            measure_rounds(args.rounds, runners, runner_inputs, evaluator, rows)
        finally:
            for proxy in proxies:
                proxy.kill()
        chunks = {name: dict(r.stats.chunks) for name, r in runners.items() if isinstance(r, FarmRunner)}
        for runner in runners.values():
            if isinstance(runner, FarmRunner):
                runner.shutdown()

    summary = {}
    for name, rs in rows.items():
        per_cand = [r["wall_s"] / max(1, r["ok"]) * 1e3 for r in rs]
        overhead = [(r["wall_s"] - r["device_s"]) / r["device_s"] for r in rs if r["device_s"] > 0]
        summary[name] = {"wall_ms_per_candidate_median": statistics.median(per_cand),
                         "device_ms_per_candidate_median": statistics.median(
                             [r["device_s"] / max(1, r["ok"]) * 1e3 for r in rs]),
                         "overhead_vs_device_time_median": statistics.median(overhead) if overhead else None,
                         "failed": sum(r["failed"] for r in rs), "chunks": chunks.get(name)}
    local = summary["LocalRunner"]
    meta = common.finish({**machine, "task": task_name, "candidates": len(runner_inputs), "rounds": args.rounds,
                          "evaluator": "number=3, repeat=1", "rtt_ms": rtts})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"farm_overhead-{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary},
                                                                    indent=2))
    lines = [f"# Farm measuring overhead: {len(runner_inputs)} candidates of ResNet-18 {task_name} ({meta['date']})", "",
             f"{common.describe(meta)} {args.rounds} rounds, configurations alternating within each round.", "",
             "| runner | link RTT | wall ms / candidate | device ms / candidate | (wall - device) / device | "
             "vs LocalRunner (wall per candidate) | goal | candidates per call |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in summary.items():
        rtt = next((r for r, n in names.items() if n == name), None)
        ov = s["overhead_vs_device_time_median"]
        extra = s["wall_ms_per_candidate_median"] / local["wall_ms_per_candidate_median"] - 1
        goal = "-" if rtt is None else ((0.05 if rtt == 0 else 0.10) if rtt in (0, 50) else None)
        verdict = "-" if goal in ("-", None) else f"< {goal:.0%}: {'met' if extra < goal else 'NOT met'}"
        calls = ", ".join(f"{k} x{v}" for k, v in sorted((s["chunks"] or {}).items())) or "-"
        lines.append(f"| {name} | {'-' if rtt is None else f'{rtt:g} ms'} | {s['wall_ms_per_candidate_median']:.1f} | "
                     f"{s['device_ms_per_candidate_median']:.1f} | {ov * 100:.0f}% | "
                     f"{'-' if rtt is None else f'{extra * 100:+.1f}%'} | {verdict} | {calls} |"
                     if ov is not None else f"| {name} | - | - | - | - | - | - | - |")
    lines += ["", "Goals (issue 16): the farm's per-candidate cost over LocalRunner under 5% at 0 ms and under 10% at "
              "50 ms round-trip time. 'candidates per call': how many candidates each measuring RPC call carried "
              "(size x calls, over the timed rounds; FarmRunner sends several per call where the session's "
              "round trip would otherwise be over 5% of their measuring time).", "",
              "Both runners pay what measuring a candidate costs anywhere (loading/linking the artifact, "
              "allocating arguments, time_evaluator's extra warm-up call); the farm's own cost is the difference."]
    (out / f"farm_overhead-{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def measure_rounds(rounds: int, runners: dict, runner_inputs: list, evaluator, rows: dict) -> None:
    """Every runner measures every candidate once per round, in turn (drift in the machine hits all)."""
    for _ in range(rounds):
        for name, runner in runners.items():
            t0 = time.perf_counter()
            results = [f.result() for f in runner.run(runner_inputs)]
            wall = time.perf_counter() - t0
            ok = [r for r in results if r.error_msg is None]
            device = sum(sum(float(x) for x in r.run_secs) * evaluator.number for r in ok)
            rows[name].append({"wall_s": wall, "device_s": device, "ok": len(ok), "failed": len(results) - len(ok)})
            print(name, rows[name][-1], flush=True)


if __name__ == "__main__":
    main()
