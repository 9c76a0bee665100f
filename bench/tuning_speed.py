"""Tuning speed: stock MetaSchedule against tunefarm on the same model, budget and machine, in one run.

    python -m bench.tuning_speed [--model resnet18] [--trials 192] [--per-iter 8]

Configurations, run one after the other on this machine:
  stock     tvm.s_tir.meta_schedule.relax_integration.tune_relax with its LocalBuilder/LocalRunner
            (defaults: evolutionary search with population 512)
  tunefarm  `tunefarm tune` through a real tracker and one local agent (FarmBuilder, FarmRunner,
            population --population)
Both tune the same fused module with the same trial budget, trials per round and per-task cap;
afterwards each database is applied to exactly that module, compiled, and timed locally
(time_evaluator, warm-up then 30 samples). Writes bench/results/tuning_speed-<model>.{json,md,png}
and prints the ratios (tunefarm / stock) last.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from bench import common  # sets TVM_NUM_THREADS (the stock LocalRunner's workers inherit it), before TVM
from bench.workloads import bench_job, measure_local, time_to_reach


def best_curve_callback(events: list, task_weights: list[float], t0_box: list):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    best: dict[int, float] = {}

    @derived_object
    class Curve(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            for res in runner_results:
                if not res.error_msg and res.run_secs:
                    sec = sum(float(x) for x in res.run_secs) / len(res.run_secs)
                    best[task_id] = min(best.get(task_id, sec), sec)
            est = (sum(best[i] * task_weights[i] for i in best) * 1e3
                   if len(best) == len(task_weights) else None)
            events.append({"elapsed_s": time.time() - t0_box[0], "trials": len(events) and events[-1]["trials"]
                           + len(runner_results) or len(runner_results), "estimated_ms": est})

    return Curve()


def run_stock(mod, target, args, work_dir: Path) -> dict:
    from tvm.s_tir import meta_schedule as ms

    from tunefarm.host.tuning.progress import time_split

    extracted = ms.relax_integration.extract_tasks(mod, target)
    weights = [float(t.weight) for t in extracted]
    events: list = []
    t0 = [time.time()]
    callbacks = ms.measure_callback.MeasureCallback.create("default") + [best_curve_callback(events, weights, t0)]
    profiler = ms.Profiler()
    with profiler:
        db = ms.relax_integration.tune_relax(
            mod, None, target, work_dir=str(work_dir), max_trials_global=args.trials,
            max_trials_per_task=args.per_iter, num_trials_per_iter=args.per_iter,
            builder=ms.builder.LocalBuilder(timeout_sec=args.builder_timeout), runner=ms.runner.LocalRunner(
                evaluator_config=ms.runner.EvaluatorConfig(number=2, repeat=1, min_repeat_ms=20)),
            measure_callbacks=callbacks, seed=0)
    wall = time.time() - t0[0]
    split = time_split({str(k): float(v) for k, v in profiler.get().items()}, wall)
    return {"wall_s": wall, "curve": events, "database": db, "time_split": split}


def run_farm(mod, target, args, work_dir: Path, model_name: str, population: int, budget_factor: int = 1,
             keep: str = "") -> dict:
    from tunefarm.host.tuning.job import tune_job
    from tunefarm.host.tuning.jobdir import JobDir
    from tunefarm.testing.localfarm import LocalFarm

    with LocalFarm(work_dir) as farm:
        farm.add_agent("bench")
        job = bench_job("bench", model_name, farm.addr, "bench", target, args.trials * budget_factor,
                        args.per_iter * budget_factor, args.per_iter, population)
        t0 = time.time()
        tuned = tune_job(job, logs_dir=str(work_dir))
        wall = time.time() - t0
    curve = JobDir(work_dir / "bench").events()
    shift = curve[0]["time"] - curve[0]["elapsed_s"] - t0 if curve else 0.0
    for ev in curve:  # elapsed from the start of tune_job, like the stock curve
        ev["elapsed_s"] = ev["elapsed_s"] + shift
    assert tuned.mod is not None
    if keep:  # the job directory, for bench/model_latency.py
        shutil.rmtree(keep, ignore_errors=True)
        shutil.copytree(work_dir / "bench", keep)
    return {"wall_s": wall, "tuning_wall_s": tuned.wall_s, "curve": curve,
            "database": tuned.database, "mod": tuned.mod, "time_split": tuned.time_split}


def plot(results: dict, model: str, trials: int, cpus: int, path: Path) -> None:
    """Two panels against wall time: trials measured, and best estimated latency once every task has one."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, res in results.items():
        pts = [(e["elapsed_s"], e["trials"]) for e in res["curve"]]
        if pts:
            ax1.step(*zip(*([(0, 0)] + pts)), where="post", label=f"{name} ({res['wall_s']:.0f} s)")
        est = [(e["elapsed_s"], e["estimated_ms"]) for e in res["curve"] if e.get("estimated_ms")]
        if est:
            ax2.step(*zip(*est), where="post", marker=".", label=name)
    ax1.set_xlabel("wall time (s)")
    ax1.set_ylabel("trials recorded (MetaSchedule joins a round's results late)")
    ax1.set_title(f"{model}: {trials}-trial budget, {cpus} cores")
    ax2.set_xlabel("wall time (s)")
    ax2.set_ylabel("best estimated end-to-end latency (ms)")
    ax2.set_title("estimate (from the first time every task has a record)")
    for ax in (ax1, ax2):
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    import tvm

    from tunefarm.core.jobspec import ModelSpec
    from tunefarm.host.models import load_model, to_relax
    from tunefarm.host.tuning.plan import fuse_for_tuning
    from tunefarm.device_agents.probe import llvm_target

    parser = argparse.ArgumentParser(prog="python -m bench.tuning_speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--trials", type=int, default=192)
    parser.add_argument("--per-iter", type=int, default=8)
    parser.add_argument("--population", type=int, default=128)
    parser.add_argument("--builder-timeout", type=float, default=120.0,
                        help="stock LocalBuilder timeout; its default 30 s kills every build on a loaded 2-core "
                             "machine, since each fresh worker first imports all tensor intrinsics (~20 s CPU)")
    parser.add_argument("--long-factor", type=int, default=4,
                        help="also run tunefarm with this many times the budget (time to stock's final estimate; 0: skip)")
    parser.add_argument("--keep", default="", help="copy the long run's job directory here (for model_latency.py)")
    parser.add_argument("--out", default=str(common.RESULTS))
    parser.add_argument("--replot", metavar="JSON", help="only redraw the PNG from an earlier results JSON")
    args = parser.parse_args()
    if args.replot:
        data = json.loads(Path(args.replot).read_text())
        meta = data["meta"]
        plot(data["results"], meta["model"], meta["trials"], meta.get("cores", meta.get("cpus")),
             Path(args.replot).with_suffix(".png"))
        return

    target = tvm.target.Target(llvm_target())
    model = load_model(ModelSpec("torchvision", args.model, None, [1, 3, 224, 224]))
    mod = fuse_for_tuning(to_relax(model), target)
    work = Path(tempfile.mkdtemp(prefix="tuning-speed-"))
    machine = common.machine()
    results = {}
    print(f"stock tune_relax: {args.trials} trials ...", flush=True)
    stock = run_stock(mod, target, args, work / "stock")
    results["stock"] = {"wall_s": stock["wall_s"], "curve": stock["curve"],
                        "latency": measure_local(mod, target, stock["database"])}
    print(f"  {stock['wall_s']:.0f} s, measured {results['stock']['latency']['median_ms']:.2f} ms", flush=True)
    results["stock"]["time_split"] = stock["time_split"]
    configs = [("tunefarm", args.population, 1, ""), ("tunefarm-pop512", 512, 1, ""),
               (f"tunefarm-{args.long_factor}x-budget", args.population, args.long_factor, args.keep)]
    for name, population, factor, keep in configs:
        if factor < 1:
            continue
        print(f"{name}: {args.trials * factor} trials, population {population} ...", flush=True)
        farm = run_farm(mod, target, args, work / name, args.model, population, factor, keep)
        results[name] = {"wall_s": farm["wall_s"], "tuning_wall_s": farm["tuning_wall_s"], "curve": farm["curve"],
                         "latency": measure_local(farm["mod"], target, farm["database"]),
                         "time_split": farm["time_split"], "population": population, "budget": args.trials * factor}
        print(f"  {farm['wall_s']:.0f} s, measured {results[name]['latency']['median_ms']:.2f} ms", flush=True)
    results["stock"].update({"population": 512, "budget": args.trials})

    for res in results.values():
        trials = res["curve"][-1]["trials"] if res["curve"] else 0
        res["trials"] = trials
        res["trials_per_min"] = trials / (res["wall_s"] / 60)
        ests = [e["estimated_ms"] for e in res["curve"] if e.get("estimated_ms")]
        res["best_estimated_ms"] = min(ests) if ests else None
    stock_final = results["stock"]["best_estimated_ms"]
    for res in results.values():
        res["reached_stock_final_s"] = time_to_reach(res["curve"], stock_final)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"tuning_speed-{args.model}"
    meta = common.finish({**machine, "builder_timeout_stock": args.builder_timeout, "model": args.model,
                          "trials": args.trials, "per_iter": args.per_iter, "farm_population": args.population,
                          "stock_population": 512, "target": str(target)})
    (stem.with_suffix(".json")).write_text(json.dumps({"meta": meta, "results": results}, indent=2))

    plot(results, args.model, args.trials, meta["cores"], stem.with_suffix(".png"))

    s = results["stock"]
    lines = [f"# Tuning speed: {args.model}, {args.trials} trials ({args.per_iter} per round), {meta['date']}", "",
             f"{common.describe(meta)} Target `{meta['target']}`. All rows in one run, one after the other.", "",
             "| configuration | population | budget | wall s | trials | trials/min | best estimated ms "
             "| reached stock's final estimate at s | measured median ms | tuned functions |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, res in results.items():
        est = res["best_estimated_ms"]
        reached = res["reached_stock_final_s"]
        lines.append(f"| {name} | {res['population']} | {res['budget']} | {res['wall_s']:.0f} | {res['trials']} | "
                     f"{res['trials_per_min']:.1f} | {f'{est:.2f}' if est else '-'} | "
                     f"{f'{reached:.0f}' if reached is not None else 'never'} | "
                     f"{res['latency']['median_ms']:.2f} | {res['latency']['tuned_functions']} |")
    lines += ["", "Where the time went (MetaSchedule's profiler; seconds): search = evolutionary search incl. "
              "cost-model prediction, build = SendToBuilder, measure = SendToRunner + JoinRunnerFutures, "
              "update = cost-model training + database, other = the rest of the wall time.", "",
              "| configuration | search | build | measure | update | other |", "| --- | --- | --- | --- | --- | --- |"]
    for name, res in results.items():
        t = res["time_split"]
        lines.append(f"| {name} | {t['search_s']:.0f} | {t['build_s']:.0f} | {t['measure_s']:.0f} | "
                     f"{t['model_update_s']:.0f} | {t['other_s']:.0f} |")
    lines += ["", f"stock: tune_relax defaults (population 512), LocalBuilder timeout {args.builder_timeout:g} s "
              "(default 30 s times out every build on this machine under load), LocalRunner. tunefarm: `tunefarm "
              "tune` (warm builders, measured through tracker + agent, cold: no warm start). All: number=2, "
              "min_repeat_ms=20, per-task cap = trials per round x budget factor, seed 0.", "",
              "Estimates are the sum over tasks of best measured time x task weight (MetaSchedule's own "
              "measurements); the measured median is the compiled model run here after tuning (one round per "
              "task is mostly luck of the first sample: compare estimates across rows with that in mind).", "",
              "Ratios (tunefarm row / stock):"]
    for name, res in results.items():
        if name == "stock":
            continue
        reach = (f"{res['reached_stock_final_s'] / s['reached_stock_final_s']:.3f}"
                 if res["reached_stock_final_s"] is not None and s["reached_stock_final_s"] else "never reached")
        lines.append(f"- {name}: time to stock's final estimate {reach}, wall {res['wall_s'] / s['wall_s']:.2f}, "
                     f"trials/min {res['trials_per_min'] / s['trials_per_min']:.2f}, measured latency "
                     f"{res['latency']['median_ms'] / s['latency']['median_ms']:.2f}")
    (stem.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
