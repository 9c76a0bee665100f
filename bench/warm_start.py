"""Warm start against cold start: the same model and budget, once from nothing, once from the farm's history.

    python -m bench.warm_start [--seed-model resnet50] [--model resnet18] [--trials 192] [--per-iter 8]

One local farm (real tracker + one agent on this machine), three `tunefarm tune` jobs in one run:
  seed   --seed-model tuned cold (the farm's "earlier job", e.g. last night's ResNet-50);
  warm   --model with warm_start on, in the seed job's logs directory: it starts from the seed job's
         best records of every workload the two models share (found by structural hash);
  cold   --model with warm_start off, in a directory of its own.
warm and cold get the same trial budget, trials per round, per-task cap, population and seed; seeded
records are not measured again and are not counted as trials. Afterwards each database is applied to
its tuned module, compiled, and timed here (time_evaluator, warm-up then 30 samples).
Per job: wall time, trials, best estimated latency over time, measured latency, and when warm reached
cold's final estimate. Writes bench/results/warm_start-<model>.{json,md,png}; ratios (warm / cold) last.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from bench import common
from bench.workloads import bench_job, measure_local, time_to_reach


def run(job_name: str, model: str, logs_dir: Path, farm, target, args, warm: bool) -> dict:
    from tunefarm.host.tuning.job import tune_job
    from tunefarm.host.tuning.jobdir import JobDir

    job = bench_job(job_name, model, farm.addr, "bench", target, args.trials, args.per_iter, args.per_iter,
                    args.population, warm_start=warm)
    t0 = time.time()
    tuned = tune_job(job, logs_dir=str(logs_dir))
    wall = time.time() - t0
    job_dir = JobDir(logs_dir / job_name)
    curve = job_dir.events()
    for ev in curve:  # seconds since this job's tune_job started
        ev["elapsed_s"] = ev["time"] - t0
    state = job_dir.read_state()
    ests = [e["estimated_ms"] for e in curve if e.get("estimated_ms")]
    return {"wall_s": wall, "trials": curve[-1]["trials"] if curve else 0, "curve": curve,
            "best_estimated_ms": min(ests) if ests else None,
            "warm_start": {k: v for k, v in state.get("warm_start", {}).items() if k != "per_workload"},
            "warm_workloads": len(state.get("warm_start", {}).get("per_workload", {})),
            "tasks": len(job_dir.read_tasks()), "seeded": tuned.seeded, "cache_hits": tuned.cache_hits,
            "latency": measure_local(tuned.mod, target, tuned.database)}


def plot(results: dict, title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("cold", "warm"):
        est = [(e["elapsed_s"], e["trials"], e["estimated_ms"]) for e in results[name]["curve"] if e.get("estimated_ms")]
        if est:
            ax1.step([e[0] for e in est], [e[2] for e in est], where="post", marker=".", label=name)
            ax2.step([e[1] for e in est], [e[2] for e in est], where="post", marker=".", label=name)
    ax1.set_xlabel("wall time since the job started (s)")
    ax2.set_xlabel("trials measured by the job")
    for ax in (ax1, ax2):
        ax.set_ylabel("best estimated latency (ms)")
        ax.set_yscale("log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    ax1.set_title(title)
    ax2.set_title("estimate once every task has a record")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    import tvm

    from tunefarm.device_agents.probe import llvm_target
    from tunefarm.testing.localfarm import LocalFarm

    parser = argparse.ArgumentParser(prog="python -m bench.warm_start", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed-model", default="resnet50")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--trials", type=int, default=192)
    parser.add_argument("--seed-trials", type=int, default=0, help="the seed job's budget (default: --trials)")
    parser.add_argument("--per-iter", type=int, default=8)
    parser.add_argument("--population", type=int, default=128)
    parser.add_argument("--out", default=str(common.RESULTS))
    args = parser.parse_args()

    machine = common.machine()
    target = tvm.target.Target(llvm_target())
    work = Path(tempfile.mkdtemp(prefix="warm-start-"))
    results = {}
    with LocalFarm(work / "farm") as farm:
        farm.add_agent("bench")
        seed_args = argparse.Namespace(**{**vars(args), "trials": args.seed_trials or args.trials})
        for name, model, logs, warm, a in (("seed", args.seed_model, work / "history", False, seed_args),
                                           ("warm", args.model, work / "history", True, args),
                                           ("cold", args.model, work / "alone", False, args)):
            print(f"{name}: {model}, {a.trials} trials ...", flush=True)
            results[name] = run(f"{name}-{model}", model, logs, farm, target, a, warm)
            r = results[name]
            print(f"  {r['wall_s']:.0f} s, {r['trials']} trials, estimated {r['best_estimated_ms']}, "
                  f"measured {r['latency']['median_ms']:.2f} ms", flush=True)
    cold_final = results["cold"]["best_estimated_ms"]
    for r in results.values():
        r["reached_cold_final_s"] = time_to_reach(r["curve"], cold_final)
        r["trials_per_min"] = r["trials"] / (r["wall_s"] / 60)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"warm_start-{args.model}"
    meta = common.finish({**machine, "model": args.model, "seed_model": args.seed_model, "trials": args.trials,
                          "seed_trials": seed_args.trials, "per_iter": args.per_iter, "population": args.population,
                          "target": str(target)})
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    plot(results, f"{args.model}: warm (from {args.seed_model}) vs cold, {args.trials} trials", stem.with_suffix(".png"))

    w, c = results["warm"], results["cold"]
    lines = [f"# Warm start vs cold start: {args.model}, {args.trials} trials ({args.per_iter} per round), {meta['date']}", "",
             f"{common.describe(meta)} Target `{meta['target']}`. One tracker + one local agent; population "
             f"{args.population}.", "",
             f"The warm job's history: one earlier job, `{args.seed_model}` tuned cold with {seed_args.trials} trials "
             f"(seed row). The warm job imported {w['warm_start'].get('records', 0)} records for "
             f"{w['warm_workloads']} of its {w['tasks']} tasks (shared workloads by structural hash); the cold "
             "job had no history.", "",
             "| job | model | wall s | trials measured | best estimated ms | reached cold's final estimate at s "
             "| measured median ms | tuned functions |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        model = args.seed_model if name == "seed" else args.model
        est = r["best_estimated_ms"]
        reached = r["reached_cold_final_s"] if name != "seed" else None
        lines.append(f"| {name} | {model} | {r['wall_s']:.0f} | {r['trials']} | {f'{est:.2f}' if est else '-'} | "
                     f"{'-' if name == 'seed' else (f'{reached:.0f}' if reached is not None else 'never')} | "
                     f"{r['latency']['median_ms']:.2f} | {r['latency']['tuned_functions']} |")
    lines += ["", "Trials are candidates each job measured; seeded records and cache hits (candidates the database "
              "already answered) are not trials: " + ", ".join(f"{name} {r['seeded']} seeded, {r['cache_hits']} cache hits"
                                                               for name, r in results.items()) + "."]
    lines += ["", "Estimated = sum over tasks of the best measured time x task weight; measured = the compiled "
              "model run here after tuning (median of 30 after warm-up).", "",
              f"Ratios (warm / cold): measured latency {w['latency']['median_ms'] / c['latency']['median_ms']:.2f}, "
              f"best estimate {(w['best_estimated_ms'] or float('nan')) / (c['best_estimated_ms'] or float('nan')):.2f}, "
              f"wall {w['wall_s'] / c['wall_s']:.2f}, time to cold's final estimate "
              f"{(w['reached_cold_final_s'] / c['reached_cold_final_s']) if w['reached_cold_final_s'] is not None and c['reached_cold_final_s'] else float('nan'):.2f}"]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
