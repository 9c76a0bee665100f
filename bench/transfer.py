"""Does the farm's cost model transfer? A network the farm has never tuned, three ways, same budgets.

    python -m bench.transfer --sources DIR [DIR ...] [--model mobilenet_v2] [--budgets 100,300,1000] [--name NAME]

``--sources``: job directories of earlier farm jobs on this CPU (e.g. ResNet-18 and ResNet-50:
``bench/ttq/resnet18-<name>/ttq``, or ``logs/resnet18-cpu``), tuned for exactly this machine's target (the
farm keeps one model per target). They are copied into a work directory and the farm's cost model is built
from them (tuning/farm_model.py, the same trust rules as the farm: finished runs, checked timings). Then
``--model`` (default MobileNetV2: depthwise and pointwise convolutions, inverted residuals, shapes no ResNet
has, so records do not carry over by workload) is tuned through a LocalFarm for each budget, three ways:

* ``cold``: MetaSchedule's XGBoost model from nothing (``tuning.cost_model: xgb``), no warm start;
* ``farm``: starting from the farm's model (``xgb-farm``), no warm start;
* ``farm+warm``: the farm's model and the warm start (records of shared workloads).

Each run gets a fresh copy of the sources and the model (a run never learns from another run of this
benchmark). Every tuned build is then timed in one process against ONNX Runtime and PyTorch, same threads
(bench/model_latency.py's method). Writes bench/results/transfer-<model>-<name>.{json,md}.
Goal (issue 15): the farm model reaches, within 10% of the trials, the latency cold reaches with its full
budget.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from bench import common  # sets TVM_NUM_THREADS before TVM's pool starts

MODES = {"cold": ("xgb", False), "farm": ("xgb-farm", False), "farm+warm": ("xgb-farm", True)}


def reused_run(job_dir: Path, mode: str, budget: int) -> dict:
    """A run of an earlier invocation, from its job directory: what its database and progress say."""
    events = [json.loads(line) for line in (job_dir / "progress.jsonl").read_text().splitlines() if line.strip()]
    measured = sum(e.get("batch", 0) for e in events)
    return {"mode": mode, "budget": budget, "dir": str(job_dir), "wall_s": None,
            "tuning_wall_s": round(max((e.get("elapsed_s", 0.0) for e in events), default=0.0), 1),
            "measured": measured, "failed": sum(e.get("errors", 0) for e in events), "seeded": 0,
            "cut_short": measured < budget}


def copy_sources(sources: list[Path], logs: Path) -> None:
    logs.mkdir(parents=True, exist_ok=True)
    for i, src in enumerate(sources):
        shutil.copytree(src, logs / f"source{i}-{src.parent.name}-{src.name}")


def main():
    import tvm

    from bench.model_latency import measure_jobs, method_text, tvm_ort_cells, write_markdown
    from bench.workloads import bench_job
    from tunefarm.device_agents.probe import llvm_target
    from tunefarm.host.tuning import farm_model
    from tunefarm.host.tuning.job import tune_job
    from tunefarm.host.tuning.jobdir import JobDir
    from tunefarm.testing.localfarm import LocalFarm

    parser = argparse.ArgumentParser(prog="python -m bench.transfer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", nargs="+", required=True, help="earlier job directories on this CPU")
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--budgets", default="100,300,1000")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--runs", default="", help="explicit MODE:BUDGET runs instead of every budget x mode, "
                        "e.g. cold:132,farm:132,farm+warm:132,cold:1320 (the goal needs the farm's runs at 10%% "
                        "of cold's largest budget)")
    parser.add_argument("--per-iter", type=int, default=16)
    parser.add_argument("--population", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--work", default="")
    parser.add_argument("--report-only", action="store_true",
                        help="with --reuse: the report from the timings an earlier invocation kept in --work")
    parser.add_argument("--reuse", action="store_true",
                        help="runs whose job directory is already in --work are not tuned again: their databases "
                             "are timed as they are (a run cut short says how many trials it measured)")
    parser.add_argument("--name", default=common.default_name())
    parser.add_argument("--out", default=str(common.RESULTS))
    args = parser.parse_args()
    budgets = [int(b) for b in args.budgets.split(",") if b]
    modes = [m for m in args.modes.split(",") if m]
    plan = [(int(b), m) for b in budgets for m in modes]
    if args.runs:
        try:
            plan = [(int(b), m) for m, _, b in (r.strip().partition(":") for r in args.runs.split(",") if r.strip())]
        except ValueError:
            parser.error("--runs: MODE:BUDGET,...")
        budgets, modes = sorted({b for b, _ in plan}), list(dict.fromkeys(m for _, m in plan))
    if any(m not in MODES for _, m in plan):
        parser.error(f"modes: {', '.join(MODES)}")
    target = tvm.target.Target(llvm_target())
    from tunefarm.core.targets import target_to_json

    target_json = target_to_json(target)
    sources = [Path(s).resolve() for s in args.sources]
    for src in sources:
        state = JobDir(src).read_state() if (src / "job_state.json").is_file() else None
        if state is None:
            parser.error(f"{src} is not a job directory")
        if state.get("target") != target_json:
            parser.error(f"{src} was tuned for {json.dumps(state.get('target'))}, this machine is "
                         f"{json.dumps(target_json)}: the farm's model is per target")
    work = Path(args.work or tempfile.mkdtemp(prefix="transfer-"))
    work.mkdir(parents=True, exist_ok=True)
    base = work / "base"
    if not (args.reuse and base.is_dir()):
        copy_sources(sources, base)
    t0 = time.monotonic()
    meta = farm_model.rebuild(base, target_json, log=print)
    if meta is None:
        raise SystemExit(f"no trusted records in {', '.join(map(str, sources))} (finished runs with checked timings)")
    model_info = {**meta, "build_wall_s": round(time.monotonic() - t0, 1)}
    machine = common.machine()
    runs = {}
    for budget, mode in plan:
        if True:  # one run per (budget, mode) of the plan
            cost_model, warm = MODES[mode]
            logs = work / f"{mode.replace('+', '-')}-{budget}"
            name = f"{args.model}-{mode.replace('+', '-')}-{budget}"
            if args.reuse and (logs / name / "job_state.json").is_file():
                runs[name] = reused_run(logs / name, mode, budget)
                print(f"  {name}: reused as it is ({runs[name]['measured']} trials in its database)", flush=True)
                continue
            if logs.exists():
                shutil.rmtree(logs)
            shutil.copytree(base, logs)  # the sources and the model built from them, nothing else
            name = f"{args.model}-{mode.replace('+', '-')}-{budget}"
            with LocalFarm(logs / "farm") as farm:
                farm.add_agent("bench")
                job = bench_job(name, args.model, farm.addr, "bench", target, budget, budget, args.per_iter,
                                args.population, warm_start=warm, cost_model=cost_model)
                print(f"{name}: tuning ...", flush=True)
                started = time.time()
                tuned = tune_job(job, logs_dir=str(logs))
            runs[name] = {"mode": mode, "budget": budget, "dir": str(logs / name), "wall_s": round(time.time() - started, 1),
                          "tuning_wall_s": round(tuned.wall_s, 1), "measured": tuned.measured, "failed": tuned.failed,
                          "seeded": tuned.seeded, "tasks": len(tuned.plan.tasks), "cost_model": tuned.cost_model}
            print(f"  {runs[name]}", flush=True)
    timed = work / "timed.json"  # a rerun with --reuse --report-only writes the report from it
    if args.report_only and timed.is_file():
        results = json.loads(timed.read_text())
    else:
        results = measure_jobs([Path(r["dir"]) for r in runs.values()], args.rounds, args.repeat, 10,
                               log=lambda line: print(line, flush=True))
        timed.write_text(json.dumps(results, default=str))
    import onnxruntime
    import torch

    meta_out = common.finish({**machine, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                              "model": args.model, "budgets": budgets, "modes": modes,
                              "per_iter": args.per_iter, "population": args.population, "rounds": args.rounds,
                              "repeat": args.repeat, "warmup": 10, "farm_model": model_info, "work": str(work)})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"transfer-{args.model}-{args.name}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta_out, "runs": runs, "results": results}, indent=2,
                                                    default=str))
    lines = [f"# Transfer of the farm's cost model: {args.model} ({meta_out['date']})", "",
             f"{common.describe(meta_out)} The farm's model: {model_info['records']} records of "
             f"{len(model_info['jobs'])} job(s) ({', '.join(sorted(model_info['jobs']))}), {model_info['workloads']} "
             f"workloads; features {model_info['extract_s']} s, training {model_info['train_s']} s. Each run tuned "
             f"through a LocalFarm (one agent), rounds of {args.per_iter}, population {args.population}, seed 0, one "
             "after the other, each from a fresh copy of the sources; then timed in one process. " + method_text(meta_out),
             "", "| budget | mode | trials measured (failed) | seeded | tuning wall s | TVM median ms | ONNX Runtime ms | "
             "TVM / ORT |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, run in runs.items():
        lat = results[Path(run["dir"]).name]["latency"]
        lines.append(f"| {run['budget']}{' (cut short)' if run.get('cut_short') else ''} | {run['mode']} | "
                     f"{run['measured']} ({run['failed']}) | {run['seeded']} | "
                     f"{run['tuning_wall_s']} | {tvm_ort_cells(lat)} |")
    lines += [""] + goal_lines(runs, results)
    write_markdown(stem, lines, results)


def goal_lines(runs: dict, results: dict) -> list[str]:
    """Issue 15's goal: a farm-model run with at most 10% of cold's largest budget at or below the latency
    that cold run reached."""
    def median(run):
        lat = results.get(Path(run["dir"]).name, {}).get("latency", {}).get("tvm-tuned")
        return lat["median_ms"] if lat else None

    colds = [r for r in runs.values() if r["mode"] == "cold" and median(r) is not None]
    if not colds:
        return ["Goal: not checked (no cold run was timed)."]
    full = max(colds, key=lambda r: r["measured"])
    out = []
    for run in runs.values():
        if run["mode"] != "cold" and run["measured"] <= 0.1 * full["measured"] and median(run) is not None:
            ok = median(run) <= median(full)
            out.append(f"Goal (issue 15): {run['mode']} after {run['measured']} trials {median(run):.2f} ms vs cold "
                       f"after {full['measured']} trials {median(full):.2f} ms: **{'reached' if ok else 'not reached'}**.")
    return out or [f"Goal: not checked (no farm run within 10% of the trials of the longest cold run, "
                   f"{full['measured']}{' — cut short of its budget of ' + str(full['budget']) if full.get('cut_short') else ''})."]


if __name__ == "__main__":
    main()
