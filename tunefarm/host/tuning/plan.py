"""Planning a tuning job: its target, its model fused into the tuning tasks, and what is left to do.

:func:`plan_job` reads (the tracker when the target is ``from-agent``, the model, the job directory it
continues, the other job directories a warm start would draw on) and writes nothing: its
:class:`TuningPlan` is what ``tunefarm tune --plan`` prints and what :mod:`tunefarm.host.tuning.job`
runs. :func:`commit_plan` writes the plan's files into the job directory once tuning starts.
"""
from __future__ import annotations

import dataclasses
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from tunefarm.core.errors import TunefarmError
from tunefarm.core.jobspec import TuningJob
from tunefarm.core.targets import target_to_json
from tunefarm.host.tuning.budget import Budget, plan_budget
from tunefarm.host.tuning.events import Events
from tunefarm.host.tuning.jobdir import JobDir, workload_counts
from tunefarm.host.tuning.pipeline import Pipeline, job_dir_pipeline, resolve_pipeline
from tunefarm.host.tuning.warm_start import WarmStart, find_warm_start, seed_database


def fuse_for_tuning(mod, target, pipeline: Pipeline | None = None):
    """Legalize and fuse once: the module whose TIR functions become the tuning tasks (``pipeline``: the
    job's; None: the default for the target's kind)."""
    return (pipeline or resolve_pipeline(target)).fuse(mod, target)


def resolve_job_target(job: TuningJob, tracker_client):
    """The job's target: the agents' own (``from-agent``), a preset name or a JSON dict."""
    import tvm  # pylint: disable=import-outside-toplevel

    from tunefarm.core.targets import target_from_spec  # pylint: disable=import-outside-toplevel

    if job.target == "from-agent":
        infos = [a for a in tracker_client.agent_infos(job.device.key) if a.target]
        if not infos:
            raise TunefarmError(f"target is 'from-agent' but no agent on key '{job.device.key}' reports a target; "
                                "set target: in the job file")
        distinct = {json.dumps(a.target, sort_keys=True) for a in infos}
        if len(distinct) > 1:
            raise TunefarmError(f"agents on key '{job.device.key}' serve different targets ({len(distinct)}); "
                                "a key must name one kind of device, or set target: in the job file")
        return tvm.target.Target(infos[0].target)
    return target_from_spec(job.target)


def _refuse_unrunnable_target(target, agents, key: str) -> None:
    """A one-line error now, rather than every candidate failing, when no agent on the key can run the target
    (e.g. OpenCL on an agent whose TVM runtime is built with USE_OPENCL=OFF)."""
    from tunefarm.core.targets import runtime_problem  # pylint: disable=import-outside-toplevel

    problems = [runtime_problem(target_to_json(target), a) for a in agents]
    if problems and all(problems):
        raise TunefarmError(f"key '{key}': {problems[0]}")


def _continues(job_dir: JobDir, state: dict[str, Any]) -> bool:
    """True if the job dir holds an earlier run of this job (resume); refuse a different model/target."""
    if not job_dir.has_state():
        return False
    old = job_dir.read_state()
    for field in ("model_fingerprint", "target"):
        if old.get(field) != state.get(field):
            raise TunefarmError(f"{job_dir} holds a run of a different {field.replace('_', ' ')}; "
                                "give the job a new name or move that directory away")
    return True


