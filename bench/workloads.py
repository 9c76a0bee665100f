"""What several benchmarks share: the tuning job they run, a fixed set of candidates, timing a tuned database
here, and when a curve reached a latency."""
from __future__ import annotations


def draw_candidates(n: int, seed: int = 0, task_name: str = ""):
    """``(task name, target, BuilderInputs)``: ``n`` random traces (ReplayTrace, ``seed``) of ResNet-18's task
    ``task_name`` (default: its heaviest conv) for this machine's llvm target."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from tunefarm.core.jobspec import ModelSpec
    from tunefarm.device_agents.probe import llvm_target
    from tunefarm.host.models import load_model, to_relax
    from tunefarm.host.tuning.intrinsics import load_for
    from tunefarm.host.tuning.plan import fuse_for_tuning

    target = tvm.target.Target(llvm_target())
    load_for(target)
    model = load_model(ModelSpec("torchvision", "resnet18", None, [1, 3, 224, 224]))
    mod = fuse_for_tuning(to_relax(model), target)
    tasks = [t for t in ms.relax_integration.extract_tasks(mod, target) if "conv2d" in t.task_name]
    if task_name:
        named = [t for t in tasks if t.task_name == task_name]
        if not named:
            raise SystemExit(f"no conv task {task_name!r}; ResNet-18's are: {', '.join(t.task_name for t in tasks)}")
        task = named[0]
    else:
        task = max(tasks, key=lambda t: t.weight * len(str(t.dispatched[0])))
    ctx = ms.TuneContext(mod=task.dispatched[0], target=target, space_generator="post-order-apply",
                         search_strategy=ms.search_strategy.ReplayTrace(), task_name=task.task_name, rand_state=seed)
    ctx.pre_tuning(max_trials=n, num_trials_per_iter=n, design_spaces=ctx.generate_design_space())
    cands = ctx.generate_measure_candidates()
    return task.task_name, target, [ms.builder.BuilderInput(c.sch.mod, target) for c in cands]


def measure_local(mod, target, database, repeat=30) -> dict:
    import numpy as np
    import tvm
    from tvm import relax

    from tunefarm.core.stats import latency_stats
    from tunefarm.host.tuning.evaluate import apply_database

    applied, scheduled, unscheduled = apply_database(mod, target, database)
    vm = relax.VirtualMachine(tvm.compile(applied, target), tvm.cpu())
    x = tvm.runtime.tensor(np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype("float32"))
    vm.set_input("main", x)
    vm.time_evaluator("invoke_stateful", tvm.cpu(), number=3, repeat=1)("main")
    res = vm.time_evaluator("invoke_stateful", tvm.cpu(), number=1, repeat=repeat)("main")
    stats = latency_stats(res.results, warmup=3, timer="time_evaluator")
    stats["tuned_functions"] = f"{len(scheduled)}/{len(scheduled) + len(unscheduled)}"
    return stats


def bench_job(name: str, model: str, tracker: str, key: str, target, trials: int, per_task: int, per_iter: int,
              population: int, warm_start: bool = False, build_key: str = "", builder_workers: int = 0,
              cost_model: str = "xgb", search_workers: int = 0, build_timeout_s: float | None = None,
              straggler_factor: float | None = None):
    """The tuning job every benchmark runs: a torchvision model at batch 1, the same runner settings as stock's
    (number=2, min_repeat_ms=20), seed 0, a cold cost model unless ``cost_model`` says otherwise (jobs of one
    benchmark share a logs directory: the farm's model of the first would teach the next). A candidate's build is
    killed after ``build_timeout_s`` (default 120 s on this host, 300 s on build agents; stock LocalBuilder: 30), and
    cut as a straggler as the job's ``builder.straggler_factor`` says (``straggler_factor``; default the job's)."""
    from tunefarm.core.jobspec import job_from_dict
    from tunefarm.core.targets import target_to_json

    return job_from_dict({
        "name": name, "model": {"source": "torchvision", "name": model, "input_shape": [1, 3, 224, 224]},
        "device": {"key": key, "tracker": tracker}, "target": target_to_json(target),
        "tuning": {"max_trials_global": trials, "max_trials_per_task": per_task, "num_trials_per_iter": per_iter,
                   "population_size": population, "seed": 0, "warm_start": warm_start, "cost_model": cost_model},
        "search": {"workers": search_workers},
        "builder": {"workers": builder_workers, "timeout_sec": build_timeout_s or (300 if build_key else 120), "key": build_key,
                    **({} if straggler_factor is None else {"straggler_factor": straggler_factor})},
        "runner": {"timeout_sec": 60, "number": 2, "repeat": 1, "min_repeat_ms": 20}})


def run_row(job, logs_dir) -> dict:
    """Tune ``job`` (``tune_job``, logs under ``logs_dir``) and return what a whole-run scaling row records: its
    tuning wall time, trials (from its progress events), trials/minute, failures by kind, the pipeline (its
    precision class), where the time went, the best estimated latency, and the search workers, shares and
    measuring agents that served it."""
    from pathlib import Path

    from tunefarm.host.tuning.job import tune_job
    from tunefarm.host.tuning.jobdir import JobDir

    tuned = tune_job(job, logs_dir=str(logs_dir))
    curve = JobDir(Path(logs_dir) / job.name).events()
    ests = [e["estimated_ms"] for e in curve if e.get("estimated_ms")]
    trials = curve[-1]["trials"] if curve else 0
    return {"wall_s": tuned.wall_s, "trials": trials, "per_min": trials / (tuned.wall_s / 60),
            "failed": tuned.failed, "failures": tuned.failures, "build_failures": tuned.build_failures,
            "pipeline": tuned.plan.pipeline.describe(), "time_split": tuned.time_split,
            "best_estimated_ms": min(ests) if ests else None, "search_workers": tuned.search_workers,
            "measured_on": tuned.per_agent, "shares": tuned.search_shares}


def failure_kinds(row: dict) -> str:
    """A ``run_row`` row's failures by kind for a table cell: ``1 build timeout, 2 run error``."""
    return ", ".join([f"{n} build {k}" for k, n in sorted(row["build_failures"].items())]
                     + [f"{n} run {k}" for k, n in sorted(row["failures"].items())])


def time_to_reach(curve: list, target_ms: float | None) -> float | None:
    """First wall time at which the best estimated latency is at or below ``target_ms``."""
    if target_ms is None:
        return None
    for ev in curve:
        if ev.get("estimated_ms") and ev["estimated_ms"] <= target_ms * (1 + 1e-9):
            return ev["elapsed_s"]
    return None
