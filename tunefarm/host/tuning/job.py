"""A tuning job end to end: plan it (tuning/plan.py), tune it through the farm, then evaluate and report.

The module that is tuned is the module that is compiled: ``fuse_for_tuning`` runs once, its result
is handed to task extraction and, after tuning, the database is applied to exactly that module
(``MetaScheduleApplyDatabase``) before ``tvm.compile``. Stock ``compile_relax`` would fuse a second
time and silently build untuned kernels (../shared/tvm-0.27-notes.md).

Running a plan (:func:`run_plan`) is MetaSchedule's ``tune_tasks`` with the farm's builder and runner,
the search kept to the job's budget (tuning/search.py, tuning/budget.py) and a progress callback that
may end the run early: ``should_stop(progress)`` is asked after every measured batch.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable

from tunefarm.core.errors import NoDeviceError, TuningFailed, TunefarmError
from tunefarm.core.jobspec import TuningJob, load_job
from tunefarm.core.wire import parse_hostport
from tunefarm.host.tuning.events import Events, esc
from tunefarm.host.tuning.jobdir import JobDir, remove_unmeasured
# fuse_for_tuning and resolve_job_target are also imported from here (compare, bench/gpu_study.py)
from tunefarm.host.tuning.plan import (TuningPlan, commit_plan, describe_plan, fuse_for_tuning,  # noqa: F401
                                       plan_job, resolve_job_target)
from tunefarm.host.tuning.progress import JobProgress, make_progress_callback, time_split
# TuneResult and run_summary are also imported from here (bench, tests)
from tunefarm.host.tuning.result import TuneResult, failure_breakdown, run_summary  # noqa: F401

StopHook = Callable[[JobProgress], bool]


def _default_events() -> Events:
    """The events of a caller that passes none (the benchmarks, scripts): rendered as the CLI renders them."""
    from tunefarm.host.console import ConsoleEvents  # pylint: disable=import-outside-toplevel

    return ConsoleEvents()


def _waiting_message(events: Events, key: str, host: str, port: int):
    key = esc(key)  # the job's text: printed, never read as markup

    def on_wait(waited, limit):
        events.print(f"[yellow]waiting for an agent on key '{key}' at {host}:{port}: "
                     f"{waited:.0f}/{limit:.0f} s[/] (start one: tunefarm agent --tracker {host}:{port} "
                     f"--key {key})")
    return on_wait


def _agent_lost_message(events: Events, key: str):
    key = esc(key)  # the job's text, and the agent's id its own word: printed, never read as markup

    def on_agent_lost(agent_id: str, measured: int, left: int):
        events.print(f"[yellow]agent {esc(agent_id)} on key '{key}' is gone[/] (it measured {measured} candidate(s) "
                     f"this run; {left} agent(s) left on the key); its candidates in flight are measured again on "
                     "the others")
    return on_agent_lost


def tune_job(job: TuningJob, logs_dir: str | Path = "logs", events: Events | None = None,
             should_stop: StopHook | None = None, stop_at: float | None = None) -> TuneResult:
    """Tune (or resume tuning) ``job``. ``should_stop(progress)`` (a :class:`JobProgress`: ``trials``,
    ``best``, ``t0``) is asked after each measured batch; True ends tuning cleanly, records kept.
    ``stop_at`` (a Unix time) ends it then, whether or not a batch has been joined: MetaSchedule joins none
    before its first round over every task is out, which on a large model can run long past a deadline
    checked only after batches. No new candidates are made from then on; those in flight finish.
    ``events``: what the run shows (default: on the terminal, as ``tunefarm tune`` shows it)."""
    from tunefarm.tracker.client import TrackerClient  # pylint: disable=import-outside-toplevel

    events = events or _default_events()
    host, port = parse_hostport(job.device.tracker)
    on_wait = _waiting_message(events, job.device.key, host, port)
    job_dir = Path(logs_dir) / job.name
    from tunefarm.host.models import check_model_spec  # pylint: disable=import-outside-toplevel

    check_model_spec(job.model)  # a missing model file is said now, not after the wait for an agent
    created = not job_dir.exists()
    try:
        with TrackerClient(host, port) as tracker:  # a one-line TrackerUnreachable at once if it is not there
            tracker.wait_for_key(job.device.key, job.runner.device_wait_sec, on_wait=on_wait)
            plan = plan_job(job, logs_dir, events, tracker)
        database = commit_plan(plan)
        for line in describe_plan(plan):
            events.print(line)
        if plan.budget.too_small:
            b = plan.budget
            events.print(f"[bold red]warning:[/] budget too small: {b.remaining} trials left for "
                         f"{len(b.untouched)} untuned task(s) x {b.round_size} trials per round = {b.need}; some "
                         f"tasks will get no tuned schedule and run as naive loops (raise max_trials_global to "
                         f"at least {b.minimum_global})")
        return run_plan(plan, database, (host, port), events, on_wait, should_stop, stop_at)
    except BaseException:
        if created:
            remove_unmeasured(JobDir(job_dir))
        raise


def run_plan(plan: TuningPlan, database, tracker: tuple[str, int], events: Events, on_wait=None,
             should_stop: StopHook | None = None, stop_at: float | None = None) -> TuneResult:
    """Tune what ``plan`` leaves to do (its job directory committed, ``database`` open)."""
    # pylint: disable=import-outside-toplevel
    from tunefarm.host.tuning.budget import TrialCounter
    from tunefarm.host.tuning.builder import BUILD_TIMEOUTS_DIR
    from tunefarm.host.tuning.measured_cache import MeasuredCache
    from tunefarm.host.tuning.search import quiet_pool_rule

    job, budget, job_dir = plan.job, plan.budget, plan.job_dir
    result = TuneResult(plan=plan, database=database, tracker=tracker, on_wait=on_wait)
    order = list(budget.order)
    if budget.remaining <= 0 or not order:
        events.print("budget already spent: nothing left to tune")
        result.time_split = job_dir.read_profile()
        return result

    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    ms_logger.setLevel(logging.WARNING)  # console quiet; files keep DEBUG
    # MetaSchedule's logging set-up names its logger's handlers in a dictConfig and fails on one without a name
    # (pytest's log capture, a caller's own handler): its set-up replaces that logger's handlers anyway.
    for handler in list(ms_logger.handlers):
        if handler.get_name() is None:
            ms_logger.removeHandler(handler)
    quiet_pool_rule(plan.target)
    tn = job.tuning
    cache = MeasuredCache()
    cached = cache.load_database(database)
    counter = TrialCounter(budget, [t.key for t in plan.tasks])
    should_stop = _ceding(plan, tracker, counter, events, result, should_stop)
    progress = JobProgress(job_dir.path, [t.name for t in plan.tasks], [t.weight for t in plan.tasks],
                           budget.measured_before + budget.remaining, events,
                           {t.index: t.best_s for t in plan.tasks if t.best_s is not None},
                           budget.measured_before, run_tasks=order)

    def stop(why: str = "the caller's stop hook"):
        if result.stopped:
            return
        counter.stop()
        result.stopped = True
        events.print(f"stopping: {why} ended tuning after {progress.trials} trials "
                     "(records kept; the batches in flight finish first)")

    timer = None
    if stop_at is not None:
        timer = threading.Timer(max(0.0, stop_at - time.time()), stop, args=("the deadline",))
        timer.daemon = True
        timer.start()

    if job.search.workers:
        return _run_spread(plan, database, tracker, events, result, progress, counter, should_stop, stop, timer)
    # The design spaces and search of a run searched here (the search workers make their own). The run's clock
    # starts here, as a spread run's does before its workers set up: both include the set-up of the search.
    t0 = time.time()
    from tunefarm.host.tuning.jobdir import VERIFIED  # pylint: disable=import-outside-toplevel
    from tunefarm.host.tuning.loop import TuningLoop  # pylint: disable=import-outside-toplevel

    loop = TuningLoop([plan.extracted[i] for i in order], plan.target, work_dir=job_dir.path, counter=counter,
                      cache=cache, tracker=tracker, device_key=job.device.key, builder=job.builder,
                      runner=job.runner, population_size=tn.population_size, seed=tn.seed,
                      space=plan.pipeline.space(plan.target), keep_dir=job_dir.path / "logs" / BUILD_TIMEOUTS_DIR,
                      verified_log=job_dir.file(VERIFIED), events=events, on_wait=on_wait,
                      on_agent_lost=_agent_lost_message(events, job.device.key),
                      # An address the agent registered (its own word): escaped before printing.
                      on_unreachable=lambda message: events.print(
                          f"[bold red]unreachable agent[/]: {esc(message)}"))
    try:
        cost_model, result.cost_model = _cost_model(plan, events)
    except BaseException:
        loop.close()
        raise
    job_dir.mark_run_started()
    limit_global, limit_task = budget.scheduler_limits(cached, max(t.measured + t.seeded for t in plan.tasks))
    try:
        profile = loop.run(database, cost_model=cost_model, max_trials_global=limit_global,
                           max_trials_per_task=limit_task, num_trials_per_iter=tn.num_trials_per_iter,
                           on_measured=make_progress_callback(progress, should_stop, stop, loop.committed),
                           around=progress.progress, check_agents=True)
    except Exception as err:  # pylint: disable=broad-except
        raise _tuning_stopped(err, database, job_dir) from None
    finally:
        if timer is not None:
            timer.cancel()
        result.space_notes = loop.space_lines()
    counts, builder = loop.runner.stats.snapshot(), loop.builder
    result.wall_s = time.time() - t0
    result.time_split = time_split(profile, result.wall_s)
    result.per_agent = counts["per_agent"]
    result.failures = counts["failures"]
    result.built_on_agents = dict(getattr(builder.builder, "remote_builds", {}))
    result.build_failures = dict(builder.build_failures)
    result.kept_builds = list(builder.kept)
    result.agents_lost = counts["lost"]
    result.requeued = counts["requeued"]
    result.unreachable = counts["unreachable"]
    result.verification = loop.verifier.summary()
    return _finish_run(plan, result, progress, events)


def _ceding(plan: TuningPlan, tracker, counter, events: Events, result: TuneResult,
            should_stop: StopHook | None) -> StopHook | None:
    """Where the job places groups on a vendor library: the vendor's time of every task it can run, measured now
    on the key's agent, and the run's after-batch hook that cedes the tasks TVM is far from (host/placement/cede.py;
    ``result.vendor_first`` says what was timed and ceded). Otherwise ``should_stop`` as it is."""
    from tunefarm.host.placement.cede import Ceder, vendor_times  # pylint: disable=import-outside-toplevel

    from tunefarm.host.placement.cede import MIN_ROUNDS  # pylint: disable=import-outside-toplevel

    if plan.job.placement.backends in ("off", []) or plan.budget.per_task_cap <= MIN_ROUNDS * plan.budget.round_size:
        return should_stop  # placement off, or no task may measure more than the rounds before a cede
    timed = vendor_times(plan, tracker, events)
    if not timed["vendor_s"]:
        return should_stop
    ceder = Ceder(plan, counter, timed["vendor_s"], plan.budget.round_size, events)
    result.vendor_first = {"groups": timed["groups"], "ceded": ceder.ceded, "far": ceder.far,
                           "min_trials": ceder.min_trials}
    events.print(f"placement: {len(timed['vendor_s'])} task(s) timed on the vendor library first; a task still "
                 f"{ceder.far:g}x slower than it after {ceder.min_trials} trials gives its trials to the others")

    def hook(progress) -> bool:
        ceder.check(progress)
        return should_stop is not None and should_stop(progress)

    return hook


def _tuning_stopped(err: BaseException, database, job_dir) -> BaseException:
    """What a tuning loop's error is raised as: Ctrl-C (carried through TVM's C++ loop from a callback), else one
    line saying what stopped it and what was kept."""
    if "KeyboardInterrupt" in str(err):
        return KeyboardInterrupt()
    kept = len(database)
    where = f"{kept} records kept in {job_dir.path}; run the job again to resume" if kept else "nothing was measured"
    whole = _keep_error(err, job_dir, inside=bool(kept))
    return TunefarmError(f"tuning stopped: {_root_cause(err)} ({where}{f'; the whole error: {whole}' if whole else ''})",
                         exit_code=4)


ERROR_FILE = "tuning-error.txt"


def _keep_error(err: BaseException, job_dir, inside: bool = True) -> str:
    """The whole text of the error that stopped a tuning loop (TVM's are many lines; the one-line message keeps
    one) and its traceback, written to the job directory (``inside``), else beside it as ``<job>.tuning-error.txt``
    (a run that measured nothing removes the directory it created): the path, or "" where it could not be
    written."""
    import traceback  # pylint: disable=import-outside-toplevel

    base = Path(job_dir.path)
    path = base / ERROR_FILE if inside else base.parent / f"{base.name}.{ERROR_FILE}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {type(err).__name__}\n{err}\n\n"
                        + "".join(traceback.format_exception(type(err), err, err.__traceback__)))
    except OSError:
        return ""
    return str(path)


def _finish_run(plan: TuningPlan, result: TuneResult, progress: JobProgress, events: Events) -> TuneResult:
    """What every run does once its tuning loop is over: the profile, the counts, the farm model, the summary."""
    job_dir, budget = plan.job_dir, plan.budget
    job_dir.write_profile(result.time_split)
    result.measured = progress.trials - budget.measured_before
    result.failed = progress.run_failed
    result.failed_kinds = failure_breakdown(result)
    result.cache_hits = progress.cache_hits
    job_dir.mark_run_ended("stopped" if result.stopped else "finished")
    if result.measured:
        result.farm_model_update = _update_farm_model(plan, events)
    for line in run_summary(result):
        events.print(esc(line))  # agent ids are the agents' own text
    if result.measured and progress.run_ok == 0:
        # Every candidate failed: records of failures only. Say so now, not as "0 tuned" later.
        first = (progress.first_error or "").splitlines()
        raise TuningFailed(f"no candidate of this run was measured successfully ({result.measured} failed); "
                           f"first error: {first[-1] if first else 'unknown'} (see {job_dir.path / 'logs'})")
    return result


def _run_spread(plan: TuningPlan, database, tracker, events: Events, result: TuneResult, progress: JobProgress, counter,
                should_stop, stop, timer) -> TuneResult:
    """The run with its search spread over search workers (host/search_workers/driver.py): the same budget,
    progress, database and summary as a run searched here."""
    from tunefarm.host.search_workers.driver import run_spread  # pylint: disable=import-outside-toplevel

    job_dir = plan.job_dir
    job_dir.mark_run_started()
    result.cost_model = {"kind": "xgb" if plan.cost_model == "xgb-farm" else plan.cost_model,
                         "note": "on the search workers (the farm model stays on this host)"}

    def after_batch():
        if should_stop is not None and not result.stopped and should_stop(progress):
            stop()

    t0 = time.time()
    try:
        with progress.progress:
            run_spread(plan, database, tracker, events, progress, counter, result, after_batch)
    except TunefarmError:
        raise
    except Exception as err:  # pylint: disable=broad-except
        raise _tuning_stopped(err, database, job_dir) from None
    finally:
        if timer is not None:
            timer.cancel()
    result.wall_s = time.time() - t0
    result.time_split = time_split({}, result.wall_s)
    return _finish_run(plan, result, progress, events)


def _cost_model(plan: TuningPlan, events: Events):
    """The cost model object (or MetaSchedule's name of one) for ``tune_tasks``, and what the report says of it."""
    if plan.cost_model != "xgb-farm":
        return plan.cost_model, {"kind": plan.cost_model}
    from tunefarm.host.tuning import farm_model  # pylint: disable=import-outside-toplevel

    try:
        model, meta, load_s = farm_model.load(plan.logs_dir, plan.target_json)
    except Exception as err:  # pylint: disable=broad-except  # a damaged model must not stop the job
        why = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        if plan.job.tuning.cost_model == "xgb-farm":
            raise TunefarmError(f"the farm's cost model cannot be loaded ({why})") from None
        events.print(f"[yellow]warning[/]: the farm's cost model cannot be loaded ({why}); starting cold (xgb)")
        return "xgb", {"kind": "xgb", "farm_model_error": why}
    events.print(f"cost model: the farm's, {meta['records']} records of {len(meta['jobs'])} job(s) "
                 f"(loaded in {load_s:.2f} s)")
    return model, {"kind": "xgb-farm", "key": meta["key"], "records": meta["records"],
                   "workloads": meta.get("workloads"), "jobs": meta["jobs"], "trained_at": meta.get("trained_at"),
                   "train_s": meta.get("train_s"), "load_s": round(load_s, 3)}


def _update_farm_model(plan: TuningPlan, events: Events) -> dict[str, Any]:
    """Rebuild the farm's cost model of the job's target now that a run ended; never fails the job."""
    from tunefarm.host.tuning import farm_model  # pylint: disable=import-outside-toplevel

    t0 = time.monotonic()
    try:
        with events.status("updating the farm's cost model for this target"):
            meta = farm_model.rebuild(plan.logs_dir, plan.target_json)
    except Exception as err:  # pylint: disable=broad-except
        why = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        events.print(f"[yellow]warning[/]: the farm's cost model was not updated: {why}")
        return {"error": why}
    if meta is None:
        return {"records": 0, "wall_s": round(time.monotonic() - t0, 2)}
    events.print(f"farm cost model updated: {meta['records']} records of {len(meta['jobs'])} job(s), features "
                 f"{meta['extract_s']:.1f} s, training {meta['train_s']:.1f} s")
    return {"key": meta["key"], "records": meta["records"], "jobs": meta["jobs"], "extract_s": meta["extract_s"],
            "train_s": meta["train_s"], "wall_s": round(time.monotonic() - t0, 2)}


def _root_cause(err: BaseException) -> str:
    text = str(err)
    for cls in (NoDeviceError, TunefarmError):
        if cls.__name__ in text:
            # an error raised in Python, carried through TVM's C++ task scheduler
            line = [l for l in text.splitlines() if cls.__name__ in l][-1]
            return line.split(":", 1)[-1].strip()
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    # TVM's errors end with an explanation (a ScheduleError's last line is a bullet of its rules); the line naming
    # the error says what happened
    named = [l for l in lines if re.match(r"^([\w.]+\.)?\w*Error\b", l)]
    return (named or lines or [type(err).__name__])[-1]


def run_job(job: TuningJob, logs_dir: str | Path = "logs", evaluate: bool = True, events: Events | None = None,
            should_stop: StopHook | None = None):
    """Tune ``job`` and (``evaluate``) compile, check and time it: the report's dict, else the TuneResult."""
    from tunefarm.host.tuning.evaluate import evaluate_job  # pylint: disable=import-outside-toplevel

    events = events or _default_events()
    tuned = tune_job(job, logs_dir, events, should_stop)
    if not evaluate:
        return tuned
    return evaluate_job(tuned, events)


def _load(path: str, tracker_override: str | None) -> TuningJob:
    job = load_job(path)
    if tracker_override:
        job.device.tracker = tracker_override
    return job


def run_job_file(path: str, tracker_override: str | None = None, logs_dir: str = "logs", evaluate: bool = True):
    return run_job(_load(path, tracker_override), logs_dir, evaluate)


def plan_job_file(path: str, tracker_override: str | None = None, logs_dir: str = "logs") -> TuningPlan:
    """``tunefarm tune --plan``: print the tasks, their weights and the minimum budget; tune nothing, write
    nothing; a budget the plan calls too small is a one-line error after the plan. Asks the tracker only when
    the target is ``from-agent``."""
    from tunefarm.host.tuning.plan import check_budget, print_plan  # pylint: disable=import-outside-toplevel
    from tunefarm.tracker.client import TrackerClient  # pylint: disable=import-outside-toplevel

    job = _load(path, tracker_override)
    events = _default_events()
    if job.target == "from-agent":
        host, port = parse_hostport(job.device.tracker)
        with TrackerClient(host, port) as tracker:
            tracker.wait_for_key(job.device.key, job.runner.device_wait_sec,
                                 on_wait=_waiting_message(events, job.device.key, host, port))
            plan = plan_job(job, logs_dir, events, tracker)
    else:
        plan = plan_job(job, logs_dir, events)
    print_plan(plan, events)
    check_budget(plan)
    return plan