def _job_pipeline(job: TuningJob, target, old_state: dict[str, Any] | None, job_dir: JobDir,
                  agents: list | None = None) -> Pipeline:
    """A new run: the job's options, else the target's defaults (the layout's depends on whether the job will
    place groups on a vendor library: ``agents``, the key's DeviceInfo, None when the tracker is not asked). A
    resumed run keeps the pipeline its directory was tuned with; an option set in the job file that says otherwise
    is refused."""
    from tunefarm.host.placement.vendors import will_place  # pylint: disable=import-outside-toplevel

    tn = job.tuning
    if old_state is None:
        placed = tn.layout is None and will_place(job.placement.backends, target, agents)
        return resolve_pipeline(target, tn.fold_batchnorm, tn.weight_prepack, tn.precision, tn.layout, placed)
    kept = job_dir_pipeline(old_state)
    if tn.precision != kept.precision:
        raise TunefarmError(f"{job_dir.path} was tuned with tuning.precision: {kept.precision}; a run that resumes it "
                            "keeps that (give the job a new name for another precision)")
    if tn.layout is not None and tn.layout != kept.layout:
        raise TunefarmError(f"{job_dir.path} was tuned with tuning.layout: {kept.layout}; a run that resumes it "
                            "keeps that (leave the option out, or give the job a new name)")
    for name in ("fold_batchnorm", "weight_prepack"):
        asked = getattr(tn, name)
        if asked is not None and asked != getattr(kept, name):
            raise TunefarmError(f"{job_dir.path} was tuned with tuning.{name}: {str(getattr(kept, name)).lower()}; "
                                "a run that resumes it keeps that (leave the option out, or give the job a new name)")
    return kept


@dataclasses.dataclass
class PlannedTask:
    """One tuning task and what the job's database already holds for it."""

    index: int
    name: str
    weight: float
    key: str  # structural hash of the task's workload (as in tasks.json and the database)
    measured: int  # trials of this job in earlier runs (failed ones included)
    seeded: int  # records copied in by the warm start (this run's, or the first run's)
    best_s: float | None  # best valid record so far, seeded ones included

    def to_json(self) -> dict[str, Any]:
        """The task's entry in tasks.json."""
        return {"name": self.name, "weight": self.weight, "workload_hash": self.key, "seeded": self.seeded}


@dataclasses.dataclass
class TuningPlan:
    """What a run of a job will tune, and with which budget."""

    job: TuningJob
    job_dir: JobDir
    logs_dir: Path
    target: Any  # tvm.target.Target
    model: Any  # tunefarm.host.models.LoadedModel
    mod: Any  # the fused module: its TIR functions are the tasks, and it is what gets compiled
    extracted: list  # MetaSchedule's ExtractedTasks, in task order
    tasks: list[PlannedTask]
    budget: Budget
    resumed: bool
    warm: WarmStart | None  # what a new job's warm start seeds (None: resumed, or warm start off)
    pipeline: Pipeline = dataclasses.field(default_factory=Pipeline)  # the graph pipeline the tasks come from
    cost_model: str = "xgb"  # resolved: xgb (cold), xgb-farm or random
    farm_model: dict[str, Any] | None = None  # the farm model's model.json when cost_model is xgb-farm

    @property
    def target_json(self) -> dict[str, Any]:
        return target_to_json(self.target)

    @property
    def state(self) -> dict[str, Any]:
        """What job_state.json says the directory was tuned for."""
        return {"model_fingerprint": self.model.fingerprint, "target": self.target_json,
                "pipeline": self.pipeline.to_json()}

    @property
    def seeded(self) -> int:
        return sum(t.seeded for t in self.tasks)


