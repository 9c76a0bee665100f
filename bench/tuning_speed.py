"""Tuning speed: stock MetaSchedule against tunefarm on the same model, budget and machine, in one run.

    python bench/tuning_speed.py [--model resnet18] [--trials 192] [--per-iter 8]

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
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


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


def measure_local(mod, target, database, repeat=30) -> dict:
    import numpy as np
    import tvm
    from tvm import relax

    from tunefarm.core.stats import latency_stats
    from tunefarm.host.evaluate import apply_database

    applied, scheduled, unscheduled = apply_database(mod, target, database)
    vm = relax.VirtualMachine(tvm.compile(applied, target), tvm.cpu())
    x = tvm.runtime.tensor(np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype("float32"))
    vm.set_input("main", x)
    vm.time_evaluator("invoke_stateful", tvm.cpu(), number=3, repeat=1)("main")
    res = vm.time_evaluator("invoke_stateful", tvm.cpu(), number=1, repeat=repeat)("main")
    stats = latency_stats(res.results, warmup=3)
    stats["tuned_functions"] = f"{len(scheduled)}/{len(scheduled) + len(unscheduled)}"
    return stats


def run_stock(mod, target, args, work_dir: Path) -> dict:
    from tvm.s_tir import meta_schedule as ms

    extracted = ms.relax_integration.extract_tasks(mod, target)
    weights = [float(t.weight) for t in extracted]
    events: list = []
    t0 = [time.time()]
    callbacks = ms.measure_callback.MeasureCallback.create("default") + [best_curve_callback(events, weights, t0)]
    db = ms.relax_integration.tune_relax(
        mod, None, target, work_dir=str(work_dir), max_trials_global=args.trials,
        max_trials_per_task=args.per_iter, num_trials_per_iter=args.per_iter,
        builder=ms.builder.LocalBuilder(timeout_sec=args.builder_timeout), runner=ms.runner.LocalRunner(
            evaluator_config=ms.runner.EvaluatorConfig(number=2, repeat=1, min_repeat_ms=20)),
        measure_callbacks=callbacks, seed=0)
    wall = time.time() - t0[0]
    return {"wall_s": wall, "curve": events, "database": db}


def run_farm(mod, target, args, work_dir: Path, model_name: str) -> dict:
    from tvm.s_tir import meta_schedule as ms

    from tunefarm.core.jobspec import job_from_dict
    from tunefarm.core.procs import free_port, start_tunefarm, stop_process, wait_until
    from tunefarm.core.targets import target_to_json
    from tunefarm.host.tuning import tune_job
    from tunefarm.tracker.client import TrackerClient, check_tracker

    port = free_port()
    tracker = start_tunefarm(["tracker", "--host", "127.0.0.1", "--port", port], work_dir / "tracker.log")
    agent = None
    try:
        def up():
            try:
                check_tracker("127.0.0.1", port)
                return True
            except Exception:  # pylint: disable=broad-except
                return False
        wait_until(up, 60, what="tracker")
        agent = start_tunefarm(["agent", "--tracker", f"127.0.0.1:{port}", "--key", "bench", "--host", "127.0.0.1",
                                "--port", free_port()], work_dir / "agent.log")
        client = TrackerClient("127.0.0.1", port)
        wait_until(lambda: client.servers_for_key("bench") > 0, 120, what="agent")
        job = job_from_dict({
            "name": "bench", "model": {"source": "torchvision", "name": model_name, "input_shape": [1, 3, 224, 224]},
            "device": {"key": "bench", "tracker": f"127.0.0.1:{port}"}, "target": target_to_json(target),
            "tuning": {"max_trials_global": args.trials, "max_trials_per_task": args.per_iter,
                       "num_trials_per_iter": args.per_iter, "population_size": args.population, "seed": 0},
            "builder": {"workers": 0, "timeout_sec": 120},
            "runner": {"timeout_sec": 60, "number": 2, "repeat": 1, "min_repeat_ms": 20}})
        t0 = time.time()
        tuned = tune_job(job, logs_dir=str(work_dir))
        wall = time.time() - t0
        curve = [json.loads(l) for l in (work_dir / "bench" / "progress.jsonl").read_text().splitlines()]
        shift = curve[0]["time"] - curve[0]["elapsed_s"] - t0 if curve else 0.0
        for ev in curve:  # elapsed from the start of tune_job, like the stock curve
            ev["elapsed_s"] = ev["elapsed_s"] + shift
        assert tuned["mod"] is not None
        return {"wall_s": wall, "tuning_wall_s": tuned["tuning_wall_s"], "curve": curve,
                "database": tuned["database"], "mod": tuned["mod"]}
    finally:
        if agent is not None:
            stop_process(agent)
        stop_process(tracker)


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
    from tunefarm.host.tuning import fuse_for_tuning
    from tunefarm.device_agents.probe import llvm_target

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--trials", type=int, default=192)
    parser.add_argument("--per-iter", type=int, default=8)
    parser.add_argument("--population", type=int, default=128)
    parser.add_argument("--builder-timeout", type=float, default=120.0,
                        help="stock LocalBuilder timeout; its default 30 s kills every build on a loaded 2-core "
                             "machine, since each fresh worker first imports all tensor intrinsics (~20 s CPU)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--replot", metavar="JSON", help="only redraw the PNG from an earlier results JSON")
    args = parser.parse_args()
    if args.replot:
        data = json.loads(Path(args.replot).read_text())
        meta = data["meta"]
        plot(data["results"], meta["model"], meta["trials"], meta["cpus"], Path(args.replot).with_suffix(".png"))
        return

    target = tvm.target.Target(llvm_target())
    model = load_model(ModelSpec("torchvision", args.model, None, [1, 3, 224, 224]))
    mod = fuse_for_tuning(to_relax(model), target)
    work = Path(tempfile.mkdtemp(prefix="tuning-speed-"))
    results = {}
    print(f"stock tune_relax: {args.trials} trials ...", flush=True)
    stock = run_stock(mod, target, args, work / "stock")
    results["stock"] = {"wall_s": stock["wall_s"], "curve": stock["curve"],
                        "latency": measure_local(mod, target, stock["database"])}
    print(f"  {stock['wall_s']:.0f} s, measured {results['stock']['latency']['median_ms']:.2f} ms", flush=True)
    print(f"tunefarm tune: {args.trials} trials ...", flush=True)
    farm = run_farm(mod, target, args, work / "farm", args.model)
    results["tunefarm"] = {"wall_s": farm["wall_s"], "tuning_wall_s": farm["tuning_wall_s"], "curve": farm["curve"],
                           "latency": measure_local(farm["mod"], target, farm["database"])}
    print(f"  {farm['wall_s']:.0f} s, measured {results['tunefarm']['latency']['median_ms']:.2f} ms", flush=True)

    for res in results.values():
        trials = res["curve"][-1]["trials"] if res["curve"] else 0
        res["trials"] = trials
        res["trials_per_min"] = trials / (res["wall_s"] / 60)
        ests = [e["estimated_ms"] for e in res["curve"] if e.get("estimated_ms")]
        res["best_estimated_ms"] = min(ests) if ests else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"tuning_speed-{args.model}"
    meta = {"builder_timeout_stock": args.builder_timeout, "model": args.model, "trials": args.trials, "per_iter": args.per_iter, "farm_population": args.population,
            "stock_population": 512, "target": str(target), "machine": platform.processor() or platform.machine(),
            "cpus": __import__("os").cpu_count(), "tvm": tvm.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
    (stem.with_suffix(".json")).write_text(json.dumps({"meta": meta, "results": results}, indent=2))

    plot(results, args.model, args.trials, meta["cpus"], stem.with_suffix(".png"))

    s, f = results["stock"], results["tunefarm"]
    lines = [f"# Tuning speed: {args.model}, {args.trials} trials ({args.per_iter} per round), {meta['date']}", "",
             f"Machine: {meta['cpus']} cores, target `{meta['target']}`, TVM {meta['tvm']}.", "",
             "| configuration | wall s | trials | trials/min | best estimated ms | measured median ms | tuned functions |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, res in results.items():
        est = res["best_estimated_ms"]
        lines.append(f"| {name} | {res['wall_s']:.0f} | {res['trials']} | {res['trials_per_min']:.1f} | "
                     f"{est:.2f} | {res['latency']['median_ms']:.2f} | {res['latency']['tuned_functions']} |"
                     if est else f"| {name} | {res['wall_s']:.0f} | {res['trials']} | {res['trials_per_min']:.1f} | - | "
                     f"{res['latency']['median_ms']:.2f} | {res['latency']['tuned_functions']} |")
    lines += ["", f"stock: population 512 (default), LocalBuilder timeout {args.builder_timeout:g} s (default 30 s "
              "times out every build on this machine under load), LocalRunner; tunefarm: population "
              f"{args.population}, warm FarmBuilder, measured through tracker + agent. Both: number=2, "
              "min_repeat_ms=20, per-task cap = trials per round.", "",
              f"Ratios (tunefarm / stock): wall {f['wall_s'] / s['wall_s']:.2f}, trials/min "
              f"{f['trials_per_min'] / s['trials_per_min']:.2f}, measured latency "
              f"{f['latency']['median_ms'] / s['latency']['median_ms']:.2f}"]
    (stem.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
