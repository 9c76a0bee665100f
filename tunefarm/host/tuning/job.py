"""A tuning job end to end: import, extract tasks, tune through the farm, then evaluate and report.

The module that is tuned is the module that is compiled: ``fuse_for_tuning`` runs once, its result
is handed to task extraction and, after tuning, the database is applied to exactly that module
(``MetaScheduleApplyDatabase``) before ``tvm.compile``. Stock ``compile_relax`` would fuse a second
time and silently build untuned kernels (../shared/tvm-0.27-notes.md).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any


from tunefarm.core.errors import NoDeviceError, TuningFailed, TunefarmError
from tunefarm.core.jobspec import TuningJob, load_job
from tunefarm.core.targets import target_to_json
from tunefarm.core.wire import parse_hostport
from tunefarm.host.tuning.jobdir import JobDir, records_per_workload
from tunefarm.host.tuning.plan import (_check_state, _refuse_unrunnable_target, fuse_for_tuning,  # noqa: F401
                                        resolve_job_target)
from tunefarm.host.tuning.progress import JobProgress, make_progress_callback, time_split
from tunefarm.host.tuning.warm_start import warm_start



def _console():
    from rich.console import Console  # pylint: disable=import-outside-toplevel

    return Console(highlight=False)


def tune_job(job: TuningJob, logs_dir: str | Path = "logs", console=None) -> dict[str, Any]:
    """Tune (or resume tuning) ``job``; returns what the evaluation and the report need."""
    # pylint: disable=import-outside-toplevel
    import tvm
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    from tunefarm.host.tuning.builder import job_builder
    from tunefarm.host.tuning.measured_cache import MeasuredCache
    from tunefarm.host.models import load_model, to_relax
    from tunefarm.host.tuning.runner import FarmRunner
    from tunefarm.tracker.client import TrackerClient

    console = console or _console()
    jobdir = JobDir(Path(logs_dir) / job.name)
    job_dir = jobdir.path
    job_dir.mkdir(parents=True, exist_ok=True)
    host, port = parse_hostport(job.device.tracker)
    tracker = TrackerClient(host, port)
    tracker.summary()  # a one-line TrackerUnreachable error right away if the tracker is not there

    def on_wait(waited, limit):
        console.print(f"[yellow]waiting for an agent on key '{job.device.key}' at {host}:{port}: "
                      f"{waited:.0f}/{limit:.0f} s[/] (start one: tunefarm agent --tracker {host}:{port} "
                      f"--key {job.device.key})")

    agents = tracker.wait_for_key(job.device.key, job.runner.device_wait_sec, on_wait=on_wait)
    target = resolve_job_target(job, tracker)
    _refuse_unrunnable_target(target, tracker.agent_infos(job.device.key), job.device.key)
    console.print(f"[bold]job[/] {job.name}: {job.model.source}:{job.model.name or job.model.path} "
                  f"on key '{job.device.key}' ({agents} agent(s)) target {json.dumps(target_to_json(target))}")

    model = load_model(job.model)
    state = {"model_fingerprint": model.fingerprint, "target": target_to_json(target)}
    resumed = _check_state(jobdir, state)
    jobdir.write_spec(job)

    with console.status("importing the model into Relax and fusing"):
        mod = fuse_for_tuning(to_relax(model), target)
    extracted = ms.relax_integration.extract_tasks(mod, target)
    if not extracted:
        raise TunefarmError("no tunable tasks found in the model")
    task_names = [t.task_name for t in extracted]
    task_weights = [float(t.weight) for t in extracted]
    task_keys = [str(tvm_ffi.structural_hash(t.dispatched[0])) for t in extracted]

    jobdir.write_tasks([{"name": n, "weight": w, "workload_hash": k}
                        for n, w, k in zip(task_names, task_weights, task_keys)])
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)  # console quiet; files keep DEBUG
    database = jobdir.database()
    if not resumed and job.tuning.warm_start:
        imported = warm_start(database, job_dir, Path(logs_dir), state["target"],
                              [t.dispatched[0] for t in extracted], task_keys, job.tuning.warm_start_top_k)
        state["warm_start"] = imported
        jobdir.write_state(state)
        if imported["records"]:
            console.print(f"warm start: {imported['records']} record(s) for {len(imported['per_workload'])} "
                          f"task(s) from {', '.join(imported['sources'])} (not counted as trials of this job)")
    imported_per = jobdir.read_state().get("warm_start", {}).get("per_workload", {})
    per_workload = records_per_workload(database)
    done_per_task = [max(0, len(per_workload.get(k, [])) - imported_per.get(k, 0)) for k in task_keys]
    best_before = {i: min(per_workload[k]) for i, k in enumerate(task_keys) if per_workload.get(k)}
    trials_before = sum(done_per_task)

    tn = job.tuning
    per_task_cap = tn.max_trials_per_task or tn.max_trials_global
    remaining = tn.max_trials_global - trials_before
    # Every task needs at least one round; on CPU one unscheduled conv keeps the model as slow as untuned.
    # The task scheduler's first pass goes through the tasks in order: tasks without any record
    # (none measured, none seeded) come first, so a resumed or warm-started job serves them first.
    has_record = [bool(per_workload.get(k)) for k in task_keys]
    todo = sorted((i for i in range(len(extracted)) if done_per_task[i] < per_task_cap),
                  key=lambda i: (has_record[i], i))
    untouched = [i for i in todo if not has_record[i]]
    need = len(untouched) * min(tn.num_trials_per_iter, per_task_cap)
    if remaining > 0 and need > remaining:
        console.print(f"[bold red]warning:[/] budget too small: {remaining} trials left for {len(untouched)} "
                      f"untuned task(s) x {tn.num_trials_per_iter} trials per round = {need}; some tasks will "
                      "get no tuned schedule and run as naive loops (raise max_trials_global)")
    console.print(f"{len(extracted)} tasks; budget {tn.max_trials_global} trials"
                  + (f"; resuming: {trials_before} already measured (kept, not measured again)" if resumed else ""))

    wall = 0.0
    runner_stats: dict[str, Any] = {}
    if remaining > 0 and todo:
        cache = MeasuredCache()
        cache.load_database(database)
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            [extracted[i] for i in todo], work_dir=str(job_dir),
            strategy=ms.search_strategy.EvolutionarySearch(population_size=tn.population_size),
            seed=tn.seed)
        progress = JobProgress(job_dir, [task_names[i] for i in todo], weights, trials_before + remaining,
                               console, {todo.index(i): v for i, v in best_before.items() if i in todo},
                               trials_before)
        builder = job_builder(job.builder, (host, port), job.runner.device_wait_sec, cache=cache)
        runner = FarmRunner(host, port, job.device.key, timeout_sec=job.runner.timeout_sec,
                            device_wait_sec=job.runner.device_wait_sec, on_wait=on_wait, cache=cache,
                            evaluator_config=ms.runner.EvaluatorConfig(
                                number=job.runner.number, repeat=job.runner.repeat,
                                min_repeat_ms=job.runner.min_repeat_ms,
                                enable_cpu_cache_flush=job.runner.enable_cpu_cache_flush))
        callbacks = ms.measure_callback.MeasureCallback.create("default") + [make_progress_callback(progress)]
        t0 = time.time()
        profiler = ms.Profiler()
        try:
            with progress.progress, profiler:
                ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(job_dir),
                              max_trials_global=remaining, max_trials_per_task=per_task_cap,
                              num_trials_per_iter=tn.num_trials_per_iter, builder=builder, runner=runner,
                              database=database, cost_model=tn.cost_model, measure_callbacks=callbacks,
                              task_scheduler="gradient")
        except Exception as err:  # pylint: disable=broad-except
            kept = len(database)
            cause = _root_cause(err)
            raise TunefarmError(f"tuning stopped: {cause} ({kept} records kept in {job_dir}; run the job "
                                "again to resume)", exit_code=4) from None
        finally:
            builder.shutdown()
            runner.shutdown()
        wall = time.time() - t0
        profile = {str(k): float(v) for k, v in profiler.get().items()}
        jobdir.write_profile(time_split(profile, wall))
        if progress.trials > trials_before and progress.run_ok == 0:
            # Every candidate failed: records of failures only. Say so now, not as "0 tuned" later.
            first = (progress.first_error or "").splitlines()
            raise TuningFailed(f"no candidate of this run was measured successfully "
                               f"({progress.trials - trials_before} failed); first error: "
                               f"{first[-1] if first else 'unknown'} (see {job_dir / 'logs'})")
        runner_stats = {"per_agent": dict(runner.per_agent), "failures": dict(runner.failures),
                        "cache_hits": cache.hits, "built_on_agents": dict(getattr(builder.builder, "remote_builds", {}))}
    else:
        console.print("budget already spent: nothing left to tune")

    return {"job": job, "job_dir": job_dir, "model": model, "target": target, "mod": mod,
            "database": database, "task_names": task_names, "task_weights": task_weights,
            "task_keys": task_keys, "tuning_wall_s": wall, "runner_stats": runner_stats,
            "tracker": (host, port), "resumed": resumed, "trials_before": trials_before, "on_wait": on_wait,
            "time_split": jobdir.read_profile()}


def _root_cause(err: BaseException) -> str:
    text = str(err)
    for cls in (NoDeviceError, TunefarmError):
        if cls.__name__ in text:
            # an error raised in Python, carried through TVM's C++ task scheduler
            line = [l for l in text.splitlines() if cls.__name__ in l][-1]
            return line.split(":", 1)[-1].strip()
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return lines[-1] if lines else type(err).__name__


def run_job(job: TuningJob, logs_dir: str | Path = "logs", evaluate: bool = True, console=None) -> dict[str, Any]:
    from tunefarm.host.tuning.evaluate import evaluate_job  # pylint: disable=import-outside-toplevel

    console = console or _console()
    tuned = tune_job(job, logs_dir, console)
    if not evaluate:
        return tuned
    return evaluate_job(tuned, console)


def run_job_file(path: str, tracker_override: str | None = None, logs_dir: str = "logs",
                 evaluate: bool = True) -> dict[str, Any]:
    job = load_job(path)
    if tracker_override:
        job.device.tracker = tracker_override
    return run_job(job, logs_dir, evaluate)