def plan_job(job: TuningJob, logs_dir: str | Path = "logs", events: Events | None = None, tracker=None) -> TuningPlan:
    """Plan a run of ``job``; ``tracker`` (a TrackerClient) is needed only when the target is ``from-agent``.
    ``events``: where the job's line and the import's status go (none: nothing is shown)."""
    # pylint: disable=import-outside-toplevel
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    from tunefarm.host.models import load_model, to_relax

    if tracker is None and job.target == "from-agent":
        raise TunefarmError("target is 'from-agent': planning needs the tracker to ask the agents for their target")
    target = resolve_job_target(job, tracker)
    infos = tracker.agent_infos(job.device.key) if tracker is not None else None
    if infos is not None:
        _refuse_unrunnable_target(target, infos, job.device.key)
    if events is not None:
        agents = f" ({tracker.servers_for_key(job.device.key)} agent(s))" if tracker is not None else ""
        events.print(f"[bold]job[/] {job.name}: {job.model.source}:{job.model.name or job.model.path} "
                     f"on key '{job.device.key}'{agents} target {json.dumps(target_to_json(target))}")
    model = load_model(job.model)
    job_dir = JobDir(Path(logs_dir) / job.name)
    state = {"model_fingerprint": model.fingerprint, "target": target_to_json(target)}
    resumed = _continues(job_dir, state)
    pipeline = _job_pipeline(job, target, job_dir.read_state() if resumed else None, job_dir, infos)
    state["pipeline"] = pipeline.to_json()
    with events.status("importing the model into Relax and fusing") if events is not None else nullcontext():
        mod = fuse_for_tuning(to_relax(model), target, pipeline)
    extracted = ms.relax_integration.extract_tasks(mod, target)
    if not extracted:
        raise TunefarmError("no tunable tasks found in the model")
    keys = [str(tvm_ffi.structural_hash(t.dispatched[0])) for t in extracted]

    counts = workload_counts(job_dir.open_database()) if job_dir.has_database() else {}
    warm = None
    if resumed:
        seeded = job_dir.read_state().get("warm_start", {}).get("per_workload", {})
    else:
        if job.tuning.warm_start:
            warm = find_warm_start(job_dir, logs_dir, state["target"], keys, job.tuning.warm_start_top_k)
        seeded = warm.per_workload if warm is not None else {}
    tasks = []
    for i, (task, key) in enumerate(zip(extracted, keys)):
        row = counts.get(key, {"records": 0, "best_s": None})
        n_seeded = int(seeded.get(key, 0))
        bests = [b for b in (row["best_s"], warm.best_s(key) if warm is not None else None) if b is not None]
        tasks.append(PlannedTask(index=i, name=task.task_name, weight=float(task.weight), key=key,
                                 measured=max(0, row["records"] - (n_seeded if resumed else 0)),
                                 seeded=n_seeded, best_s=min(bests) if bests else None))
    tn = job.tuning
    budget = plan_budget(tn.max_trials_global, tn.max_trials_per_task, tn.num_trials_per_iter,
                         [t.measured for t in tasks], [t.best_s is not None for t in tasks])
    cost_model, farm_model = resolve_cost_model(tn.cost_model, logs_dir, state["target"])
    return TuningPlan(job=job, job_dir=job_dir, logs_dir=Path(logs_dir), target=target, model=model, mod=mod,
                      extracted=list(extracted), tasks=tasks, budget=budget, resumed=resumed, warm=warm,
                      pipeline=pipeline, cost_model=cost_model, farm_model=farm_model)


def resolve_cost_model(asked: str, logs_dir: str | Path, target: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    """The cost model a run uses: ``tuning.cost_model`` as asked, "" (auto) meaning the farm's model of the
    target where one exists, else a cold xgb; ``xgb-farm`` without a farm model is a one-line error."""
    from tunefarm.host.tuning import farm_model  # pylint: disable=import-outside-toplevel

    if asked in ("xgb", "random"):
        return asked, None
    meta = farm_model.available(logs_dir, target)
    if meta is None and asked == "xgb-farm":
        raise TunefarmError(f"tuning.cost_model is xgb-farm but the farm has no cost model for this target under "
                            f"{farm_model.models_root(logs_dir)} (one is built when a job for the target finishes); "
                            "use xgb, or leave cost_model unset")
    return ("xgb-farm", meta) if meta is not None else ("xgb", None)


def commit_plan(plan: TuningPlan):
    """Write the plan into its job directory (state, job.yaml, tasks.json, the warm start's records);
    returns the job's database."""
    job_dir = plan.job_dir
    if not plan.resumed:
        state = plan.state
        if plan.warm is not None:
            state["warm_start"] = plan.warm.summary()
        job_dir.write_state(state)
    job_dir.write_spec(plan.job)
    job_dir.write_tasks([t.to_json() for t in plan.tasks])
    database = job_dir.database()
    if plan.warm is not None and plan.warm.records:
        from tunefarm.host.tuning.jobdir import VERIFIED  # pylint: disable=import-outside-toplevel

        seed_database(database, plan.warm, {t.key: e.dispatched[0] for t, e in zip(plan.tasks, plan.extracted)},
                      job_dir.file(VERIFIED))
    return database


def describe_plan(plan: TuningPlan) -> list[str]:
    """The plan in a few console lines: tasks, budget, what earlier runs and the warm start bring."""
    b, tn = plan.budget, plan.job.tuning
    why = (" (the CPU default where the job places groups on a vendor library; placement off: NCHW)"
           if tn.layout is None and plan.pipeline.layout == "NCHWc" and not plan.resumed else "")
    lines = [f"pipeline: {plan.pipeline.describe()}{why}",
             f"{len(plan.tasks)} tasks; budget {tn.max_trials_global} trials, at most {b.per_task_cap} per task, "
             f"{tn.num_trials_per_iter} per round"]
    if plan.resumed:
        lines.append(f"resuming: {b.measured_before} already measured (kept, not measured again); "
                     f"{b.remaining} trials left")
    if plan.farm_model is not None:
        fm = plan.farm_model
        lines.append(f"cost model: the farm's ({fm.get('records')} measured records of {len(fm.get('jobs', {}))} "
                     f"job(s): {', '.join(sorted(fm.get('jobs', {})))}; {fm.get('key')})")
    else:
        lines.append(f"cost model: {plan.cost_model}" + (" (cold: the farm has no model for this target yet)"
                                                         if plan.cost_model == "xgb" and not plan.job.tuning.cost_model
                                                         else ""))
    if plan.warm is not None and plan.warm.records:
        lines.append(f"warm start: {plan.warm.records} record(s) for {len(plan.warm.per_workload)} task(s) from "
                     f"{', '.join(plan.warm.sources)} (not counted as trials of this job)")
    elif plan.resumed and plan.seeded:
        lines.append(f"{plan.seeded} record(s) seeded by the first run's warm start (not counted as trials)")
    if b.untouched:
        lines.append(f"minimum budget (max_trials_global) for one round of every task without a record: "
                     f"{b.minimum_global} trials ({len(b.untouched)} task(s) x {b.round_size}"
                     + (f" + {b.measured_before} already measured" if b.measured_before else "") + ")")
    else:
        lines.append("every task has a record already: any budget above what is measured tunes further")
    return lines


PLAN_COLUMNS = ("#", "task", "weight", "measured", "seeded", "best (us)", "may measure")


def print_plan(plan: TuningPlan, events: Events) -> None:
    """``tunefarm tune --plan``'s output: the task table (whole names in any console width), then
    :func:`describe_plan`."""
    left = plan.budget.task_left
    rows = [[str(t.index), t.name, f"{t.weight:g}", str(t.measured), str(t.seeded),
             f"{t.best_s * 1e6:.2f}" if t.best_s is not None else "-", str(left[t.index])] for t in plan.tasks]
    events.task_table(f"tasks of {plan.job.name}", PLAN_COLUMNS, rows)
    for line in describe_plan(plan):
        events.print(line)


def check_budget(plan: TuningPlan) -> None:
    """A one-line TunefarmError (exit 2, as any job file the CLI refuses) when the plan's budget leaves a task
    without a record no round at all: such a task keeps no tuned schedule and runs as naive loops. ``tunefarm
    tune`` only warns and tunes what it can; ``--plan`` is the check before a run, so it fails."""
    b = plan.budget
    if b.too_small:
        raise TunefarmError(
            f"the budget is too small: max_trials_global {b.max_trials_global}, and one round of every task "
            f"without a record needs {b.minimum_global} ({len(b.untouched)} task(s) x {b.round_size}"
            + (f" + {b.measured_before} already measured" if b.measured_before else "") + "); "
            "a run would leave tasks with no tuned schedule")
